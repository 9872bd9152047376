"""Bundle: the directory a device or an app uses as it is — artifacts, tokenizer, manifest.json, report.md.

Written under a temporary name and renamed at the end, so `OUT/<target>/` is always a whole bundle. It proves
itself: manifest.json lists every other file with its sha256, and SHA256SUMS covers every file including the
manifest, so `sha256sum -c SHA256SUMS` on a device (or `edgeft check`) finds any change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeft import data as _data
from edgeft import formats, runspec
from edgeft.bench import LatencyReport
from edgeft.constants import (
    BUNDLE_USER_DIRS,
    FINETUNE_RECORD,
    MANIFEST,
    MODEL_JSON,
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
    read_manifest,
)
from edgeft.errors import EdgeftError
from edgeft.files import atomic_dir, read_json, sha256_file, tree_bytes
from edgeft.footprint import Footprint, TensorTypes
from edgeft.report_html import render_html
from edgeft.targets import ArtifactSpec, TargetProfile
from edgeft.verify import DriftReport
from edgeft.versions import tool_versions


@dataclass(frozen=True)
class ArtifactResult:
    """One built artifact with its measurements."""

    spec: ArtifactSpec
    path: Path
    drift: DriftReport
    latency: LatencyReport
    violations: tuple[str, ...] = ()
    footprint: Footprint | None = None  # measured from the artifact when not given

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
    kv_cache_mb: float | None = None  # unused: each artifact's own KV cache is in its footprint
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


# Scripts every bundle carries at its root (edgeft/device/): run on the device without edgeft.
# bundle_manifest.py is the bundle schema the device script reads manifest.json and SHA256SUMS with.
DEVICE_SCRIPTS = ("bench_on_device.py", "bundle_manifest.py")


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
    """Name of an artifact inside the bundle (a file for GGUF, a directory for ONNX)."""
    from edgeft.formats import artifact_name as name

    return name(spec.format, spec.quant, spec.file_variant)


def sha256_tree(path: Path) -> tuple[str, dict[str, str]]:
    """A file's sha256, or for a directory one digest over its files' (relative path, sha256) pairs."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path), {}
    files = {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    digest = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in files.items()).encode()).hexdigest()
    return digest, files


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _variant(spec: ArtifactSpec) -> str:
    level = "" if spec.accuracy_level is None else f" (accuracy_level {spec.accuracy_level})"
    return level + ("" if spec.ship else " — compared, not shipped")


def render_report(
    target: TargetProfile,
    facts: BuildFacts,
    arts: list[ArtifactResult],
    types: dict[str, TensorTypes] | None = None,
) -> str:
    """report.md: what was built, how far it drifts, how fast it runs, and whether it fits the device."""
    lines = [f"# edgeft bundle for `{target.name}`", "", f"{target.description}", ""]
    lines += [f"- base model: `{facts.base_model}`"]
    how = "full fine-tuning (every weight)" if facts.finetune_method == "full" else "LoRA, merged"
    lines += [f"- fine-tuned with {how} on {facts.train_examples} examples" + _schedule_text(facts.schedule)]
    if facts.reference_task_accuracy is not None:
        lines += [
            f"- held-out task accuracy (exact match, {facts.eval_examples} examples): base "
            f"{_fmt(facts.base_task_accuracy, '.1%')} → fine-tuned float {facts.reference_task_accuracy:.1%}"
        ]
    lines += ["- stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in facts.seconds.items()), ""]
    lines += [
        "| artifact | size MB | MB read per token | KLD mean | KLD p99 | top-1 | PPL ratio | task acc | "
        "prompt ids match | answers match | prefill tok/s | decode tok/s | TTFT ms | peak RSS MB | "
        "decode bound on device | fits RAM | budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = facts.reference_latency
    if ref is not None:
        lines.append(
            f"| PyTorch float (reference) | {ref.bytes / 1e6:.1f} | — | 0 | 0 | 100% | 1.000 | "
            f"{_fmt(facts.reference_task_accuracy, '.1%')} | 100% | 100% | {ref.prefill_tok_s:.0f} | "
            f"{ref.decode_tok_s:.0f} | {ref.ttft_ms:.1f} | {ref.peak_rss_mb:.0f} | — | — | — |"
        )
    for a in arts:
        d, lat, fp = a.drift, a.latency, a.figures(target.context_length)
        need_mb = fp.need_bytes / 1e6
        fits = (
            f"{'yes' if fp.need_bytes <= target.ram_budget_mb * 1e6 else 'NO'} ({need_mb:.0f} MB: "
            f"{fp.weights_bytes / 1e6:.0f} weights + {fp.kv_cache_mb:.0f} {fp.kv_dtype} KV)"
        )
        lines.append(
            f"| {artifact_name(a.spec) + _variant(a.spec)} | {lat.bytes / 1e6:.1f} | "
            f"{fp.decode_bytes_per_token / 1e6:.1f} | {d.kld_mean:.5f} | {d.kld_p99:.4f} | "
            f"{d.top1:.1%} | {d.ppl_ratio:.4f} | {_fmt(d.task_accuracy, '.1%')} | {d.prompt_ids_match:.1%} | "
            f"{d.answers_match:.1%} | {lat.prefill_tok_s:.0f} | "
            f"{lat.decode_tok_s:.0f} | {lat.ttft_ms:.1f} | {lat.peak_rss_mb:.0f} | "
            f"~{fp.decode_bound_tok_s(target.bandwidth_gb_s):.0f} tok/s | {fits} | "
            f"{'FAIL: ' + '; '.join(a.violations) if a.violations else 'pass'} |"
        )
    lines += [
        "",
        f"Latency measured on the build host ({arts[0].latency.threads if arts else '?'} threads, "
        f"{arts[0].latency.prompt_tokens if arts else '?'}-token prompt, medians of "
        f"{arts[0].latency.runs if arts else '?'} runs after a warm-up). "
        '"MB read per token" = the weights decode streams for each token, from the artifact\'s tensors: all '
        "of them but the token embedding table, of which only one row is gathered (unless the output head is "
        "tied to it: then that one matrix is the head, streamed whole, and the embedding rows are gathered "
        "from it); an untied model's ONNX folder keeps a float32 embedding for the gather, so its file "
        f'is bigger than what decode reads. "decode bound on device" = the profile\'s {target.bandwidth_gb_s:g} '
        "GB/s ÷ MB read per token, the memory-bandwidth ceiling that decode of 100M+ parameter models runs "
        "at (tiny models are compute-bound far below it). "
        f'"fits RAM" = resident weights + the artifact\'s own KV cache at {target.context_length} tokens (f16 '
        "in llama.cpp, fp32 in onnxruntime-genai on CPU) within the profile's "
        f"{target.ram_budget_mb} MB budget.",
        "",
        f"App path ({facts.eval_examples} conversations: {facts.eval_source}): each artifact renders the "
        "conversation with its own chat template and tokenizer and answers greedily in its own runtime "
        "(llama-cpp-python's create_chat_completion path, onnxruntime-genai's apply_chat_template + "
        '`Generator`). "prompt ids match" = share of conversations whose prompt ids equal the fine-tune\'s; '
        '"answers match" = share whose answers equal the float model\'s, token for token.',
        "",
    ]
    diffs = [
        f"- {artifact_name(a.spec)}{_variant(a.spec)}: {d}"
        for a in arts
        for d in (a.drift.prompt_diff, a.drift.answer_diff)
        if d
    ]
    if diffs:
        lines += ["First differences:", "", *diffs, ""]
    types = _tensor_types(arts) if types is None else types
    written = [_types_line(a, types[a.spec.label]) for a in arts if a.spec.label in types]
    if written:
        lines += ["Tensor types actually written (share of the weight bytes; the output head's type):", ""]
        lines += [*written, ""]
    if any(len(group) > 1 for group in _slots(facts.candidates).values()):
        lines += _candidates_section(facts)
    if facts.skipped:
        lines += ["Skipped (they cannot fit the device's RAM; `edgeft build --strict` stops instead):", ""]
        lines += [f"- {s.spec.label}: {s.reason}" for s in facts.skipped] + [""]
    return "\n".join(lines)


def _schedule_text(s: dict[str, Any]) -> str:
    """', lr 1e-3 (chosen for 134.5M parameters), up to 1 epoch (chosen for its size): 64 of 64 steps, best
    validation loss at step 48 of evaluations every 16 (validation: 64 training examples held back)'."""
    if not s:
        return ""
    lr = f", lr {s['lr']:g}" + (f" (chosen for {s['lr_chosen_for']})" if s.get("lr_chosen_for") else " (set)")
    epochs = f", up to {s['epochs']:g} epoch{'s' if s['epochs'] != 1 else ''}" if s.get("epochs") else ""
    epochs += " (chosen for its size)" if s.get("epochs_auto") else ""
    steps = f": {s['steps']} of {s['max_steps']} steps"
    if s.get("validation_losses"):
        stop = (
            "stopped early: the validation loss stopped improving"
            if s.get("stopped_early")
            else "ran to the end"
        )
        steps += (
            f", {stop}; kept the best state (step {s['best_step']}, validation loss "
            f"{min(s['validation_losses']):.4f} on {s.get('validation_examples')} training examples held back)"
        )
    return lr + epochs + steps


def _slots(candidates: tuple[dict[str, Any], ...]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for c in candidates:
        out.setdefault(c["slot"], []).append(c)
    return out


def _candidates_section(facts: BuildFacts) -> list[str]:
    """The search: every candidate per slot, what it measured and why it won or lost (edgeft.search)."""
    lines = [
        "## Candidates",
        "",
        "Per slot, every candidate was judged on shared token ids against the float model; those within "
        "budget went down the app path fewest-bytes-per-token first, and the first to meet every budget "
        "ships (decode on the device is memory-bound, so fewer bytes read per token is faster there). "
        "`—` = not measured.",
    ]
    if facts.imatrix:
        im = facts.imatrix
        lines += [
            "",
            f"Importance matrix: {im.get('examples')} examples of the fine-tuning data's training split "
            f"({im.get('tokens')} tokens, dataset sha256 {str(im.get('dataset_sha256'))[:12]}…), rendered "
            "through the chat template; never the held-out split.",
        ]
    for slot, group in _slots(facts.candidates).items():
        lines += [
            "",
            f"### {slot}",
            "",
            "| candidate | size MB | MB read per token | decode bound on device | KLD mean | top-1 | task acc | "
            "answers match | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in sorted(group, key=lambda c: c["decode_bytes_per_token"]):
            d = c["drift"]
            mark = "**" if c["chosen"] else ""
            lines.append(
                f"| {mark}{c['label']}{mark} | {c['bytes'] / 1e6:.1f} | {c['decode_bytes_per_token'] / 1e6:.2f} | "
                f"{_fmt(c['est_decode_tok_s'], '.0f')} tok/s | {_fmt(d['kld_mean'], '.5f')} | "
                f"{_fmt(d['top1'], '.1%')} | {_fmt(d['task_accuracy'], '.1%')} | "
                f"{_fmt(d['answers_match'], '.1%')} | {c['verdict']} |"
            )
        notes = [f"- {c['label']}: {c['note']}" for c in group if c.get("note")]
        notes += [
            f"- {c['label']}: steered by edgeft: {c['steered']} — this model's weights lie on a grid that type's "
            "rounding distorts (docs/requantization.md)"
            for c in group
            if c.get("steered")
        ]
        if notes:
            lines += ["", "Notes:", "", *notes]
    return [*lines, ""]


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
    types = _tensor_types(arts)  # read once: for the manifest entries and for the report
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
                    "within_budget": not a.violations,
                }
                entry |= formats.get(a.spec.format).manifest_fields(a.spec, facts.imatrix)
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
                shutil.copy2(Path(__file__).parent / "device" / script, tmp / script)
            # How an app runs the model (model.json) and the example apps that read it.
            description = runspec.describe(
                tokenizer_dir,
                artifacts=entries,
                versions=tool_versions(),
                context_length=target.context_length,
                threads=target.threads,
                max_new_tokens=facts.max_new_tokens,
                system_prompt=facts.system_prompt,
            )
            (tmp / MODEL_JSON).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
            runspec.copy_examples(tmp / "examples", {e["format"] for e in entries})
            (tmp / REPORT).write_text(render_report(target, facts, arts, types), encoding="utf-8")
            normalize_modes(tmp)
            files = {rel: sha256_file(tmp / rel) for rel in bundle_files(tmp)}
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "target": target.name,
                "passed": all(not a.violations for a in arts if a.spec.ship),
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


def _tensor_types(arts: list[ArtifactResult]) -> dict[str, TensorTypes]:
    """The tensor types each artifact really holds, by label (edgeft.formats.tensor_types)."""
    return {a.spec.label: formats.tensor_types(Path(a.path)) for a in arts if Path(a.path).exists()}


def _types_line(a: ArtifactResult, tt: TensorTypes) -> str:
    shares = ", ".join(f"{k} {v:.1%}" for k, v in tt.shares.items() if v >= 0.001)
    head = f"; head {tt.head_type} ({tt.head_share:.1%})" if tt.head_type else ""
    steered = (
        f"; steered by edgeft: {tt.steered} (weights on a grid that type distorts: docs/requantization.md)"
        if tt.steered
        else ""
    )
    return f"- {artifact_name(a.spec)}{_variant(a.spec)}: {shares}{head}{steered}"


def _manifest_types(tt: TensorTypes) -> dict[str, Any]:
    """Manifest fields for the tensor types an artifact really holds."""
    return {
        "tensor_types": {k: round(v, 6) for k, v in tt.shares.items()},
        "output_head": {"type": tt.head_type, "share": round(tt.head_share, 6)},
        "steered": tt.steered,
    }


def _not_user_dirs(rel_dir: Path, dirs: list[str]) -> list[str]:
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
        dirs[:] = _not_user_dirs(Path(dirpath).relative_to(root), dirs)
        for n in names:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if rel not in (MANIFEST, SHA256SUMS) and p.is_file() and not p.is_symlink():
                out.append(rel)
    return sorted(out)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_modes(root: Path) -> None:
    """Give every file and folder under `root` the mode a new one gets (0644 / 0755 under umask 022).

    Copies keep their source's mode (a 0600 temp file, a user's 0700 tokenizer folder); a device or a web
    server reading the bundle as another user must not be locked out of it.
    """
    mask = _umask()
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


# --- device results: `edgeft bench BUNDLE [--remote user@host]` records what bench_on_device.py measured ----

# report.md's device section sits between these lines; it is rewritten whole on every recorded run.
DEVICE_SECTION_START = "<!-- edgeft:device-latency -->"
DEVICE_SECTION_END = "<!-- /edgeft:device-latency -->"
# A run is flagged as slower than the previous run of the same device when a metric is worse by more than
# the noise: the larger of this share and the spread of that metric over the device's earlier runs
# ((max - min) / median). 10%: thread-count effects on a Pi 5 (up to 21%; ref: learn.arm.com
# llm-decode-roofline) and runtime-update regressions (26 → 2.6 tok/s; ref: ollama #13819) are far above
# it, run-to-run jitter on an idle device below it.
REGRESSION_MIN_SHARE = 0.10
# (key in the device JSON, label, whether higher is better)
DEVICE_METRICS = (
    ("prefill_tok_s", "prefill tok/s", True),
    ("decode_tok_s", "decode tok/s", True),
    ("ttft_ms", "TTFT ms", False),
)


def _real(x: Any) -> float | None:
    """A finite positive number from untrusted JSON, else None."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if x == x and 0 < x < float("inf") else None


def _ok_artifacts(result: Any) -> dict[str, dict[str, Any]]:
    arts = result.get("artifacts") if isinstance(result, dict) else None
    return {
        a["path"]: a
        for a in arts or []
        if isinstance(a, dict) and isinstance(a.get("path"), str) and a.get("status") == "ok"
    }


def compare_device_runs(runs: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """The newest run of `where` against the one before it: every metric's change, and the regressions
    (slower beyond noise, see REGRESSION_MIN_SHARE). `runs` is manifest["device_latency"], oldest first."""
    import statistics

    mine = [r for r in runs if isinstance(r, dict) and r.get("where") == where]
    if mine:  # only runs with the same prompt/decode lengths, runs and thread sweep are comparable
        settings = _settings(mine[-1])
        mine = [r for r in mine if _settings(r) == settings]
    out: dict[str, Any] = {"where": where, "previous_recorded": None, "changes": [], "regressions": []}
    if len(mine) < 2:
        return out
    *earlier, current = mine
    out["previous_recorded"] = earlier[-1].get("recorded")
    prev = _ok_artifacts(earlier[-1].get("result"))
    history = [_ok_artifacts(r.get("result")) for r in earlier]
    for path, art in _ok_artifacts(current.get("result")).items():
        if path not in prev:
            continue
        for key, label, higher_better in DEVICE_METRICS:
            new, old = _real(art.get(key)), _real(prev[path].get(key))
            if new is None or old is None:
                continue
            seen = [v for h in history if path in h for v in [_real(h[path].get(key))] if v is not None]
            spread = (max(seen) - min(seen)) / statistics.median(seen) if len(seen) >= 2 else 0.0
            threshold = max(REGRESSION_MIN_SHARE, spread)
            slowdown = 1 - new / old if higher_better else new / old - 1
            change = {
                "artifact": path,
                "metric": key,
                "label": label,
                "previous": old,
                "current": new,
                "slowdown": round(slowdown, 4),
                "threshold": round(threshold, 4),
                "regression": slowdown > threshold,
            }
            out["changes"].append(change)
            if change["regression"]:
                out["regressions"].append(change)
    return out


def _settings(run: dict[str, Any]) -> Any:
    result = run.get("result")
    return result.get("settings") if isinstance(result, dict) else None


def regression_line(r: dict[str, Any]) -> str:
    """One regression in words, e.g. `model-q4_0.gguf decode tok/s 34.7 → 17.3 (50% slower; noise 10%)`."""
    return (
        f"{r['artifact']} {r['label']} {r['previous']:.4g} → {r['current']:.4g} "
        f"({r['slowdown']:.0%} slower; noise {r['threshold']:.0%})"
    )


def _cell(x: Any, spec: str = "") -> str:
    """A table cell from untrusted JSON: numbers formatted, text without pipes or line breaks."""
    if x is None:
        return "—"
    if isinstance(x, int | float) and not isinstance(x, bool):
        return format(x, spec) if spec else str(x)
    return " ".join(str(x).replace("|", "/").split())[:200] or "—"


# /proc/cpuinfo flags → the ISA names of target profiles (the features llama.cpp's and onnxruntime's fast
# kernels use). ref: Linux arch/arm64/kernel/cpuinfo.c (hwcap_str: asimd, asimdhp, asimddp, i8mm, sve, sve2,
# sme, bf16) and arch/x86/include/asm/cpufeatures.h (avx2, avx512f, avx512_vnni, avx_vnni, amx_int8, ...).
CPU_FLAG_ISA = {
    "asimd": "neon",
    "neon": "neon",
    "asimdhp": "fp16",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "sve": "sve",
    "sve2": "sve2",
    "sme": "sme",
    "sse4_2": "sse4.2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx_vnni": "avx_vnni",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "amx_int8": "amx",
}


def _device_facts(result: dict[str, Any]) -> str:
    dev = result.get("device") if isinstance(result.get("device"), dict) else {}
    rts = dev.get("runtimes") if isinstance(dev.get("runtimes"), dict) else {}
    temp = dev.get("temperature_c") if isinstance(dev.get("temperature_c"), dict) else {}
    thr = dev.get("throttled") if isinstance(dev.get("throttled"), dict) else {}
    features = dev.get("cpu_features") if isinstance(dev.get("cpu_features"), list) else []
    parts = [
        f"{_cell(dev.get('hostname'))}: {_cell(dev.get('cpu_model'))} ({_cell(dev.get('machine'))}, "
        f"{_cell(dev.get('cores'))} cores, {_cell(dev.get('ram_mb'), '.0f')} MB RAM)",
        f"OS {_cell(dev.get('os'))}",
        f"Python {_cell(dev.get('python'))}",
        ", ".join(f"{_cell(k)} {_cell(v)}" for k, v in rts.items()) or "no runtime",
    ]
    if features:
        flags = {str(f).lower() for f in features}
        isa = [name for flag, name in CPU_FLAG_ISA.items() if flag in flags]
        parts.append(
            f"ISA {' '.join(dict.fromkeys(isa)) or 'none the runtimes use'} (of {len(flags)} CPU flags)"
        )
    if temp.get("before") is not None or temp.get("after") is not None:
        parts.append(f"temperature {_cell(temp.get('before'), '.1f')} → {_cell(temp.get('after'), '.1f')} °C")
    if thr.get("before") is not None or thr.get("after") is not None:
        parts.append(f"throttled {_cell(thr.get('before'))} → {_cell(thr.get('after'))}")
    return "; ".join(parts)


def _energy_lines(result: dict[str, Any]) -> str:
    """Energy per token on the device, or why there is none (bench_on_device.py's energy readers)."""
    dev = result.get("device") if isinstance(result.get("device"), dict) else {}
    energy = dev.get("energy") if isinstance(dev.get("energy"), dict) else None
    if energy is None:
        return "Energy: not measured."
    if not energy.get("available"):
        return f"Energy: not available ({_cell(energy.get('reason'))})."
    idle = energy.get("idle_w")
    parts = []
    for a in result.get("artifacts") or []:
        e = a.get("energy") if isinstance(a, dict) and isinstance(a.get("energy"), dict) else None
        if e is None:
            continue
        watts, idle_w = _real(e.get("decode_w")), _real(idle)
        above = watts - idle_w if watts is not None and idle_w is not None else None
        note = f" ({_cell(e.get('note'))})" if e.get("note") else ""
        parts.append(
            f"- {_cell(a.get('path'))}: {_cell(e.get('decode_j_per_token'), '.4f')} J per decoded token, "
            f"{_cell(e.get('prefill_j_per_token'), '.5f')} J per prompt token, {_cell(e.get('decode_w'), '.2f')} W "
            f"while decoding ({_cell(above, '+.2f')} W over idle){note}"
        )
    head = f"Energy ({_cell(energy.get('detail'))}; idle {_cell(idle, '.2f')} W, measured first):"
    return "\n".join([head, "", *parts]) if parts else head + " no artifact measured."


def render_device_section(manifest: dict[str, Any]) -> str:
    """report.md's device section: per device the newest run next to the build host's figures, the thread
    sweep, and what got slower since that device's previous run."""
    runs = [r for r in manifest.get("device_latency") or [] if isinstance(r, dict)]
    host = {
        a.get("path"): a.get("latency") if isinstance(a.get("latency"), dict) else {}
        for a in manifest.get("artifacts") or []
        if isinstance(a, dict)
    }
    lines = [
        DEVICE_SECTION_START,
        "## On the device",
        "",
        "Measured on the device itself by the bundle's `bench_on_device.py` (`edgeft bench BUNDLE --remote "
        "user@host`, or `edgeft bench BUNDLE` on this machine), each figure at its best thread count; the host "
        "figures are the build host's from the table above. The newest run per device is shown; manifest.json "
        f"keeps every run under `device_latency`. A metric is flagged when it is worse than that device's "
        f"previous run by more than {REGRESSION_MIN_SHARE:.0%} and more than its spread over the earlier runs.",
        "",
    ]
    latest: dict[str, dict[str, Any]] = {}
    for r in runs:
        latest[str(r.get("where"))] = r
    for where, run in latest.items():
        result = run.get("result") if isinstance(run.get("result"), dict) else {}
        lines += [f"### {_cell(where)} — {_cell(run.get('recorded'))}", "", _device_facts(result), ""]
        settings = result.get("settings") if isinstance(result.get("settings"), dict) else {}
        if settings:  # TTFT grows with the prompt: say which prompt the device figures used
            lines += [
                f"Device runs: {_cell(settings.get('prompt_tokens'))}-token prompt, "
                f"{_cell(settings.get('decode_tokens'))} decoded tokens, medians of {_cell(settings.get('runs'))} "
                f"runs, threads {_cell(', '.join(map(str, settings.get('threads') or [])))}.",
                "",
            ]
        lines += [
            "| artifact | status | prefill tok/s host / device | decode tok/s host / device | "
            "TTFT ms host / device | peak RSS MB host / device | best threads prefill / decode | "
            "decode GB/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        sweeps = []
        for a in result.get("artifacts") or []:
            if not isinstance(a, dict):
                continue
            path = a.get("path")
            h = host.get(path) or {}
            status = _cell(a.get("status"))
            if a.get("status") != "ok":
                status += f": {_cell(a.get('reason'))}" + (
                    f" (install: `{_cell(a.get('install'))}`)" if a.get("install") else ""
                )
            best = a.get("best_threads") if isinstance(a.get("best_threads"), dict) else {}
            lines.append(
                f"| {_cell(path)} | {status} | {_cell(h.get('prefill_tok_s'), '.0f')} / "
                f"{_cell(a.get('prefill_tok_s'), '.0f')} | {_cell(h.get('decode_tok_s'), '.0f')} / "
                f"{_cell(a.get('decode_tok_s'), '.1f')} | {_cell(h.get('ttft_ms'), '.1f')} / "
                f"{_cell(a.get('ttft_ms'), '.1f')} | {_cell(h.get('peak_rss_mb'), '.0f')} / "
                f"{_cell(a.get('peak_rss_mb'), '.0f')} | {_cell(best.get('prefill'))} / "
                f"{_cell(best.get('decode'))} | {_cell(a.get('effective_gb_s'), '.2f')} |"
            )
            points = [
                f"{_cell(s.get('threads'))} → {_cell(s.get('prefill_tok_s'), '.0f')} / "
                f"{_cell(s.get('decode_tok_s'), '.1f')}"
                for s in a.get("sweep") or []
                if isinstance(s, dict)
            ]
            if points:
                sweeps.append(f"- {_cell(path)}: " + ", ".join(points))
        if sweeps:
            lines += ["", "Thread sweep (threads → prefill / decode tok/s):", "", *sweeps]
        lines += ["", _energy_lines(result)]
        cmp = compare_device_runs(runs, where)
        if cmp["regressions"]:
            lines += ["", f"**Slower than the previous run ({_cell(cmp['previous_recorded'])}):**", ""]
            lines += [f"- {_cell(regression_line(r))}" for r in cmp["regressions"]]
        elif cmp["previous_recorded"]:
            lines += [
                "",
                f"No slowdown beyond noise since the previous run ({_cell(cmp['previous_recorded'])}).",
            ]
        lines.append("")
    lines.append(DEVICE_SECTION_END)
    return "\n".join(lines) + "\n"


def with_device_section(report: str, section: str) -> str:
    """report.md with its device section replaced (or appended when it has none)."""
    start, end = report.find(DEVICE_SECTION_START), report.find(DEVICE_SECTION_END)
    if start != -1 and end > start:
        tail = report[end + len(DEVICE_SECTION_END) :].lstrip("\n")
        return report[:start] + section + tail
    return report.rstrip("\n") + "\n\n" + section


def _rewrite_files(root: Path, new: dict[str, str]) -> None:
    """Replace some files of a bundle as one step: a sibling folder gets hard links to every other file (a
    copy where links fail) and the new contents, then takes the bundle's name (files.atomic_dir)."""
    from edgeft.files import MARKER

    # the user's installs (BUNDLE_USER_DIRS) move over whole, never linked file by file
    with atomic_dir(root, keep=BUNDLE_USER_DIRS) as tmp:
        for dirpath, dirs, names in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root)
            dirs[:] = _not_user_dirs(rel_dir, dirs)
            for d in dirs:
                (tmp / rel_dir / d).mkdir(exist_ok=True)
            for n in names:
                rel = (rel_dir / n).as_posix()
                if rel in new:
                    continue
                src, dst = root / rel, tmp / rel
                if rel == MARKER:
                    dst.unlink(missing_ok=True)
                try:
                    os.link(src, dst, follow_symlinks=False)
                except OSError:
                    shutil.copy2(src, dst, follow_symlinks=False)
        for rel, text in new.items():
            (tmp / rel).write_text(text, encoding="utf-8")
            os.chmod(tmp / rel, 0o666 & ~_umask())


def record_device_run(bundle_dir: Path, result: dict[str, Any], where: str) -> dict[str, Any]:
    """Record a bench_on_device.py result in a bundle: appended to manifest.json's `device_latency` (newest
    last: {where, recorded, result}), report.md's device section rewritten, the manifest's report.md digest
    and SHA256SUMS updated, all in one atomic step (the bundle still passes `edgeft check`). Returns the
    comparison with the previous run of the same `where` (compare_device_runs).

    Runs recorded at the same time into one bundle wait for each other (a lock on the bundle's parent folder,
    whose inode stays while the bundle folder is replaced), so none is lost."""
    import fcntl

    root = Path(bundle_dir)
    try:
        fd = os.open(root.resolve().parent, os.O_RDONLY)
    except OSError as exc:
        raise EdgeftError(f"cannot open the folder of bundle {root}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _record(root, result, where)
    finally:
        os.close(fd)


def _record(root: Path, result: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        manifest = read_manifest(root / MANIFEST, formats.names()).doc
    except ManifestError as e:
        raise EdgeftError(f"{e}; rebuild the bundle") from None
    if not isinstance(result, dict):
        raise EdgeftError(f"device result for {where}: expected a JSON object, got {type(result).__name__}")
    runs = manifest.get("device_latency", [])
    if not isinstance(runs, list):
        raise EdgeftError(f"{root / MANIFEST}: device_latency is not a list; rebuild the bundle")
    runs.append(
        {"where": where, "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "result": result}
    )
    manifest["device_latency"] = runs
    try:
        report = (root / REPORT).read_text(encoding="utf-8") if (root / REPORT).is_file() else ""
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeftError(f"{root / REPORT}: cannot read it ({e}); rebuild the bundle") from None
    report = with_device_section(report, render_device_section(manifest))
    manifest["files"][REPORT] = hashlib.sha256(report.encode("utf-8")).hexdigest()
    new = {REPORT: report}
    if REPORT_HTML in manifest["files"]:  # the page shows the device runs too (it shows no file hashes)
        new[REPORT_HTML] = render_html(manifest)
        manifest["files"][REPORT_HTML] = hashlib.sha256(new[REPORT_HTML].encode("utf-8")).hexdigest()
    if MODEL_JSON in manifest["files"] and where != "localhost":  # threads an app should use on the device
        try:
            described = runspec.with_device_threads(read_json(root / MODEL_JSON), result, where)
        except EdgeftError:
            described = None  # a damaged model.json stays as it is: `edgeft check` names it
        if described is not None:
            new[MODEL_JSON] = json.dumps(described, indent=2) + "\n"
            manifest["files"][MODEL_JSON] = hashlib.sha256(new[MODEL_JSON].encode("utf-8")).hexdigest()
    manifest_text = dump_manifest(manifest)
    sums = dict(manifest["files"]) | {MANIFEST: hashlib.sha256(manifest_text.encode("utf-8")).hexdigest()}
    sums_text = dump_sums(sums)
    try:
        _rewrite_files(root, new | {MANIFEST: manifest_text, SHA256SUMS: sums_text})
    except OSError as exc:
        raise EdgeftError(f"cannot update bundle {root}: {exc.strerror or exc}") from None
    return compare_device_runs(runs, where)
