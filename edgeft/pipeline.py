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

from . import bench, bundle, data, export, files, footprint, targets, verify
from .config import BuildConfig, apply_budgets
from .errors import EdgeftError
from .files import locked, tree_bytes
from .finetune import finetune, load_result
from .loading import load_tokenizer, model_fingerprint
from .merge import merge
from .runtime import open_runtime
from .runtime.torch import TorchRuntime
from .ui import info, task


@dataclass(frozen=True)
class BuildResult:
    bundle_dir: Path
    artifacts: list[bundle.ArtifactResult]
    passed: bool
    reused: tuple[str, ...] = ()  # stages taken from an earlier run with the same inputs


def build(cfg: BuildConfig) -> BuildResult:
    """Fine-tune, merge, export, verify, bench and bundle for one target, holding `cfg.out` locked."""
    target = apply_budgets(targets.load(cfg.target), cfg.budgets)
    model, data_path = resolve_inputs(cfg)
    with locked(Path(cfg.out)):  # refuses a folder edgeft did not write, and a second build into it
        return _stages(cfg, target, model, data_path)


def _stages(cfg: BuildConfig, target: targets.TargetProfile, model: str, data_path: Path) -> BuildResult:
    work = Path(cfg.out) / ".work" / target.name
    threads = cfg.threads or min(target.threads, os.cpu_count() or 1)
    seconds: dict[str, float] = {}
    reused: list[str] = []
    info(f"[bold]edgeft build[/] target={target.name} model={model} data={data_path}")
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
            bundle.tool_versions(),
        ]
    )
    adapter = work / "adapter"
    with timed("finetune", seconds):
        if files.done_with(adapter, key):
            reused.append("finetune")
            ft = load_result(adapter)
        else:
            files.forget(adapter)
            files.require_resources(
                "fine-tuning",
                ram=_training_ram(model),
                disk_at=work,
                disk=_weights_bytes(model) // 4 + (64 << 20),
            )
            with task("fine-tune (LoRA)") as update:
                ft = finetune(
                    model,
                    data_path,
                    adapter,
                    cfg.lora,
                    trust_remote_code=cfg.trust_remote_code,
                    progress=update,
                    checkpoint_dir=work / f"checkpoints-{key[:16]}",
                )
            files.mark_done(adapter, key)
    key = files.digest(["merge", key])
    merged = work / "merged"
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

    # Export everything first, then hold one float model while judging every artifact, then time each one
    # alone: at most one model copy besides the float reference is in memory at any step.
    paths: dict[str, Path] = {}
    prints: dict[str, footprint.Footprint] = {}
    for spec in list(specs):
        art_key = files.digest(["export", key, spec.format, spec.quant, spec.accuracy_level, conversations])
        name = export.artifact_name(spec.format, spec.quant)
        path = (
            work
            / "artifacts"
            / (f"{name}-acc{spec.accuracy_level}" if spec.accuracy_level is not None else name)
        )
        with timed(spec.label, seconds):
            if files.done_with(path, art_key):
                reused.append(spec.label)
            else:
                files.forget(path)
                files.require_resources(f"export {spec.label}", disk_at=work, disk=3 * tree_bytes(merged))
                with task(f"export {spec.label}") as update:
                    opts = export.ExportOptions(spec.accuracy_level, update, conversations)
                    path = export.export_artifact(merged, spec.format, spec.quant, work / "artifacts", opts)
                files.mark_done(path, art_key)
        # confirm the estimate on the artifact itself: its tensors and its runtime's KV cache
        measured = footprint.measure(path, target.context_length)
        reason = over_budget(measured, target, "measured on the exported artifact")
        if reason:
            if cfg.strict:
                raise EdgeftError(strict_line(spec, reason))
            info(f"[yellow]skipping {spec.label}[/]: {reason}")
            skipped.append(bundle.SkippedArtifact(spec, reason, measured))
            specs.remove(spec)
            continue
        paths[spec.label] = path
        prints[spec.label] = measured
    _require_shipped(target, specs, skipped)

    with timed("reference", seconds):
        base_acc = base_accuracy(model, evalset, threads)
        ref_rt = open_runtime(merged, threads=threads)
    try:
        with timed("reference", seconds):
            ref = score(ref_rt, evalset)
        drifts = {}
        for spec in specs:
            with timed(spec.label, seconds):
                drifts[spec.label] = check(spec.label, ref, paths[spec.label], evalset, threads)
    finally:
        ref_rt.close()

    with timed("reference", seconds), task("bench PyTorch float"):
        ref_latency = bench.bench(merged, threads=threads)
    results = []
    for spec in specs:
        with timed(spec.label, seconds), task(f"bench {spec.label}"):
            latency = bench.bench(paths[spec.label], threads=threads)
        drift = drifts[spec.label]
        violations = [drift.explain(v) for v in spec.budget.violations(drift.metrics(), ref.task_accuracy)]
        results.append(
            bundle.ArtifactResult(
                spec, paths[spec.label], drift, latency, tuple(violations), prints[spec.label]
            )
        )

    base = bundle.describe_base(model)  # the name as given (never a home path), Hub revision, weights' sha256
    lora_settings, eval_split_sha256 = bundle.finetune_facts(ft.adapter_dir)
    facts = bundle.BuildFacts(
        base_model=base.name,
        base_revision=base.revision,
        base_weights_sha256=base.weights_sha256,
        lora_settings=lora_settings,
        eval_split_sha256=eval_split_sha256,
        adapter_sha256=bundle.sha256_file(ft.adapter_dir / "adapter_model.safetensors"),
        dataset_sha256=data.dataset_sha256(data_path),
        reference_task_accuracy=ref.task_accuracy,
        base_task_accuracy=base_acc,
        reference_latency=ref_latency,
        skipped=tuple(skipped),
        seconds=seconds,
        train_examples=ft.train_examples,
        eval_examples=len(evalset.examples),
        eval_source=evalset.source,
    )
    failed = [f"{r.spec.label}: {v}" for r in results if r.spec.ship for v in r.violations]
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
        est = footprint.estimate_need(model_dir, spec.format, spec.quant, target.context_length)
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


def _training_ram(model: str) -> int:
    """A floor for LoRA training's memory: the weights in float32 plus a third for activations and state."""
    folder = Path(model)
    if not folder.is_dir():
        return 0
    from .loading import checkpoint_dtype

    size = _weights_bytes(model)
    scale = 1 if checkpoint_dtype(folder) == "float32" else 2
    return int(size * scale * 4 / 3)


def resolve_inputs(cfg: BuildConfig) -> tuple[str, Path]:
    """The model and data to use: the built-in demo when neither is given."""
    from .demo import DEMO_DATA, DEMO_MODEL

    if cfg.model and not cfg.data:
        raise EdgeftError(f"--model {cfg.model} needs --data FILE.jsonl (or data = ... in edgeft.toml)")
    model = str(cfg.model or DEMO_MODEL)
    if cfg.allow_pickle:
        from .loading import unpickled

        model = unpickled(model)
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
    rt = TorchRuntime(model, threads=threads)
    try:
        with task("score base model (before fine-tuning)", len(evalset.examples)) as update:
            return verify.task_accuracy(rt, evalset, update)
    finally:
        rt.close()


def score(rt, evalset: verify.EvalSet) -> verify.ReferenceRun:
    """The fine-tuned float model over the eval set: next-token NLL, its answers, task accuracy."""
    with task("score fine-tuned float model", evalset.n_steps) as update:
        return verify.run_reference(rt, evalset, update)


def check(label: str, ref: verify.ReferenceRun, path: Path, evalset: verify.EvalSet, threads: int):
    """Drift of one artifact against the reference run (shared ids and the app path)."""
    rt = open_runtime(path, threads=threads, n_ctx=evalset.n_ctx)
    try:
        with task(f"verify {label}", evalset.n_steps) as update:
            return verify.compare(ref, rt, evalset, update)
    finally:
        rt.close()
