"""Bundles for tests, written as `edgeft build` writes them but from artifacts exported once (no fine-tune):
what test_check, test_device and test_remote start from."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft import bundle
from edgeft.bench import LatencyReport
from edgeft.formats import export_artifact
from edgeft.spec import ArtifactSpec
from edgeft.targets import TargetProfile
from edgeft.verify import DriftReport

TARGET = TargetProfile(
    name="tiny-device",
    description="test device",
    arch="arm64",
    threads=2,
    ram_mb=1024,
    ram_budget_mb=512,
    context_length=256,
    bandwidth_gb_s=4.0,
    artifacts=(ArtifactSpec("gguf", "q8_0"), ArtifactSpec("onnx", "int8", accuracy_level=4)),
)
DRIFT = DriftReport(0.01, 0.1, 0.99, 1.01, None, 1.0, 1.0, 100, 4)
LATENCY = LatencyReport(100.0, 50.0, 5.0, 200.0, 1000, 1.0, 16, 8, 3, 2)


def exported(model: Path, work: Path, specs: Iterable[ArtifactSpec]) -> list[bundle.ArtifactResult]:
    """Each spec exported from `model` into work/artifacts, with made-up drift and latency figures."""
    arts = []
    for spec in specs:
        path = export_artifact(
            model,
            ArtifactSpec(spec.format, spec.quant, accuracy_level=spec.accuracy_level),
            work / "artifacts",
        )
        arts.append(bundle.ArtifactResult(spec, path, DRIFT, LATENCY))
    return arts


def plain_facts(model: Path, **more: Any) -> bundle.BuildFacts:
    """Build facts with made-up digests and no reference run; `more` sets any other field."""
    facts = bundle.BuildFacts(
        base_model=model.name,
        adapter_sha256="a" * 64,
        dataset_sha256="d" * 64,
        reference_task_accuracy=None,
        base_task_accuracy=None,
        reference_latency=None,
    )
    return dataclasses.replace(facts, **more)


def write(
    model: Path,
    arts: list[bundle.ArtifactResult],
    out: Path,
    *,
    facts: bundle.BuildFacts | None = None,
    target: TargetProfile = TARGET,
) -> Path:
    """bundle.write_bundle under umask 022 (so modes are predictable), with plain facts unless given."""
    facts = facts or plain_facts(model)
    old = os.umask(0o022)
    try:
        return bundle.write_bundle(out, target, facts, arts, model)
    finally:
        os.umask(old)


@dataclass(frozen=True)
class Bundles:
    """One bundle written once per module (`fresh`, never changed) and copies for tests to change."""

    fresh: Path
    work: Path

    def __call__(self, name: str) -> Path:
        dst = self.work / "copies" / name / self.fresh.name
        shutil.copytree(self.fresh, dst, symlinks=True)
        return dst


def reseal(root: Path, changed: dict[str, str]) -> None:
    """Rewrite files of a bundle and make its manifest and SHA256SUMS agree with them, as someone who edits a
    bundle and re-hashes it would: only checks that look past the digests can find the change."""
    import hashlib
    import json

    from edgeft.constants import MANIFEST, SHA256SUMS
    from edgeft.device.bundle_manifest import dump_manifest, dump_sums

    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    for rel, text in changed.items():
        (root / rel).write_text(text, encoding="utf-8")
        manifest["files"][rel] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    manifest_text = dump_manifest(manifest)
    sums = dict(manifest["files"]) | {MANIFEST: hashlib.sha256(manifest_text.encode("utf-8")).hexdigest()}
    (root / MANIFEST).write_text(manifest_text, encoding="utf-8")
    (root / SHA256SUMS).write_text(dump_sums(sums), encoding="utf-8")


def reseal_removed(root: Path, rel: str) -> None:
    """Drop `rel` (already deleted) from a bundle's manifest and SHA256SUMS, as a rebuild without it would."""
    import hashlib
    import json

    from edgeft.constants import MANIFEST, SHA256SUMS
    from edgeft.device.bundle_manifest import dump_manifest, dump_sums

    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    del manifest["files"][rel]
    manifest_text = dump_manifest(manifest)
    sums = dict(manifest["files"]) | {MANIFEST: hashlib.sha256(manifest_text.encode("utf-8")).hexdigest()}
    (root / MANIFEST).write_text(manifest_text, encoding="utf-8")
    (root / SHA256SUMS).write_text(dump_sums(sums), encoding="utf-8")
