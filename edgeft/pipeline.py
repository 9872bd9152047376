"""`edgeft build` as a recipe: the stages in order, each a function of edgeft.stages returning a frozen
result (ref: torchtune's recipes, a list of builder calls read top to bottom).

Several targets are built from one fine-tune: the fine-tune, merge, float reference and every distinct
candidate's export and full drift measurement are done once and shared; budgets, RAM fit, the choice and
the bundle are each target's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgeft import bundle, index, search, stages, targets
from edgeft.builtin import is_builtin, model_source
from edgeft.config import BuildConfig, apply_budgets
from edgeft.demo import DEMO_DATA, DEMO_MODEL
from edgeft.errors import EdgeftError
from edgeft.files import locked, task_name
from edgeft.ui import info


@dataclass(frozen=True)
class BuildResult:
    """One target's bundle."""

    target: str
    bundle_dir: Path
    artifacts: list[bundle.ArtifactResult]
    passed: bool
    reused: tuple[str, ...] = ()  # stages taken from an earlier run with the same inputs


@dataclass(frozen=True)
class Built:
    """Every target's bundle, and OUT/index.html when there are several."""

    results: tuple[BuildResult, ...]
    index: Path | None = None
    measured_once: int = 0  # drift measurements one target took from another's instead of running again

    def __iter__(self) -> Iterator[BuildResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)


def build(cfg: BuildConfig) -> Built:
    """Fine-tune, merge, export, verify, bench and bundle for every target, holding `cfg.out` locked."""
    check_tasks(cfg)
    profiles = [apply_budgets(targets.load(name), cfg.budgets, cfg.limits) for name in cfg.targets]
    if cfg.adapter:
        adapted = [targets.with_adapters(p) for p in profiles]
        profiles = [p for p, _ in adapted]
        for line in (line for _, kept in adapted for line in kept):
            info(f"[yellow]{line}[/]")
    if cfg.adapter_data:  # several tasks: only a base + adapter serves them all
        profiles = [targets.adapters_only(p) for p in profiles]
    folders = [p.name.lower() for p in profiles]  # bundle folders; some filesystems ignore case
    clash = sorted({p.name for p in profiles if folders.count(p.name.lower()) > 1})
    if clash:
        raise EdgeftError(
            f"targets {', '.join(clash)} would write the same bundle folder; rename one profile"
        )
    model, data_path = resolve_inputs(cfg)
    with locked(Path(cfg.out)):  # refuses a folder edgeft did not write, and a second build into it
        index.forget(Path(cfg.out))  # an index of an earlier build would describe bundles this one replaces
        return recipe(stages.start(cfg, profiles, model, data_path))


def recipe(run: stages.Run) -> Built:
    """The stages, in order. The RAM preflight runs before any heavy work where the checkpoint is local (LoRA
    merges in place, so its shapes are the merged model's; a Hub id waits for the merge); every candidate is
    exported before the float model is held to judge them, and the chosen ones are timed alone: at most one
    model copy besides the float reference is in memory at any step."""
    plans = stages.preflight(run, Path(run.model)) if stages.local_weights(run.model) else None
    tuned = stages.tune(run)
    merged = stages.merge_adapter(run, tuned)
    plans = plans or stages.preflight(run, merged.path)
    evalset = stages.held_out(merged)
    if tuned.reused or merged.reused:
        info(
            f"reusing {', '.join(tuned.reused + merged.reused)} from an earlier run with the same inputs (.work kept)"
        )
    calibration = stages.Calibration(merged.path, run.data_path, run.cfg, run.work, merged.key)
    exported = {
        t.name: stages.export_all(run, t, plans[t.name], merged, evalset, calibration) for t in run.targets
    }
    ref = stages.reference(run, merged, evalset)
    tasks = [stages.extra_task(run, path) for path in run.cfg.adapter_data]  # one adapter each, one base
    measured, timings = search.Measurements(), stages.Timings()  # shared by the targets
    shipped, results = [], []
    for t in run.targets:
        judged = stages.judge(run, evalset, exported[t.name], ref, measured)
        served = stages.serve_tasks(run, t, judged, ref, tasks, measured)  # every task's adapter, one base
        judged = served.judged
        twins = stages.merged_twins(run, judged, merged, evalset, calibration)
        benched = stages.bench_chosen(run, t, merged, judged, twins, timings, served)
        parts = (
            tuned.seconds,
            merged.seconds,
            exported[t.name].seconds,
            ref.seconds,
            judged.seconds,
            served.seconds,
            twins.seconds,
            benched.seconds,
        )
        facts = stages.facts(
            run, t, tuned, evalset, exported[t.name], ref, judged, benched, stages.total(*parts)
        )
        shipped.append(stages.ship(run, t, facts, judged, benched, merged))
        reused = tuned.reused + merged.reused + exported[t.name].reused + ref.reused
        results.append(
            BuildResult(t.name, shipped[-1].bundle, list(benched.results), shipped[-1].passed, reused)
        )
    where = index.write_index(run.cfg.out, shipped) if len(run.targets) > 1 else None
    stages.finish(run, shipped)
    return Built(tuple(results), where, measured.reused)


def resolve_inputs(cfg: BuildConfig) -> tuple[str, Path]:
    """The model and data to use: the built-in demo when neither is given; a built-in model (builtin:NAME)
    without --data is tuned on the demo's data."""
    if cfg.model and not cfg.data and not is_builtin(cfg.model):
        raise EdgeftError(f"--model {cfg.model} needs --data FILE.jsonl (or data = ... in edgeft.toml)")
    data_path = Path(cfg.data or DEMO_DATA)
    model = model_source(str(cfg.model or DEMO_MODEL), allow_pickle=cfg.allow_pickle)
    return model, data_path


def check_tasks(cfg: BuildConfig) -> None:
    """Several task data sets (one adapter each over a shared base: targets.adapters_only) need distinct file
    names (a task is named after its file), each a file."""
    data_path = Path(cfg.data or DEMO_DATA)
    names = [task_name(p.stem) for p in (data_path, *cfg.adapter_data)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise EdgeftError(
            f"--data: two data sets are named {twice[0]!r} (a task is named after its file); rename one"
        )
    for p in cfg.adapter_data:
        if not p.is_file():
            raise EdgeftError(f"{p}: --data file does not exist")
