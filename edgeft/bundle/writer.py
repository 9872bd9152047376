"""The bundle writer: artifacts, tokenizer, model.json, examples, device scripts, reports, then manifest.json
and SHA256SUMS, written under a temporary name and renamed at the end, so `OUT/<target>/` is always a whole
bundle."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgeft import formats, runspec
from edgeft.bundle.records import ArtifactResult, BuildFacts, artifact_name, sha256_tree
from edgeft.bundle.report import render_report, tensor_types_by_label
from edgeft.constants import (
    BUNDLE_USER_DIRS,
    MANIFEST,
    MODEL_JSON,
    MODEL_KV,
    REPORT,
    REPORT_HTML,
    SHA256SUMS,
    TOKENIZER_FILES,
)
from edgeft.device.bundle_manifest import (
    SCHEMA_VERSION,
    ManifestError,
    dump_manifest,
    dump_sums,
)
from edgeft.errors import EdgeftError
from edgeft.files import atomic_dir, sha256_file, tree_bytes
from edgeft.footprint import TensorTypes
from edgeft.report_html import render_html
from edgeft.targets import TargetProfile
from edgeft.versions import tool_versions

# Scripts every bundle carries at its root (edgeft/device/): run on the device without edgeft.
# bundle_manifest.py is the bundle schema the device script reads manifest.json and SHA256SUMS with;
# bundle_checks.py the folder checks every loader runs before a runtime sees an artifact.
DEVICE_SCRIPTS = ("bench_on_device.py", "bundle_manifest.py", "bundle_checks.py")


def write_bundle(
    out_dir: Path,
    target: TargetProfile,
    facts: BuildFacts,
    arts: list[ArtifactResult],
    tokenizer_dir: Path,
    name: str | None = None,
) -> Path:
    """Write OUT/<name or target>/ atomically and return its path."""
    final = Path(out_dir) / (name or target.name)
    types = tensor_types_by_label(arts)  # read once: for the manifest entries and for the report
    try:
        with atomic_dir(final, keep=BUNDLE_USER_DIRS) as tmp:  # an app's npm install stays
            entries = []
            for a in arts:
                if not a.spec.ship:
                    continue
                name = artifact_name(a.spec)
                if Path(a.path).is_dir():
                    shutil.copytree(a.path, tmp / name)
                else:
                    shutil.copy2(a.path, tmp / name)
                digest, files = sha256_tree(tmp / name)
                fp = a.figures(target.context_length)
                entry = {
                    "path": name,
                    "format": a.spec.format,
                    "quant": a.spec.quant,
                    "bytes": tree_bytes(tmp / name),
                    "sha256": digest,
                    "drift": a.drift.metrics()
                    | {"prompt_diff": a.drift.prompt_diff, "answer_diff": a.drift.answer_diff},
                    "latency": a.latency.metrics(),
                    "decode_bytes_per_token": fp.decode_bytes_per_token,
                    "weights_bytes": fp.weights_bytes,
                    **_manifest_types(types[a.spec.label]),
                    "kv_cache_mb": round(fp.kv_cache_mb, 6),
                    "kv_cache_dtype": fp.kv_dtype,
                    "ram_need_mb": round(fp.need_bytes / 1e6, 6),
                    "budget": {k: v for k, v in asdict(a.spec.budget).items() if v is not None},
                    "within_budget": not a.all_violations,
                }
                entry |= formats.get(a.spec.format).manifest_fields(a.spec, facts.imatrix, tmp / name)
                if (
                    a.task is not None
                ):  # a base + adapter: the task its drift and latency are of, listed first
                    entry["task"] = a.task
                    adapters = entry.get("adapters", {})
                    entry["adapters"] = (
                        {a.task: adapters[a.task]} | adapters if a.task in adapters else adapters
                    )
                if a.merged_latency is not None:  # a base + adapter: the merged artifact of the same quant
                    entry["merged_latency"] = a.merged_latency.metrics()
                if a.tasks:  # a base + adapter of several tasks: each further task's own verdict
                    entry["tasks"] = [t.manifest_entry() for t in a.tasks]
                if files:
                    entry["files"] = files
                entries.append(entry)
            tok_out = tmp / "tokenizer"
            tok_out.mkdir()
            for fname in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / fname).is_file():
                    shutil.copy2(Path(tokenizer_dir) / fname, tok_out / fname)
            # The on-device scripts at the root (listed in "files" and SHA256SUMS like every file).
            for script in DEVICE_SCRIPTS:
                shutil.copy2(Path(__file__).resolve().parent.parent / "device" / script, tmp / script)
            # How an app runs the model (model.json) and the example apps that read it.
            description = runspec.describe(
                tokenizer_dir,
                artifacts=entries,
                versions=tool_versions(),
                context_length=target.context_length,
                threads=target.threads,
                max_new_tokens=facts.max_new_tokens,
                system_prompt=facts.system_prompt,
                conversations=facts.conversations,
            )
            (tmp / MODEL_JSON).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
            (tmp / MODEL_KV).write_text(runspec.flat(description), encoding="utf-8")
            runspec.copy_examples(tmp / "examples", {e["format"] for e in entries})
            (tmp / REPORT).write_text(render_report(target, facts, arts, types), encoding="utf-8")
            normalize_modes(tmp)
            files = {rel: sha256_file(tmp / rel) for rel in bundle_files(tmp)}
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "target": target.name,
                "passed": all(not a.all_violations for a in arts if a.spec.ship),
                "base_model": facts.base_model,
                "base_revision": facts.base_revision,
                "base_weights_sha256": facts.base_weights_sha256,
                "adapter_sha256": facts.adapter_sha256,
                "dataset_sha256": facts.dataset_sha256,
                "finetune_method": facts.finetune_method,
                "finetuned_weights_sha256": facts.finetuned_weights_sha256 or None,
                "lora": facts.lora_settings,
                "finetune_schedule": facts.schedule or None,
                "stage_seconds": {k: round(v, 1) for k, v in facts.seconds.items()},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "tools": tool_versions(),
                "device": {
                    "description": target.description,
                    "threads": target.threads,
                    "ram_budget_mb": target.ram_budget_mb,
                    "context_length": target.context_length,
                    "bandwidth_gb_s": target.bandwidth_gb_s,
                },
                "reference": {
                    "task_accuracy": facts.reference_task_accuracy,
                    "base_task_accuracy": facts.base_task_accuracy,
                    "latency": facts.reference_latency.metrics() if facts.reference_latency else None,
                },
                "data": {
                    "train_examples": facts.train_examples,
                    "eval_examples": facts.eval_examples,
                    "eval_source": facts.eval_source,
                    "eval_split_sha256": facts.eval_split_sha256,
                },
                "artifacts": entries,
                "skipped": [s.manifest_entry() for s in facts.skipped],
                "candidates": list(facts.candidates),
                "files": files,
            }
            # report.html is rendered from the finished manifest; it shows no file digests, so listing its own
            # digest afterwards leaves it as a later re-render from manifest.json would write it.
            (tmp / REPORT_HTML).write_text(render_html(manifest), encoding="utf-8")
            files[REPORT_HTML] = sha256_file(tmp / REPORT_HTML)
            manifest["files"] = files = dict(sorted(files.items()))
            (tmp / MANIFEST).write_text(dump_manifest(manifest), encoding="utf-8")
            sums = files | {MANIFEST: sha256_file(tmp / MANIFEST)}
            (tmp / SHA256SUMS).write_text(dump_sums(sums), encoding="utf-8")
    except ManifestError as exc:  # a file name SHA256SUMS cannot hold
        raise EdgeftError(f"cannot write bundle {final}: {exc}") from None
    except OSError as exc:
        raise EdgeftError(f"cannot write bundle {final}: {exc.strerror or exc}") from None
    return final


def _manifest_types(tt: TensorTypes) -> dict[str, Any]:
    """Manifest fields for the tensor types an artifact really holds."""
    return {
        "tensor_types": {k: round(v, 6) for k, v in tt.shares.items()},
        "output_head": {"type": tt.head_type, "share": round(tt.head_share, 6)},
        "steered": tt.steered,
    }


def not_user_dirs(rel_dir: Path, dirs: list[str]) -> list[str]:
    """The folders of `dirs` (inside bundle folder `rel_dir`) that are the bundle's: not the user's installs
    (BUNDLE_USER_DIRS), which os.walk then leaves out."""
    return [d for d in dirs if (rel_dir / d).as_posix() not in BUNDLE_USER_DIRS]


def bundle_files(root: Path) -> list[str]:
    """Relative paths (POSIX, sorted) of every regular file in a bundle but manifest.json and SHA256SUMS.

    Symlinks are not followed (os.walk's default); a bundle edgeft writes holds regular files only. The
    user's own installs (BUNDLE_USER_DIRS: an example's node_modules) are not the bundle's.
    """
    root = Path(root)
    out = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = not_user_dirs(Path(dirpath).relative_to(root), dirs)
        for n in names:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if rel not in (MANIFEST, SHA256SUMS) and p.is_file() and not p.is_symlink():
                out.append(rel)
    return sorted(out)


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_modes(root: Path) -> None:
    """Give every file and folder under `root` the mode a new one gets (0644 / 0755 under umask 022).

    Copies keep their source's mode (a 0600 temp file, a user's 0700 tokenizer folder); a device or a web
    server reading the bundle as another user must not be locked out of it.
    """
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirs, names in os.walk(root):
        for d in dirs:
            p = Path(dirpath) / d
            if not p.is_symlink():
                os.chmod(p, 0o777 & ~mask)
        for n in names:
            p = Path(dirpath) / n
            if not p.is_symlink():
                os.chmod(p, 0o666 & ~mask)
