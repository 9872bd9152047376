"""What a bundle records about a build: each artifact's result, the skipped ones, the build's facts and the
base model's provenance."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft import data as _data
from edgeft import formats
from edgeft.bench import LatencyReport
from edgeft.constants import (
    FINETUNE_RECORD,
)
from edgeft.errors import EdgeftError
from edgeft.files import read_json, sha256_file
from edgeft.footprint import Footprint
from edgeft.targets import ArtifactSpec
from edgeft.verify import DriftReport


@dataclass(frozen=True)
class TaskResult:
    """One more task's adapter beside a shipped base: judged on its own held-out split against its own
    fine-tuned float model."""

    task: str
    dataset_sha256: str
    drift: DriftReport
    violations: tuple[str, ...]
    reference_task_accuracy: float | None
    base_task_accuracy: float | None

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "dataset_sha256": self.dataset_sha256,
            "drift": self.drift.metrics()
            | {"prompt_diff": self.drift.prompt_diff, "answer_diff": self.drift.answer_diff},
            "reference_task_accuracy": self.reference_task_accuracy,
            "base_task_accuracy": self.base_task_accuracy,
            "within_budget": not self.violations,
            "violations": list(self.violations),
        }


@dataclass(frozen=True)
class ArtifactResult:
    """One built artifact with its measurements."""

    spec: ArtifactSpec
    path: Path
    drift: DriftReport
    latency: LatencyReport
    violations: tuple[str, ...] = ()
    footprint: Footprint | None = None  # measured from the artifact when not given
    merged_latency: LatencyReport | None = None  # a base + adapter: its merged twin of the same quant
    tasks: tuple[TaskResult, ...] = ()  # a base + adapter of several tasks: each further task's verdict
    task: str | None = None  # a base + adapter: the task its own drift and latency are of (the first --data)

    @property
    def all_violations(self) -> tuple[str, ...]:
        """Its own exceeded budgets and those of each further task's adapter (named)."""
        return self.violations + tuple(f"task {t.task}: {v}" for t in self.tasks for v in t.violations)

    def figures(self, context_length: int) -> Footprint:
        """Bytes per decode token, resident weights and KV cache of this artifact at `context_length`."""
        if self.footprint is not None and self.footprint.context_length == context_length:
            return self.footprint
        return formats.measure(self.path, context_length)


@dataclass(frozen=True)
class SkippedArtifact:
    """An artifact of the profile not built (or not shipped) because it cannot fit the device's RAM."""

    spec: ArtifactSpec
    reason: str
    footprint: Footprint  # the estimate before export, or the exported artifact's figures

    def manifest_entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {"artifact": self.spec.label, "format": self.spec.format}
        out |= {"quant": self.spec.quant, "ship": self.spec.ship, "reason": self.reason}
        out["ram_need_mb"] = round(self.footprint.need_bytes / 1e6, 6)
        return out


@dataclass(frozen=True)
class BuildFacts:
    """What the manifest records about the build besides the artifacts."""

    base_model: str
    adapter_sha256: str | None  # None after full fine-tuning (no adapter)
    dataset_sha256: str
    reference_task_accuracy: float | None
    base_task_accuracy: float | None
    reference_latency: LatencyReport | None
    seconds: dict[str, float] = field(default_factory=dict)
    train_examples: int = 0
    eval_examples: int = 0
    eval_source: str = ""
    base_revision: str | None = None  # the Hub commit the base came from; None for a local folder
    base_weights_sha256: dict[str, str] = field(default_factory=dict)  # safetensors file → sha256
    lora_settings: dict[str, Any] = field(default_factory=dict)  # as the fine-tune recorded them
    schedule: dict[str, Any] = field(default_factory=dict)  # how training ran (finetune.training_schedule)
    eval_split_sha256: str | None = None  # data.split_digest of the fine-tune's recorded eval_split
    skipped: tuple[SkippedArtifact, ...] = ()  # artifacts of the profile that cannot fit its RAM budget
    # every artifact the search built and judged (search.Candidate.record)
    candidates: tuple[dict[str, Any], ...] = ()
    # the fine-tuning data's importance matrix: dataset sha256, examples, tokens
    imatrix: dict[str, Any] | None = None
    finetune_method: str = "lora"  # "full": every weight was updated (no adapter, no merge)
    finetuned_weights_sha256: dict[str, str] = field(default_factory=dict)  # full: the tuned model's files
    max_new_tokens: int = 256  # the longest answer verify generated (model.json's generation settings)
    system_prompt: str | None = None  # runspec.common_system_prompt of the verified conversations
    conversations: tuple[
        tuple[dict[str, str], ...], ...
    ] = ()  # the held-out prompts model.json's recipe is proven on


@dataclass(frozen=True)
class BaseModel:
    """The base model as the manifest records it: the name given (never a local path), revision, weights."""

    name: str
    revision: str | None
    weights_sha256: dict[str, str]


def describe_base(model: str | Path) -> BaseModel:
    """A Hub id as given with the cached snapshot's commit, or a local folder by its name only (a full path
    would leak the builder's home directory into every bundle); plus each safetensors file's sha256."""
    from edgeft.loading import _looks_like_path

    name = str(model)
    if isinstance(model, Path) or _looks_like_path(name):
        folder = Path(name).expanduser().resolve()
        return BaseModel(folder.name, None, weights_sha256(folder))
    try:
        from huggingface_hub import snapshot_download

        # the snapshot the fine-tune loaded; its folder name is the commit (ref: huggingface_hub cache layout
        # models--ORG--NAME/snapshots/<commit>/)
        snapshot = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached / offline: the revision is simply unknown
        return BaseModel(name, None, {})
    return BaseModel(name, snapshot.name, weights_sha256(snapshot))


def weights_sha256(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors")) if p.is_file()}


def finetune_facts(adapter_dir: Path) -> tuple[dict[str, Any], str | None]:
    """The LoRA settings and the eval split digest from the fine-tune's record (edgeft_finetune.json)."""
    path = Path(adapter_dir) / FINETUNE_RECORD
    record = read_json(path) if path.is_file() else {}
    if not isinstance(record, dict):
        raise EdgeftError(f"{path}: not a fine-tune record (expected a JSON object); re-run finetune")
    settings = record.get("settings")
    split = record.get("eval_split")
    return (dict(settings) if isinstance(settings, dict) else {}), (
        None if split is None else _data.split_digest(split, str(path))
    )


def artifact_name(spec: ArtifactSpec) -> str:
    """Name of an artifact inside the bundle (a file, or a folder: ONNX, a base + adapter)."""

    return formats.artifact_name(spec.format, spec.quant, spec.file_variant)


def sha256_tree(path: Path) -> tuple[str, dict[str, str]]:
    """A file's sha256, or for a directory one digest over its files' (relative path, sha256) pairs."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path), {}
    files = {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    digest = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in files.items()).encode()).hexdigest()
    return digest, files
