"""`edgeft build`: the stages, in order. Each stage is a function of its own module."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft import bench, bundle, data, files, footprint, formats, runspec, search, targets, verify
from edgeft.config import BuildConfig, apply_budgets
from edgeft.errors import EdgeftError
from edgeft.files import locked, tree_bytes
from edgeft.finetune import finetune, load_result
from edgeft.loading import load_tokenizer, model_fingerprint
from edgeft.merge import merge
from edgeft.reference import stored_reference
from edgeft.ui import info, task
from edgeft.versions import tool_versions


@dataclass(frozen=True)
class BuildResult:
    bundle_dir: Path
    artifacts: list[bundle.ArtifactResult]
    passed: bool
    reused: tuple[str, ...] = ()  # stages taken from an earlier run with the same inputs


def build(cfg: BuildConfig) -> BuildResult:
    """Fine-tune, merge, export, verify, bench and bundle for one target, holding `cfg.out` locked."""
    target = apply_budgets(targets.load(cfg.target), cfg.budgets, cfg.limits)
    model, data_path = resolve_inputs(cfg)
    with locked(Path(cfg.out)):  # refuses a folder edgeft did not write, and a second build into it
        return _stages(cfg, target, model, data_path)


def _stages(cfg: BuildConfig, target: targets.TargetProfile, model: str, data_path: Path) -> BuildResult:
    work = Path(cfg.out) / ".work" / target.name
    threads = cfg.threads or min(target.threads, os.cpu_count() or 1)
    seconds: dict[str, float] = {}
    reused: list[str] = []
    named = str(cfg.model or "builtin:demo")
    shown = named if named == model else f"{named} ({model})"
    info(f"[bold]edgeft build[/] target={target.name} model={shown} data={data_path}")
    # RAM preflight before any heavy work: a local checkpoint's shapes are the merged model's (LoRA merges
    # in place), so an artifact that cannot fit is known before fine-tuning; a Hub id waits for the merge.
    specs: list[targets.ArtifactSpec] | None = None
    skipped: list[bundle.SkippedArtifact] = []
    if _local_weights(model):
        specs, skipped = ram_preflight(Path(model), target, strict=cfg.strict)

    # Each stage is keyed by its inputs and settings: a re-run (after a failure, a kill, or with --keep-work)
    # reuses what is finished and redoes only the rest; a killed fine-tune resumes from its last checkpoint.
    key = files.digest(
        [
            "finetune",
            model_fingerprint(model),
            data.dataset_sha256(data_path),
            _eval_file_digest(data_path),
            dataclasses.asdict(cfg.lora),
            tool_versions(),
            *([cfg.method, cfg.full_lr] if cfg.method != "lora" else []),  # LoRA keys stay as they were
        ]
    )
    full = cfg.method == "full"  # every weight: the fine-tune's output is the whole model, nothing is merged
    adapter = work / ("finetuned" if full else "adapter")
    with timed("finetune", seconds):
        if files.done_with(adapter, key):
            reused.append("finetune")
            ft = load_result(adapter)
        else:
            files.forget(adapter)
            files.require_resources(
                "fine-tuning",
                ram=0 if full else _training_ram(model),  # full: finetune checks its own, with the numbers
                disk_at=work,
                disk=_finetune_disk(model, full),
            )
            with task("fine-tune (every weight)" if full else "fine-tune (LoRA)") as update:
                ft = finetune(
                    model,
                    data_path,
                    adapter,
                    cfg.lora,
                    trust_remote_code=cfg.trust_remote_code,
                    progress=update,
                    checkpoint_dir=work / f"checkpoints-{key[:16]}",
                    method=cfg.method,
                    full_lr=cfg.full_lr,
                )
            files.mark_done(adapter, key)
    key = files.digest(["merge", key])
    merged = adapter if full else work / "merged"
    if not full:
        with timed("merge", seconds):
            if files.done_with(merged, key):
                reused.append("merge")
            else:
                files.forget(merged)
                # the merged model is written in the checkpoint's dtype or float32: at most twice a 16-bit base
                files.require_resources("merge", disk_at=work, disk=2 * _weights_bytes(model))
                merge(model, ft.adapter_dir, merged, trust_remote_code=cfg.trust_remote_code)
                files.mark_done(merged, key)

    if specs is None:
        specs, skipped = ram_preflight(merged, target, strict=cfg.strict)
    examples, source = verify.eval_examples(merged, None)  # the fine-tune's own held-out split
    evalset = verify.make_eval_set(load_tokenizer(merged, notify=False), examples, source=source)
    conversations = [ex.prompt_messages for ex in evalset.examples]
    if reused:
        info(f"reusing {', '.join(reused)} from an earlier run with the same inputs (.work kept)")

    # Export every candidate first, then hold one float model while judging them, then time the chosen
    # ones alone: at most one model copy besides the float reference is in memory at any step.
    plan = [(slot, search.expand(slot, search=cfg.search)) for slot in specs]
    sources = QuantSources(merged, data_path, cfg, work, key)
    cands: list[list[search.Candidate]] = []
    for slot, concrete in plan:
        group: list[search.Candidate] = []
        left_out: list[str] = []
        for spec in concrete:
            try:
                path = export_candidate(spec, merged, work, key, conversations, sources, seconds, reused)
            except EdgeftError as exc:
                if len(concrete) == 1:
                    raise
                # e.g. a head type whose blocks do not divide this model's rows: the others still compete
                info(f"[yellow]leaving out candidate {spec.label}[/]: {exc}")
                left_out.append(str(exc))
                continue
            # confirm the estimate on the artifact itself: its tensors and its runtime's KV cache
            measured = formats.measure(path, target.context_length)
            cand = search.Candidate(spec, slot, path, measured, tree_bytes(path))
            reason = over_budget(measured, target, "measured on the exported artifact")
            if reason:
                if cfg.strict and len(concrete) == 1:
                    raise EdgeftError(strict_line(spec, reason))
                cand.violations, cand.verdict = (reason,), f"does not fit: {reason}"
            group.append(cand)
        if not group:
            raise EdgeftError(f"no {slot.slot} candidate could be exported: {left_out[0]}")
        if all(c.verdict for c in group):  # nothing of this slot fits the device
            worst = min(group, key=lambda c: c.footprint.need_bytes)
            if cfg.strict:
                raise EdgeftError(strict_line(worst.spec, worst.violations[0]))
            info(f"[yellow]skipping {slot.slot}[/]: {worst.violations[0]}")
            skipped.append(bundle.SkippedArtifact(slot, worst.violations[0], worst.footprint))
            specs.remove(slot)
            continue
        cands.append(group)
    _require_shipped(target, specs, skipped)
    if sources.value is not None:
        info(f"importance matrix: {sources.value.summary()}")

    with timed("reference", seconds):
        base_acc = base_accuracy(model, evalset, threads)
        ref, ref_reused = stored_reference(merged, evalset, work, threads=threads, progress=task)
    if ref_reused:
        reused.append("reference")
    chosen: list[search.Candidate] = []
    for group in cands:
        with timed(f"choose {group[0].slot.slot}", seconds):
            chosen.append(choose(group, ref, evalset, threads, cfg.exhaustive))

    with timed("reference", seconds), task("bench PyTorch float"):
        ref_latency = bench.bench(merged, threads=threads)
    results = []
    for c in chosen:
        with timed(c.spec.label, seconds), task(f"bench {c.spec.label}"):
            latency = bench.bench(c.path, threads=threads)
        results.append(bundle.ArtifactResult(c.spec, c.path, c.drift, latency, c.violations, c.footprint))
    latencies = {r.spec.label: r.latency.metrics() for r in results}
    candidates = [c.record(target, latencies.get(c.spec.label)) for group in cands for c in group]

    base = bundle.describe_base(model)  # the name as given (never a home path), Hub revision, weights' sha256
    lora_settings, eval_split_sha256 = bundle.finetune_facts(ft.adapter_dir)
    facts = bundle.BuildFacts(
        base_model=base.name,
        base_revision=base.revision,
        base_weights_sha256=base.weights_sha256,
        lora_settings=lora_settings,
        schedule=ft.schedule,
        eval_split_sha256=eval_split_sha256,
        adapter_sha256=None if full else bundle.sha256_file(ft.adapter_dir / "adapter_model.safetensors"),
        finetuned_weights_sha256=bundle.weights_sha256(ft.adapter_dir) if full else {},
        dataset_sha256=data.dataset_sha256(data_path),
        reference_task_accuracy=ref.task_accuracy,
        base_task_accuracy=base_acc,
        reference_latency=ref_latency,
        skipped=tuple(skipped),
        seconds=seconds,
        candidates=tuple(candidates),
        imatrix=sources.record() if any(c.spec.imatrix for c in chosen) else None,
        train_examples=ft.train_examples,
        eval_examples=len(evalset.examples),
        eval_source=evalset.source,
        finetune_method=ft.method,
        max_new_tokens=evalset.max_new_tokens,
        system_prompt=runspec.common_system_prompt([ex.prompt_messages for ex in evalset.examples]),
    )
    failed = [f"{_named(c)}: {v}" for c in chosen if c.slot.ship for v in c.violations]
    if failed and cfg.fail_on_drift:
        where = bundle.write_bundle(cfg.out, target, facts, results, merged, name=f"{target.name}.rejected")
        raise EdgeftError(
            f"drift budget exceeded ({'; '.join(failed)}); report in {where / 'report.md'} "
            "(loosen [budgets] in edgeft.toml or pass --no-fail-on-drift)"
        )
    out = bundle.write_bundle(cfg.out, target, facts, results, merged)
    if not cfg.keep_work:  # a failed build keeps its work, so the next run resumes instead of redoing it
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            work.parent.rmdir()  # .work itself, once no other target's work is left in it
    return BuildResult(out, results, not failed, tuple(reused))


def _named(c: search.Candidate) -> str:
    """A shipped artifact in an error line: its label, and when the search found nothing within budget, that
    it is the closest candidate."""
    return f"{c.spec.label} ({c.verdict})" if c.verdict.startswith(CLOSEST) else c.spec.label


def _local_weights(model: str) -> bool:
    folder = Path(model)
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def over_budget(fp: footprint.Footprint, target: targets.TargetProfile, when: str) -> str | None:
    """Why an artifact with footprint `fp` cannot fit the profile's RAM budget, or None when it fits."""
    if fp.need_bytes <= target.ram_budget_mb * 1e6:
        return None
    return (
        f"needs {fp.need_bytes / 1e6:.0f} MB ({fp.weights_bytes / 1e6:.0f} MB weights + "
        f"{fp.kv_cache_bytes / 1e6:.0f} MB {fp.kv_dtype} KV cache at {fp.context_length} tokens), over "
        f"{target.name}'s RAM budget of {target.ram_budget_mb} MB ({when})"
    )


def strict_line(spec: targets.ArtifactSpec, reason: str) -> str:
    return (
        f"{spec.label} {reason}; --strict stops the build (without it the artifact is skipped; or pick a "
        "smaller quant, a shorter context_length or a profile with more RAM)"
    )


def ram_preflight(
    model_dir: Path, target: targets.TargetProfile, *, strict: bool = False
) -> tuple[list[targets.ArtifactSpec], list[bundle.SkippedArtifact]]:
    """Split the target's artifacts into those whose estimated need (weights resident + KV cache at the
    profile's context_length, from `model_dir`'s shapes) fits the RAM budget and those skipped, with the
    reason; with `strict` the first that does not fit is one EdgeftError instead."""
    keep, skipped = [], []
    for spec in target.artifacts:
        est = formats.estimate_need(model_dir, spec.format, spec.quant, target.context_length)
        reason = over_budget(est, target, "estimated before export")
        if reason is None:
            keep.append(spec)
            continue
        if strict:
            raise EdgeftError(strict_line(spec, reason))
        info(f"[yellow]skipping {spec.label}[/]: {reason}")
        skipped.append(bundle.SkippedArtifact(spec, reason, est))
    _require_shipped(target, keep, skipped)
    return keep, skipped


def _require_shipped(
    target: targets.TargetProfile, keep: list[targets.ArtifactSpec], skipped: list[bundle.SkippedArtifact]
) -> None:
    """A bundle needs at least one shipped artifact: when none fits, say why for each, in one line."""
    if not any(spec.ship for spec in keep):
        reasons = "; ".join(f"{s.spec.label} {s.reason}" for s in skipped)
        raise EdgeftError(f"no shipped artifact of {target.name} fits its RAM budget: {reasons}")


def _eval_file_digest(data_path: Path) -> str | None:
    eval_file = data.eval_file_for(data_path)
    return data.dataset_sha256(eval_file) if eval_file.is_file() else None


def _weights_bytes(model: str) -> int:
    """Size of a local checkpoint's safetensors weights (0 for a Hub id: not known before download)."""
    folder = Path(model)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0


def _finetune_disk(model: str, full: bool) -> int:
    """Disk a fine-tune writes: a LoRA adapter and its checkpoints are small; full fine-tuning writes the
    float32 model (4 bytes a parameter) and, while it saves a checkpoint, up to two Trainer checkpoints of
    weights and AdamW state (12 bytes a parameter each): 28 bytes a parameter."""
    if not full:
        return _weights_bytes(model) // 4 + (64 << 20)
    from edgeft.finetune import checkpoint_params

    params = checkpoint_params(model) if Path(model).is_dir() else None
    return (params or 0) * 28 + (64 << 20)


def _training_ram(model: str) -> int:
    """A floor for LoRA training's memory: the weights in float32 plus a third for activations and state."""
    folder = Path(model)
    if not folder.is_dir():
        return 0
    from edgeft.loading import checkpoint_dtype

    size = _weights_bytes(model)
    scale = 1 if checkpoint_dtype(folder) == "float32" else 2
    return int(size * scale * 4 / 3)


def resolve_inputs(cfg: BuildConfig) -> tuple[str, Path]:
    """The model and data to use: the built-in demo when neither is given; a built-in model (builtin:NAME)
    without --data is tuned on the demo's data."""
    from edgeft import builtin
    from edgeft.builtin import model_source
    from edgeft.demo import DEMO_DATA, DEMO_MODEL

    if cfg.model and not cfg.data and not builtin.is_builtin(cfg.model):
        raise EdgeftError(f"--model {cfg.model} needs --data FILE.jsonl (or data = ... in edgeft.toml)")
    model = model_source(str(cfg.model or DEMO_MODEL), allow_pickle=cfg.allow_pickle)
    return model, Path(cfg.data or DEMO_DATA)


@contextmanager
def timed(name: str, seconds: dict[str, float]):
    t0 = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0


def base_accuracy(model: str, evalset: verify.EvalSet, threads: int) -> float | None:
    """Task accuracy of the base model before fine-tuning (what the fine-tune is worth)."""
    if not evalset.scored:
        return None
    rt = formats.open_reference(model, threads=threads)
    try:
        with task("score base model (before fine-tuning)", len(evalset.examples)) as update:
            return verify.task_accuracy(rt, evalset, update)
    finally:
        rt.close()


def choose(
    group: list[search.Candidate],
    ref: verify.ReferenceRun,
    evalset: verify.EvalSet,
    threads: int,
    exhaustive: bool = False,
) -> search.Candidate:
    """The artifact a slot ships: the search's winner; when no candidate meets every budget, the closest one,
    measured in full and marked as failing (the build then fails naming it, unless --no-fail-on-drift)."""

    def opener(path: Path):
        return formats.open_runtime(path, threads=threads, n_ctx=evalset.n_ctx)

    winner = search.choose(group, ref, evalset, opener, task=task, exhaustive=exhaustive)
    if winner is not None:
        return winner
    fits = [c for c in group if not c.verdict.startswith("does not fit")]
    near = search.closest(fits, ref.task_accuracy)
    with search.opened(opener, near.path) as rt, task(f"verify {near.spec.label}", evalset.n_steps) as update:
        whole = near.weights if near.weights is not None and not near.weights.partial else None
        near.drift = verify.compare(ref, rt, evalset, update, weights=whole)
    viol = near.spec.budget.violations(near.drift.metrics(), ref.task_accuracy, near.size_mb)
    near.violations = tuple(near.drift.explain(v) for v in viol)
    near.chosen = True
    near.verdict = f"{CLOSEST} of {len(group)} candidates; none meets every budget"
    return near


CLOSEST = "the closest"


class QuantSources:
    """What quantized candidates are made from, each made the first time an export needs it: the importance
    matrix of the fine-tuning data's training split (never the held-out split), computed by the format that
    uses one; and the folder where a format keeps what its candidates share (a GGUF's 16-bit source)."""

    def __init__(self, merged: Path, data_path: Path, cfg: BuildConfig, work: Path, key: str = "") -> None:
        self.merged, self.data_path, self.cfg, self.work = merged, data_path, cfg, work
        self.key = key  # the merged model's stage key: an imatrix belongs to one model
        self.value: Any = None
        self._record = work / "imatrix.json"  # what a reused imatrix artifact was made with

    def importance(self, fmt: formats.Format) -> Any:
        if self.value is None:
            lora = self.cfg.lora
            train, _ = data.load_split(self.data_path, lora.eval_fraction, lora.seed, lora.max_eval)
            self.value = fmt.importance_matrix(
                self.merged, train, self.cfg.threads, data.dataset_sha256(self.data_path)
            )
            files.write_json(self._record, {"key": self.digest(), "imatrix": self.value.record()})
        return self.value

    def record(self) -> dict[str, Any] | None:
        """The manifest's imatrix record: this run's, or the one a reused artifact was made with."""
        if self.value is not None:
            return self.value.record()
        saved = files.read_json(self._record) if self._record.is_file() else None
        return saved["imatrix"] if isinstance(saved, dict) and saved.get("key") == self.digest() else None

    def digest(self) -> str:
        """What an imatrix export depends on besides the model: the data and how it is split."""
        lora = self.cfg.lora
        return files.digest(
            [
                "imatrix",
                self.key,
                data.dataset_sha256(self.data_path),
                lora.eval_fraction,
                lora.seed,
                lora.max_eval,
            ]
        )


def export_candidate(
    spec: targets.ArtifactSpec,
    merged: Path,
    work: Path,
    key: str,
    conversations: list[Any],
    sources: QuantSources,
    seconds: dict[str, float],
    reused: list[str],
) -> Path:
    """Export one artifact into work/artifacts, or reuse it when an earlier run made it from the same inputs."""
    parts = ["export", key, spec.format, spec.quant, spec.accuracy_level, conversations, spec.head_type]
    if spec.imatrix:
        parts.append(sources.digest())
    art_key = files.digest(parts)
    path = (
        work
        / "artifacts"
        / (formats.artifact_name(spec.format, spec.quant, spec.variant) + spec.level_suffix)
    )
    with timed(spec.label, seconds):
        if files.done_with(path, art_key):
            reused.append(spec.label)
            return path
        files.forget(path)
        files.require_resources(f"export {spec.label}", disk_at=work, disk=3 * tree_bytes(merged))
        fmt = formats.get(spec.format)
        with task(f"export {spec.label}") as update:
            job = formats.ExportJob(
                update, conversations, lambda: sources.importance(fmt), shared=work, shared_key=key
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            formats.export_file(merged, spec, path, job)
        files.mark_done(path, art_key)
    return path
