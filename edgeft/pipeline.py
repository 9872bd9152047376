"""`edgeft build` as a recipe: the stages in order, each a function of edgeft.stages returning a frozen
result (ref: torchtune's recipes, a list of builder calls read top to bottom)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeft import bundle, stages, targets
from edgeft.builtin import is_builtin, model_source
from edgeft.config import BuildConfig, apply_budgets
from edgeft.demo import DEMO_DATA, DEMO_MODEL
from edgeft.errors import EdgeftError
from edgeft.files import locked
from edgeft.ui import info


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
        return recipe(stages.start(cfg, target, model, data_path))


def recipe(run: stages.Run) -> BuildResult:
    """The stages, in order. The RAM preflight runs before any heavy work where the checkpoint is local (LoRA
    merges in place, so its shapes are the merged model's; a Hub id waits for the merge); every candidate is exported before the float model is held to judge them, and the chosen ones are timed
    alone: at most one model copy besides the float reference is in memory at any step."""
    plan = stages.preflight(run, Path(run.model)) if stages.local_weights(run.model) else None
    tuned = stages.tune(run)
    merged = stages.merge_adapter(run, tuned)
    plan = plan or stages.preflight(run, merged.path)
    evalset = stages.held_out(merged)
    if tuned.reused or merged.reused:
        info(
            f"reusing {', '.join(tuned.reused + merged.reused)} from an earlier run with the same inputs (.work kept)"
        )
    exported = stages.export_all(run, plan, merged, evalset)
    judged = stages.judge(run, merged, evalset, exported)
    benched = stages.bench_chosen(run, merged, judged)
    seconds = stages.total(tuned.seconds, merged.seconds, exported.seconds, judged.seconds, benched.seconds)
    facts = stages.facts(run, tuned, evalset, exported, judged, benched, seconds)
    out, passed = stages.ship(run, facts, judged, benched, merged)
    reused = tuned.reused + merged.reused + exported.reused + judged.reused
    return BuildResult(out, list(benched.results), passed, reused)


def resolve_inputs(cfg: BuildConfig) -> tuple[str, Path]:
    """The model and data to use: the built-in demo when neither is given; a built-in model (builtin:NAME)
    without --data is tuned on the demo's data."""
    if cfg.model and not cfg.data and not is_builtin(cfg.model):
        raise EdgeftError(f"--model {cfg.model} needs --data FILE.jsonl (or data = ... in edgeft.toml)")
    model = model_source(str(cfg.model or DEMO_MODEL), allow_pickle=cfg.allow_pickle)
    return model, Path(cfg.data or DEMO_DATA)
