"""The stages of `edgeft build`, each a function returning a frozen result (edgeft.pipeline calls them in
order). Each stage is keyed by its inputs and settings: a re-run (after a failure, a kill, or with
--keep-work) reuses what is finished and redoes only the rest; a killed fine-tune resumes from its last
checkpoint. Each result carries the seconds it took and what it reused, so nothing accumulates across
stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from edgeft import bench, bundle, data, files, formats, runspec, search, targets, verify
from edgeft.config import BuildConfig
from edgeft.errors import EdgeftError
from edgeft.files import tree_bytes
from edgeft.finetune import FinetuneResult, checkpoint_params, finetune, load_result
from edgeft.footprint import Footprint
from edgeft.loading import checkpoint_dtype, load_tokenizer, model_fingerprint, weights_dir
from edgeft.merge import merge
from edgeft.reference import stored_reference
from edgeft.template import TemplateBoundsError
from edgeft.ui import info, plain, task
from edgeft.versions import tool_versions

Seconds = Mapping[str, float]


@contextmanager
def timed(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Add the wall time of the block to `seconds[name]` (a stage's own clock)."""
    t0 = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0


def _frozen(seconds: dict[str, float]) -> Seconds:
    return MappingProxyType(dict(seconds))


# --- the run --------------------------------------------------------------------------------------------------


# Where a build keeps its work (OUT/.work/build): one fine-tune, merge, export of each distinct candidate and
# float reference, shared by every target built into OUT, so a second target resumes from the first's work.
WORK = "build"


@dataclass(frozen=True)
class Run:
    """One build: settings, inputs, its targets (one bundle each) and where its shared work lives."""

    cfg: BuildConfig
    targets: tuple[targets.TargetProfile, ...]
    model: str  # the resolved checkpoint (a local folder or a Hub id)
    data_path: Path
    work: Path

    @property
    def full(self) -> bool:
        """Every weight fine-tuned: the fine-tune's output is the whole model, nothing is merged."""
        return self.cfg.method == "full"

    @property
    def threads(self) -> int:
        """Threads of the shared stages (fine-tune, reference, judging): the most any target uses."""
        return max(self.threads_for(t) for t in self.targets)

    def threads_for(self, target: targets.TargetProfile) -> int:
        """Threads a target's artifacts are timed with on this machine (its profile's, up to the cores)."""
        return self.cfg.threads or min(target.threads, os.cpu_count() or 1)


def start(cfg: BuildConfig, profiles: Sequence[targets.TargetProfile], model: str, data_path: Path) -> Run:
    """The run's settings, announced on one line."""
    named = str(cfg.model or "builtin:demo")
    shown = named if named == model else f"{named} ({model})"
    names = ",".join(p.name for p in profiles)
    lora = [f"{p.name} {a.slot}" for p in profiles for a in p.artifacts if a.adapter]
    if lora and cfg.method == "full":
        raise EdgeftError(
            f"{lora[0]} ships a base + LoRA adapter, but --method full trains no adapter; use --method lora "
            "or drop adapter"
        )
    info(f"[bold]edgeft build[/] target={names} model={shown} data={data_path}")
    return Run(cfg, tuple(profiles), model, data_path, Path(cfg.out) / ".work" / WORK)


# --- RAM preflight ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The profile's artifacts that fit its RAM budget, and those skipped with the reason."""

    specs: tuple[targets.ArtifactSpec, ...]
    skipped: tuple[bundle.SkippedArtifact, ...]


def over_budget(fp: Footprint, target: targets.TargetProfile, when: str) -> str | None:
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
    require_shipped(target, keep, skipped)
    return keep, skipped


def require_shipped(
    target: targets.TargetProfile,
    keep: list[targets.ArtifactSpec] | tuple[targets.ArtifactSpec, ...],
    skipped: list[bundle.SkippedArtifact] | tuple[bundle.SkippedArtifact, ...],
) -> None:
    """A bundle needs at least one shipped artifact: when none fits, say why for each, in one line."""
    if not any(spec.ship for spec in keep):
        reasons = "; ".join(f"{s.spec.label} {s.reason}" for s in skipped)
        raise EdgeftError(f"no shipped artifact of {target.name} fits its RAM budget: {reasons}")


def local_weights(model: str | Path) -> bool:
    """Whether `model` is a local checkpoint (its shapes can be read before anything is downloaded)."""
    folder = Path(model)
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def preflight(run: Run, model_dir: Path) -> dict[str, Plan]:
    """The RAM preflight of a local checkpoint, per target: which of its artifacts fit its RAM budget."""
    plans = {}
    for target in run.targets:
        keep, skipped = ram_preflight(model_dir, target, strict=run.cfg.strict)
        plans[target.name] = Plan(tuple(keep), tuple(skipped))
    return plans


# --- fine-tune and merge ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tuned:
    """The fine-tune: its result, its stage key and its timing."""

    result: FinetuneResult
    key: str
    seconds: Seconds
    reused: tuple[str, ...]


def tune(run: Run) -> Tuned:
    """Fine-tune (LoRA, or every weight with --method full), or reuse the finished one with the same key."""
    cfg, model = run.cfg, run.model
    key = files.digest(
        [
            "finetune",
            model_fingerprint(model),
            data.dataset_sha256(run.data_path),
            _eval_file_digest(run.data_path),
            dataclasses.asdict(cfg.lora),
            tool_versions(),
            *([cfg.method, cfg.full_lr] if cfg.method != "lora" else []),  # LoRA keys stay as they were
        ]
    )
    out = run.work / ("finetuned" if run.full else "adapter")
    seconds: dict[str, float] = {}
    with timed("finetune", seconds):
        reused = files.done_with(out, key)
        result = load_result(out) if reused else _tune_afresh(run, out, key)
    return Tuned(result, key, _frozen(seconds), ("finetune",) if reused else ())


def _tune_afresh(run: Run, out: Path, key: str) -> FinetuneResult:
    cfg, model = run.cfg, run.model
    files.forget(out)
    files.require_resources(
        "fine-tuning",
        ram=0 if run.full else _training_ram(model),  # full: finetune checks its own, with the numbers
        disk_at=run.work,
        disk=_finetune_disk(model, run.full),
    )
    with task("fine-tune (every weight)" if run.full else "fine-tune (LoRA)") as update:
        result = finetune(
            model,
            run.data_path,
            out,
            cfg.lora,
            trust_remote_code=cfg.trust_remote_code,
            progress=update,
            checkpoint_dir=run.work / f"checkpoints-{key[:16]}",
            method=cfg.method,
            full_lr=cfg.full_lr,
        )
    files.mark_done(out, key)
    return result


@dataclass(frozen=True)
class Merged:
    """The fine-tuned float model every artifact is exported from and judged against; after LoRA, also the
    base and the adapter it was merged from (what a base + adapter artifact ships), and the task's name."""

    path: Path
    key: str
    seconds: Seconds
    reused: tuple[str, ...]
    base: Path | None = None
    adapter: Path | None = None
    task: str = "task"


def merge_adapter(run: Run, tuned: Tuned) -> Merged:
    """Merge the adapter into the base (nothing to merge after a full fine-tune)."""
    key = files.digest(["merge", tuned.key])
    task = files.task_name(run.data_path.stem)
    if run.full:
        return Merged(tuned.result.adapter_dir, key, _frozen({}), (), task=task)
    merged = run.work / "merged"
    seconds: dict[str, float] = {}
    with timed("merge", seconds):
        reused = files.done_with(merged, key)
        if not reused:
            files.forget(merged)
            # the merged model is written in the checkpoint's dtype or float32: at most twice a 16-bit base
            files.require_resources("merge", disk_at=run.work, disk=2 * _weights_bytes(run.model))
            merge(run.model, tuned.result.adapter_dir, merged, trust_remote_code=run.cfg.trust_remote_code)
            files.mark_done(merged, key)
    return Merged(
        merged,
        key,
        _frozen(seconds),
        ("merge",) if reused else (),
        base=weights_dir(run.model) if any(_adapter_slots(run)) else None,
        adapter=tuned.result.adapter_dir,
        task=task,
    )


def _adapter_slots(run: Run) -> Iterator[targets.ArtifactSpec]:
    """The slots of any target that ship a base + adapter instead of a merged model."""
    return (spec for t in run.targets for spec in t.artifacts if spec.adapter)


def held_out(merged: Merged) -> verify.EvalSet:
    """The fine-tune's own held-out split as the eval set every artifact is judged on."""
    examples, source = verify.eval_examples(merged.path, None)
    return verify.make_eval_set(load_tokenizer(merged.path, notify=False), examples, source=source)


# --- export every candidate -------------------------------------------------------------------------------------


class Calibration:
    """The importance matrix of the fine-tuning data's training split (never the held-out split), made the
    first time an export needs one, by the format that uses it (once for every target of the build);
    remembered with what it was made from."""

    def __init__(self, merged: Path, data_path: Path, cfg: BuildConfig, work: Path, key: str = "") -> None:
        self.merged, self.data_path, self.cfg, self.work = merged, data_path, cfg, work
        self.key = key  # the merged model's stage key: an imatrix belongs to one model
        self.value: Any = None
        self.announced = False  # its summary is said once, for the first target that made it
        self._record = work / "imatrix.json"  # what a reused imatrix artifact was made with

    def importance(self, fmt: formats.Format) -> Any:
        if self.value is None:
            lora = self.cfg.lora
            train, _ = data.load_split(self.data_path, lora.eval_fraction, lora.seed, lora.max_eval)
            sha = data.dataset_sha256(self.data_path)
            self.value = fmt.importance_matrix(self.merged, train, self.cfg.threads, sha)
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


@dataclass(frozen=True)
class Exported:
    """Every candidate of every slot that fits the device, exported and measured; the plan after export
    (a slot none of whose candidates fits is skipped with the reason)."""

    groups: tuple[tuple[search.Candidate, ...], ...]
    plan: Plan
    imatrix: dict[str, Any] | None
    seconds: Seconds
    reused: tuple[str, ...]


def export_all(
    run: Run,
    target: targets.TargetProfile,
    plan: Plan,
    merged: Merged,
    evalset: verify.EvalSet,
    calibration: Calibration,
) -> Exported:
    """Export every candidate of a target first (the judging then holds one float model while it opens each).
    A candidate another target already exported (same model, format, quant and options) is reused."""
    conversations = [ex.prompt_messages for ex in evalset.examples]
    seconds: dict[str, float] = {}
    reused: list[str] = []
    specs, skipped = list(plan.specs), list(plan.skipped)
    groups: list[tuple[search.Candidate, ...]] = []
    for slot in plan.specs:
        concrete = search.expand(slot, search=run.cfg.search)
        group: list[search.Candidate] = []
        left_out: list[str] = []
        for spec in concrete:
            with timed(spec.label, seconds):
                try:
                    path, again = export_candidate(spec, merged, run.work, conversations, calibration)
                except EdgeftError as exc:
                    if len(concrete) == 1 or isinstance(exc, TemplateBoundsError):
                        raise  # a hostile template fails every candidate alike
                    # e.g. a head type whose blocks do not divide this model's rows: the others still compete
                    info(f"[yellow]leaving out candidate {spec.label}[/]: {plain(str(exc))}")
                    left_out.append(str(exc))
                    continue
            reused += [spec.label] if again else []
            group.append(_measured(run, target, spec, slot, path, single=len(concrete) == 1))
        if not group:
            raise EdgeftError(f"no {slot.slot} candidate could be exported: {left_out[0]}")
        if all(c.verdict for c in group):  # nothing of this slot fits the device
            worst = min(group, key=lambda c: c.footprint.need_bytes)
            if run.cfg.strict:
                raise EdgeftError(strict_line(worst.spec, worst.violations[0]))
            info(f"[yellow]skipping {slot.slot}[/]: {worst.violations[0]}")
            skipped.append(bundle.SkippedArtifact(slot, worst.violations[0], worst.footprint))
            specs.remove(slot)
            continue
        groups.append(tuple(group))
    require_shipped(target, specs, skipped)
    if calibration.value is not None and not calibration.announced:
        calibration.announced = True
        info(f"importance matrix: {calibration.value.summary()}")
    return Exported(
        tuple(groups),
        Plan(tuple(specs), tuple(skipped)),
        calibration.record(),
        _frozen(seconds),
        tuple(reused),
    )


def _measured(
    run: Run,
    target: targets.TargetProfile,
    spec: targets.ArtifactSpec,
    slot: targets.ArtifactSpec,
    path: Path,
    *,
    single: bool,
) -> search.Candidate:
    """A candidate with its footprint measured on the artifact itself (its tensors and its runtime's KV
    cache), marked as not fitting when it exceeds the RAM budget."""
    measured = formats.measure(path, target.context_length)
    cand = search.Candidate(spec, slot, path, measured, tree_bytes(path))
    reason = over_budget(measured, target, "measured on the exported artifact")
    if reason:
        if run.cfg.strict and single:
            raise EdgeftError(strict_line(spec, reason))
        cand.violations, cand.verdict = (reason,), f"does not fit: {reason}"
    return cand


def export_candidate(
    spec: targets.ArtifactSpec,
    merged: Merged,
    work: Path,
    conversations: list[Any],
    calibration: Calibration,
    base_from: Path | None = None,
) -> tuple[Path, bool]:
    """Export one artifact into work/artifacts, or reuse it when an earlier run made it from the same
    inputs; returns its path and whether it was reused. `base_from`: a base + adapter artifact of another
    task whose base this one shares."""
    parts = [
        "export",
        merged.key,
        spec.format,
        spec.quant,
        spec.accuracy_level,
        conversations,
        spec.head_type,
    ]
    if spec.imatrix:
        parts.append(calibration.digest())
    if spec.adapter:  # made of the base and the adapter (both in merged.key) under the task's name
        parts += ["adapter", merged.task]
    if base_from is not None:
        parts.append(bundle.sha256_tree(base_from)[0])
    art_key = files.digest(parts)
    path = (
        work
        / "artifacts"
        / (formats.artifact_name(spec.format, spec.quant, spec.variant) + spec.level_suffix)
    )
    if files.done_with(path, art_key):
        return path, True
    files.forget(path)
    files.require_resources(f"export {spec.label}", disk_at=work, disk=3 * tree_bytes(merged.path))
    fmt = formats.get(spec.format)
    importance = calibration.importance(fmt) if spec.imatrix else None
    job = formats.ExportJob(
        None,
        conversations,
        importance,
        shared=work,
        shared_key=merged.key,
        base_model=merged.base,
        adapter_dir=None if merged.base is None else merged.adapter,
        task=merged.task,
        source=base_from,
    )
    job = fmt.prepare(merged.path, spec, job)  # what candidates share, before this export's progress bar
    with task(f"export {spec.label}") as update:
        path.parent.mkdir(parents=True, exist_ok=True)
        formats.export_file(merged.path, spec, path, dataclasses.replace(job, progress=update))
    files.mark_done(path, art_key)
    return path, False


# --- judge: the float reference, and each slot's choice ---------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """The float model's run on the held-out set (stored, shared by every target) and the base model's score."""

    run: verify.ReferenceRun
    base_accuracy: float | None
    seconds: Seconds
    reused: tuple[str, ...]


def reference(run: Run, merged: Merged, evalset: verify.EvalSet) -> Reference:
    """Score the base model, then run (or reuse) the float reference: once for every target."""
    seconds: dict[str, float] = {}
    with timed("reference", seconds):
        base_acc = base_accuracy(run.model, evalset, run.threads)
        ref, ref_reused = stored_reference(merged.path, evalset, run.work, threads=run.threads, progress=task)
    return Reference(ref, base_acc, _frozen(seconds), ("reference",) if ref_reused else ())


@dataclass(frozen=True)
class Judged:
    """The artifact each slot of a target ships."""

    chosen: tuple[search.Candidate, ...]
    seconds: Seconds


def judge(
    run: Run,
    evalset: verify.EvalSet,
    exported: Exported,
    ref: Reference,
    measured: search.Measurements,
) -> Judged:
    """Choose each slot's artifact against the float reference; drift another target already measured in full
    on the same file is taken from `measured`, not measured again."""
    seconds: dict[str, float] = {}
    chosen = []
    for group in exported.groups:
        with timed(f"choose {group[0].slot.slot}", seconds):
            chosen.append(choose(list(group), ref.run, evalset, run.threads, run.cfg.exhaustive, measured))
    return Judged(tuple(chosen), _frozen(seconds))


# --- more tasks: one adapter each, over the same base ----------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A further task data set (--data given again): its own fine-tune, merge, held-out split and float
    reference in its own work folder, shipped as one more adapter beside every chosen base + adapter."""

    name: str
    run: Run
    tuned: Tuned
    merged: Merged
    evalset: verify.EvalSet
    ref: Reference


def extra_task(run: Run, data_path: Path) -> Task:
    """Fine-tune, merge, and run the float reference of one more task (each reused when already done)."""
    name = files.task_name(data_path.stem)
    sub = dataclasses.replace(run, data_path=data_path, work=run.work.parent / f"{WORK}-{name}")
    info(f"[bold]task {name}[/]: {data_path}")
    tuned = tune(sub)
    merged = merge_adapter(sub, tuned)
    evalset = held_out(merged)
    return Task(name, sub, tuned, merged, evalset, reference(sub, merged, evalset))


@dataclass(frozen=True)
class Served:
    """A target's choice with each base + adapter artifact serving every task: one base, one adapter per
    task, each further task's adapter judged against its own float model at the slot's budgets."""

    judged: Judged
    tasks: Mapping[Path, tuple[bundle.TaskResult, ...]]
    seconds: Seconds
    # a combined artifact -> the first task's own pair: timed alone, so its latency is that task's
    timed_as: Mapping[Path, Path] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


def serve_tasks(
    run: Run,
    target: targets.TargetProfile,
    judged: Judged,
    ref: Reference,
    tasks: Sequence[Task],
    measured: search.Measurements,
) -> Served:
    """For each chosen base + adapter: the further tasks' adapters over the same base file, each judged on
    its own held-out split (a failing one fails the bundle like any budget), then one artifact holding the
    base once and every adapter, its size and RAM need judged again as shipped."""
    if not tasks:
        return Served(judged, MappingProxyType({}), _frozen({}))
    seconds: dict[str, float] = {}
    chosen, records, timed_as = [], {}, {}
    for c in judged.chosen:
        paths, results = [c.path], []
        for t in tasks:
            conversations = [ex.prompt_messages for ex in t.evalset.examples]
            calibration = Calibration(t.merged.path, t.run.data_path, run.cfg, t.run.work, t.merged.key)
            with timed(f"{c.spec.label} {t.name}", seconds):
                path, _ = export_candidate(
                    c.spec, t.merged, t.run.work, conversations, calibration, base_from=c.path
                )
                cand = _measured(t.run, target, c.spec, c.slot, path, single=True)
                got = choose([cand], t.ref.run, t.evalset, run.threads, run.cfg.exhaustive, measured)
            sha = data.dataset_sha256(t.run.data_path)
            acc = t.ref.run.task_accuracy
            results.append(
                bundle.TaskResult(t.name, sha, got.drift, got.violations, acc, t.ref.base_accuracy)
            )
            paths.append(path)
        combined = formats.combine(paths, run.work / "combined" / c.path.name)
        shipped = _measured(run, target, c.spec, c.slot, combined, single=False)  # every adapter resident
        budget = c.spec.budget.violations(c.drift.metrics(), ref.run.task_accuracy, shipped.size_mb)
        violations = tuple(c.drift.explain(v) for v in budget) + shipped.violations  # type: ignore[union-attr]
        chosen.append(
            dataclasses.replace(
                c,
                path=combined,
                footprint=shipped.footprint,
                size_bytes=shipped.size_bytes,
                violations=violations,
            )
        )
        records[combined], timed_as[combined] = tuple(results), c.path
    return Served(
        Judged(tuple(chosen), judged.seconds),
        MappingProxyType(records),
        _frozen(seconds),
        MappingProxyType(timed_as),
    )


@dataclass(frozen=True)
class Twins:
    """Each chosen base + adapter's merged twin: the merged model at the same quant, exported (or reused) to
    time against it."""

    paths: Mapping[Path, Path]
    seconds: Seconds


def merged_twins(
    run: Run, judged: Judged, merged: Merged, evalset: verify.EvalSet, calibration: Calibration
) -> Twins:
    """Export the merged twin of every chosen base + adapter artifact (nothing when none ships one)."""
    conversations = [ex.prompt_messages for ex in evalset.examples]
    seconds: dict[str, float] = {}
    paths = {}
    for c in judged.chosen:
        if c.spec.adapter:
            twin = dataclasses.replace(c.spec, adapter=False, imatrix=False, search=())
            with timed(c.spec.label, seconds):
                paths[c.path], _ = export_candidate(twin, merged, run.work, conversations, calibration)
    return Twins(MappingProxyType(paths), _frozen(seconds))


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


CLOSEST = "the closest"


def choose(
    group: list[search.Candidate],
    ref: verify.ReferenceRun,
    evalset: verify.EvalSet,
    threads: int,
    exhaustive: bool = False,
    measured: search.Measurements | None = None,
) -> search.Candidate:
    """The artifact a slot ships: the search's winner; when no candidate meets every budget, the closest one,
    measured in full and marked as failing (the build then fails naming it, unless --no-fail-on-drift)."""

    def opener(path: Path):
        return formats.open_runtime(path, threads=threads, n_ctx=evalset.n_ctx)

    measured = measured if measured is not None else search.Measurements()
    winner = search.choose(group, ref, evalset, opener, task=task, exhaustive=exhaustive, measured=measured)
    if winner is not None:
        return winner
    fits = [c for c in group if not c.verdict.startswith("does not fit")]
    near = search.closest(fits, ref.task_accuracy)
    near.drift = measured.drift(near.path)
    if near.drift is None:
        with (
            search.opened(opener, near.path) as rt,
            task(f"verify {near.spec.label}", evalset.n_steps) as update,
        ):
            whole = near.weights if near.weights is not None and not near.weights.partial else None
            near.drift = measured.keep_drift(
                near.path, verify.compare(ref, rt, evalset, update, weights=whole)
            )
    viol = near.spec.budget.violations(near.drift.metrics(), ref.task_accuracy, near.size_mb)
    near.violations = tuple(near.drift.explain(v) for v in viol)
    near.chosen = True
    near.verdict = f"{CLOSEST} of {len(group)} candidates; none meets every budget"
    return near


def named(c: search.Candidate) -> str:
    """A shipped artifact in an error line: its label, and when the search found nothing within budget, that
    it is the closest candidate."""
    return f"{c.spec.label} ({c.verdict})" if c.verdict.startswith(CLOSEST) else c.spec.label


# --- bench the float model and each chosen artifact alone ------------------------------------------------------


@dataclass(frozen=True)
class Benched:
    """Latency on this machine of the float reference and of each chosen artifact."""

    reference: bench.LatencyReport
    results: tuple[bundle.ArtifactResult, ...]
    seconds: Seconds


class Timings:
    """Latency already measured on this machine, by artifact and thread count: a file two targets ship is
    timed once at each thread count they use."""

    def __init__(self) -> None:
        self._done: dict[tuple[Path, int], bench.LatencyReport] = {}

    def bench(
        self, path: Path, threads: int, label: str, seconds: dict[str, float], what: str
    ) -> bench.LatencyReport:
        if (path, threads) not in self._done:
            with timed(label, seconds), task(f"bench {what}"):
                self._done[(path, threads)] = bench.bench(path, threads=threads)
        return self._done[(path, threads)]


def bench_chosen(
    run: Run,
    target: targets.TargetProfile,
    merged: Merged,
    judged: Judged,
    twins: Twins,
    timings: Timings,
    served: Served | None = None,
) -> Benched:
    """Time the float model, then each chosen artifact alone (one model copy besides nothing else), at the
    target's thread count; a base + adapter also its merged twin, the decode speed it gives up."""
    seconds: dict[str, float] = {}
    threads = run.threads_for(target)
    ref_latency = timings.bench(merged.path, threads, "reference", seconds, "PyTorch float")
    results = []
    tasks = served.tasks if served is not None else {}
    timed_as = served.timed_as if served is not None else {}
    for c in judged.chosen:
        latency = timings.bench(timed_as.get(c.path, c.path), threads, c.spec.label, seconds, c.spec.label)
        twin = twins.paths.get(c.path)
        merged_latency = None
        if twin is not None:
            name = f"{c.spec.format}-{c.spec.quant} merged"
            merged_latency = timings.bench(twin, threads, c.spec.label, seconds, name)
        results.append(
            bundle.ArtifactResult(
                c.spec,
                c.path,
                c.drift,
                latency,
                c.violations,
                c.footprint,
                merged_latency=merged_latency,
                tasks=tasks.get(c.path, ()),
                task=merged.task if c.spec.adapter else None,
            )
        )
    return Benched(ref_latency, tuple(results), _frozen(seconds))


# --- the record, and the bundle ---------------------------------------------------------------------------------


def total(*parts: Seconds) -> dict[str, float]:
    """Stage timings added up by name (an export and the bench of the same artifact share its label)."""
    out: dict[str, float] = {}
    for part in parts:
        for name, s in part.items():
            out[name] = out.get(name, 0.0) + s
    return out


def facts(
    run: Run,
    target: targets.TargetProfile,
    tuned: Tuned,
    evalset: verify.EvalSet,
    exported: Exported,
    ref: Reference,
    judged: Judged,
    benched: Benched,
    seconds: dict[str, float],
) -> bundle.BuildFacts:
    """What a target's manifest records about the build besides the artifacts."""
    ft = tuned.result
    latencies = {r.spec.label: r.latency.metrics() for r in benched.results}
    candidates = [c.record(target, latencies.get(c.spec.label)) for g in exported.groups for c in g]
    base = bundle.describe_base(run.model)  # the name as given (never a home path), Hub revision, sha256s
    lora_settings, eval_split_sha256 = bundle.finetune_facts(ft.adapter_dir)
    return bundle.BuildFacts(
        base_model=base.name,
        base_revision=base.revision,
        base_weights_sha256=base.weights_sha256,
        lora_settings=lora_settings,
        schedule=ft.schedule,
        eval_split_sha256=eval_split_sha256,
        adapter_sha256=None if run.full else bundle.sha256_file(ft.adapter_dir / "adapter_model.safetensors"),
        finetuned_weights_sha256=bundle.weights_sha256(ft.adapter_dir) if run.full else {},
        dataset_sha256=data.dataset_sha256(run.data_path),
        reference_task_accuracy=ref.run.task_accuracy,
        base_task_accuracy=ref.base_accuracy,
        reference_latency=benched.reference,
        skipped=exported.plan.skipped,
        seconds=seconds,
        candidates=tuple(candidates),
        imatrix=exported.imatrix if any(c.spec.imatrix for c in judged.chosen) else None,
        train_examples=ft.train_examples,
        eval_examples=len(evalset.examples),
        eval_source=evalset.source,
        finetune_method=ft.method,
        max_new_tokens=evalset.max_new_tokens,
        system_prompt=runspec.common_system_prompt([ex.prompt_messages for ex in evalset.examples]),
        conversations=tuple(tuple(ex.prompt_messages) for ex in evalset.examples),
    )


@dataclass(frozen=True)
class Shipped:
    """A target's bundle, whether every shipped artifact met its budgets, and the line that says why not."""

    target: targets.TargetProfile
    bundle: Path
    passed: bool
    failure: str | None


def ship(
    run: Run,
    target: targets.TargetProfile,
    facts: bundle.BuildFacts,
    judged: Judged,
    benched: Benched,
    merged: Merged,
) -> Shipped:
    """Write a target's bundle; with a shipped artifact over its budget (and --fail-on-drift) it is written as
    TARGET.rejected and `failure` says why, in one line."""
    results = list(benched.results)
    failed = [
        f"{named(c)}: {v}"
        for c, r in zip(judged.chosen, results, strict=True)
        if c.slot.ship
        for v in r.all_violations
    ]
    if failed and run.cfg.fail_on_drift:
        where = bundle.write_bundle(
            run.cfg.out, target, facts, results, merged.path, name=target.name + targets.REJECTED_SUFFIX
        )
        why = (
            f"drift budget exceeded ({'; '.join(failed)}); report in {where / 'report.md'} "
            "(loosen [budgets] in edgeft.toml or pass --no-fail-on-drift)"
        )
        return Shipped(target, where, False, why)
    return Shipped(
        target, bundle.write_bundle(run.cfg.out, target, facts, results, merged.path), not failed, None
    )


def finish(run: Run, shipped: Sequence[Shipped]) -> None:
    """Fail in one line when a target's bundle was rejected (every target is written first); otherwise remove
    the work unless --keep-work (a failed build keeps it, so the next run resumes instead of redoing it)."""
    failures = [s for s in shipped if s.failure]
    if failures:
        named_ = len(run.targets) > 1
        raise EdgeftError(
            "; ".join(f"{s.target.name}: {s.failure}" if named_ else str(s.failure) for s in failures)
        )
    if not run.cfg.keep_work:
        shutil.rmtree(run.work, ignore_errors=True)
        for t in run.targets:  # the per-target work folders of earlier edgeft versions (OUT/.work/<target>)
            shutil.rmtree(run.work.parent / t.name, ignore_errors=True)
        for path in run.cfg.adapter_data:  # each further task's own (OUT/.work/build-<task>)
            shutil.rmtree(run.work.parent / f"{WORK}-{files.task_name(path.stem)}", ignore_errors=True)
        with contextlib.suppress(OSError):
            run.work.parent.rmdir()  # .work itself, once nothing else is left in it


# --- what the resource checks need ------------------------------------------------------------------------------


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
    params = checkpoint_params(model) if Path(model).is_dir() else None
    return (params or 0) * 28 + (64 << 20)


def _training_ram(model: str) -> int:
    """A floor for LoRA training's memory: the weights in float32 plus a third for activations and state."""
    folder = Path(model)
    if not folder.is_dir():
        return 0
    size = _weights_bytes(model)
    scale = 1 if checkpoint_dtype(folder) == "float32" else 2
    return int(size * scale * 4 / 3)
