"""Bundle: the directory a device or an app uses as it is — artifacts, tokenizer, manifest.json, report.md.

Written under a temporary name and renamed at the end, so `OUT/<target>/` is always a whole bundle. It proves
itself: manifest.json lists every other file with its sha256, and SHA256SUMS covers every file including the
manifest, so `sha256sum -c SHA256SUMS` on a device (or `edgeft check`) finds any change.
"""

from edgeft.bundle.device_runs import (
    DEVICE_SECTION_END,
    DEVICE_SECTION_START,
    compare_device_runs,
    record_device_run,
    regression_line,
    render_device_section,
    with_device_section,
)
from edgeft.bundle.records import (
    ArtifactResult,
    BaseModel,
    BuildFacts,
    SkippedArtifact,
    TaskResult,
    artifact_name,
    describe_base,
    finetune_facts,
    sha256_tree,
    weights_sha256,
)
from edgeft.bundle.report import render_report
from edgeft.bundle.writer import DEVICE_SCRIPTS, bundle_files, normalize_modes, write_bundle
from edgeft.device.bundle_manifest import SCHEMA_VERSION
from edgeft.files import sha256_file

__all__ = [
    "DEVICE_SCRIPTS",
    "DEVICE_SECTION_END",
    "DEVICE_SECTION_START",
    "SCHEMA_VERSION",
    "ArtifactResult",
    "BaseModel",
    "BuildFacts",
    "SkippedArtifact",
    "TaskResult",
    "artifact_name",
    "bundle_files",
    "compare_device_runs",
    "describe_base",
    "finetune_facts",
    "normalize_modes",
    "record_device_run",
    "regression_line",
    "render_device_section",
    "render_report",
    "sha256_file",
    "sha256_tree",
    "weights_sha256",
    "with_device_section",
    "write_bundle",
]
