"""Build settings: `edgeft.toml` in the working directory, overridden by command-line flags.

edgeft.toml (every key optional):

    model = "Qwen/Qwen2.5-0.5B-Instruct"             # HF dir or hub id; default: the built-in demo model
    data = "data/commands.jsonl"                     # default: the built-in demo dataset
    target = "raspberrypi"                           # profile name or path to a TOML profile
    out = "dist"
    fail_on_drift = true
    strict = false                                   # true: an artifact over the RAM budget stops the build
    threads = 4                                      # CPU threads for verify and bench
    [lora]                                           # any field of LoraSettings below
    r = 16
    epochs = 3
    [budgets.q4_0]                                   # tighten/loosen a target's drift budget per quant
    kld_mean = 0.05

Every value is type- and range-checked here, before any stage runs, so a typo is one line naming the file
and field. `trust_remote_code` is refused in the file: running a checkpoint's own Python code is asked for
on the command line only (--trust-remote-code), never by a config file that came with a project.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft import formats
from edgeft.constants import CONFIG_FILE
from edgeft.errors import EdgeftError
from edgeft.targets import (
    MAX_THREADS,
    ArtifactSpec,
    TargetProfile,
    available,
    expect_int,
    expect_number,
    expect_table,
    parse_budget,
    read_toml_file,
    refuse_unknown,
    show,
)

# `--target all` (or target = "all" in edgeft.toml): every profile edgeft ships, one bundle each.
ALL_TARGETS = "all"

# Attention and MLP projections of Llama/Mistral/Qwen/Gemma-style models, and Phi-3's fused qkv/gate_up;
# finetune keeps the ones a model has.
DEFAULT_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA and training hyper-parameters.

    `lr` and `epochs` None: chosen for the model's size (`auto_lr`, `auto_epochs`). Training runs up to
    `epochs` and stops early once the loss on `validation` examples held back from the training split (never
    the eval split) has not improved for `patience` evaluations (four a epoch); the best evaluated state is
    kept. On the shipped demo (4.2M parameters, 1080 short examples) that is lr 4e-3 for up to 4 epochs; on
    SmolLM2-135M 1e-3 for up to one.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lr: float | None = None
    epochs: float | None = None
    batch_size: int = 16
    grad_accum: int = 1
    max_len: int = 256
    eval_fraction: float = 0.1
    max_eval: int | None = 200
    seed: int = 0
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    scheduler: str = "linear"
    max_steps: int = -1  # > 0 overrides epochs (tests, smoke runs)
    logging_steps: int = 10
    validation: int = 32  # training examples held back to stop early on (0, or too few: no early stop)
    patience: int = 2  # evaluations without improvement before stopping (0: train every epoch)

    def __post_init__(self) -> None:
        bad = [
            f"lora.{name} = {show(getattr(self, name))} should be {want}"
            for name, (ok, want) in LORA_RULES.items()
            if not _holds(ok, getattr(self, name))
        ]
        if bad:
            raise EdgeftError("; ".join(bad))


# How the model is fine-tuned: LoRA adapters merged afterwards (the default), or every weight updated.
FINETUNE_METHODS = ("lora", "full")
# Full fine-tuning's learning rate unless [finetune] lr says otherwise (None: auto_lr): updating every
# weight wants a far smaller step than LoRA's low-rank updates (LoraSettings.lr).
FULL_LR: float | None = None

# Learning rates that measured well, by parameter count: LoRA (r 16, batch 16) on the 4.2M demo 4e-3 and on
# SmolLM2-135M 1e-3 (bench/finetune_lr.py); between and beyond them a power law through both points,
# clamped to the ends of the range LoRA is used with (ref: Hu et al. 2021 "LoRA", appendix D: 2e-4 .. 2e-2;
# Dettmers et al. 2023 "QLoRA": 1e-4 .. 2e-4 at 7B-65B).
LORA_LR_ANCHORS = ((4.2e6, 4e-3), (1.35e8, 1e-3))
LORA_LR_RANGE = (1e-4, 1e-2)
# Full fine-tuning on the demo measured 3e-4 → 87.5 % and 1e-3 → 99.2 % held out (bench/finetune_methods.py):
# its rate is LoRA's scaled by this factor (3e-4 / 4e-3 at the demo; at 135M 7.5e-5, within the 1e-5 .. 1e-4
# usually used to fully fine-tune 100M+ models — not measured here).
FULL_LR_FACTOR = 3e-4 / 4e-3


# At most this many epochs, by parameter count: the 4.2M demo (a weak base) needs 4 to learn the task
# (96.7% held-out exact match at 4 and at 5 epochs); SmolLM2-135M reaches 99% within one
# (bench/finetune_lr.py). A power law through both points, clamped to [1, 4]: a bigger pretrained model
# needs fewer passes over the same data.
EPOCH_ANCHORS = ((4.2e6, 4.0), (1.35e8, 1.0))


def auto_epochs(params: int) -> float:
    """The most epochs to train a model of `params` parameters for when none is set (EPOCH_ANCHORS)."""
    (p0, e0), (p1, e1) = EPOCH_ANCHORS
    slope = math.log(e1 / e0) / math.log(p1 / p0)
    return float(f"{min(max(e0 * (max(params, 1) / p0) ** slope, e1), e0):.2g}")


def auto_lr(params: int, method: str = "lora") -> float:
    """The learning rate for a model of `params` parameters when none is set (see LORA_LR_ANCHORS)."""
    (p0, lr0), (p1, lr1) = LORA_LR_ANCHORS
    slope = math.log(lr1 / lr0) / math.log(p1 / p0)
    lr = lr0 * (max(params, 1) / p0) ** slope
    lr = min(max(lr, LORA_LR_RANGE[0]), LORA_LR_RANGE[1])
    return float(f"{lr * (FULL_LR_FACTOR if method == 'full' else 1):.2g}")


# Transformers schedulers that need no extra arguments (reduce_lr_on_plateau needs an eval metric,
# *_min_lr and warmup_stable_decay need scheduler kwargs edgeft does not pass).
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
MAX_INT = 2**31 - 1


def _int(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _num(ok: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda v: (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(float(v))
    )


def _modules(v: Any) -> bool:
    return (
        isinstance(v, tuple)
        and 0 < len(v) <= 256
        and all(isinstance(m, str) and re.fullmatch(r"[A-Za-z0-9_.]{1,200}", m) for m in v)
    )


def _holds(ok: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(ok(value))
    except (TypeError, ValueError, OverflowError):
        return False


# Field → (check, what it should be). Upper bounds are generous; they catch typos, not choices.
LORA_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (_int(1, 4096), "an integer from 1 to 4096"),
    "alpha": (_int(1, 65536), "an integer from 1 to 65536"),
    "dropout": (_num(lambda v: 0 <= v < 1), "a finite number >= 0 and < 1"),
    "target_modules": (_modules, "a list of 1-256 module names (letters, digits, _ and .)"),
    "lr": (lambda v: v is None or _num(lambda x: 0 < x <= 10)(v), "a finite number > 0 and <= 10"),
    "epochs": (lambda v: v is None or _num(lambda x: 0 < x <= 10000)(v), "a finite number > 0 and <= 10000"),
    "batch_size": (_int(1, 65536), "an integer from 1 to 65536"),
    "grad_accum": (_int(1, 65536), "an integer from 1 to 65536"),
    "max_len": (_int(8, 1 << 20), f"an integer from 8 to {1 << 20}"),
    "eval_fraction": (_num(lambda v: 0 <= v < 1), "a finite number >= 0 and < 1"),
    "max_eval": (lambda v: v is None or _int(0, MAX_INT)(v), f"an integer from 0 to {MAX_INT}"),
    "seed": (_int(0, 2**32 - 1), f"an integer from 0 to {2**32 - 1}"),
    "warmup_ratio": (_num(lambda v: 0 <= v < 1), "a finite number >= 0 and < 1"),
    "weight_decay": (_num(lambda v: 0 <= v <= 10), "a finite number from 0 to 10"),
    "scheduler": (lambda v: v in SCHEDULERS, f"one of {', '.join(SCHEDULERS)}"),
    "max_steps": (_int(-1, MAX_INT), f"an integer from -1 to {MAX_INT} (<= 0: train for epochs)"),
    "logging_steps": (_int(1, MAX_INT), f"an integer from 1 to {MAX_INT}"),
    "validation": (_int(0, 1 << 20), f"an integer from 0 to {1 << 20}"),
    "patience": (_int(0, 1000), "an integer from 0 to 1000"),
}

MAX_PATH = 4096
# A [budgets.X] key: a quant name (every artifact of it) or an artifact label (gguf-q4_0, onnx-int8-acc4).
BUDGET_KEY = re.compile(rf"(?:(?:{'|'.join(formats.names())})-)?[a-z0-9_]+(?:-acc\d)?")
BUDGET_QUANTS = frozenset(q for f in formats.EXPORT_FORMATS.values() for q in f.quants)


KNOWN_KEYS = {
    "model",
    "data",
    "target",
    "out",
    "fail_on_drift",
    "strict",
    "threads",
    "lora",
    "budgets",
    "search",
    "finetune",
    "adapter",
}


@dataclass(frozen=True)
class BuildConfig:
    """Everything `edgeft build` needs, resolved from defaults, edgeft.toml and flags."""

    # the target profiles (names or .toml paths), each its own bundle from one fine-tune (edgeft.pipeline)
    targets: tuple[str, ...]
    model: str | None = None
    data: Path | None = None
    out: Path = Path("dist")
    lora: LoraSettings = field(default_factory=LoraSettings)
    budgets: dict[str, dict[str, float]] = field(default_factory=dict)
    fail_on_drift: bool = True
    trust_remote_code: bool = False  # only from --trust-remote-code, never from edgeft.toml
    allow_pickle: bool = False  # only from --allow-pickle: convert pickle-only weights (weights-only loader)
    threads: int | None = None
    keep_work: bool = False  # keep OUT/.work after a successful build (it is kept after a failure)
    # an artifact that cannot fit the profile's RAM budget stops the build (default: skipped with its reason)
    strict: bool = False
    # choose each slot's artifact among the profile's candidates (edgeft.search); false: the slot's own quant
    search: bool = True
    # measure every candidate in full (no early stops; the same choice, a slower build, every number whole)
    exhaustive: bool = False
    # --max-kld / --min-task-accuracy / --max-size: limits on every shipped artifact, over the profile's
    limits: dict[str, float] = field(default_factory=dict)
    # [finetune] method / --method: "lora" (adapters, merged) or "full" (every weight; no merge stage)
    method: str = "lora"
    full_lr: float | None = FULL_LR  # [finetune] lr: the learning rate of full fine-tuning (None: auto_lr)
    # --adapter / adapter = true: slots whose format runs a LoRA adapter on a quantized base ship base + adapter
    adapter: bool = False
    # further --data sets: each fine-tuned into its own adapter over the same base (needs adapter)
    adapter_data: tuple[Path, ...] = ()


def read_toml(path: Path) -> dict[str, Any]:
    """Parse and type-check edgeft.toml; unknown keys are errors (a typo should not be silently ignored)."""
    data = read_toml_file(path)
    where = str(path)
    if "trust_remote_code" in data:
        raise EdgeftError(
            f"{where}: trust_remote_code is not read from {CONFIG_FILE} (a config file must not turn on running "
            "a checkpoint's code); remove it and pass --trust-remote-code if you trust the model"
        )
    refuse_unknown(data, KNOWN_KEYS, where)
    for key in ("model", "data", "out"):
        if key in data:
            _path_text(data[key], f"{where}: {key}")
    if "target" in data:  # one profile, or a list of them
        names = data["target"] if isinstance(data["target"], list) else [data["target"]]
        if not names:
            raise EdgeftError(f"{where}: target = [] names no profile")
        for name in names:
            _path_text(name, f"{where}: target")
    for key in ("fail_on_drift", "strict", "search", "adapter"):
        if key in data and not isinstance(data[key], bool):
            raise EdgeftError(f"{where}: {key} = {show(data[key])} should be true or false")
    if "threads" in data:
        expect_int(data["threads"], f"{where}: threads", 1, MAX_THREADS)
    if "lora" in data:
        expect_table(data["lora"], f"{where}: lora", "[lora] with LoRA settings such as r = 16")
    if "finetune" in data:
        finetune_settings(data["finetune"], where)
    if "budgets" in data:
        budgets = expect_table(data["budgets"], f"{where}: budgets", "[budgets.<quant>] tables")
        for quant, table in budgets.items():
            _budget_key(quant, f"{where}: budgets")
            parse_budget(table, f"{where}: budgets.{quant}")
    return data


def _path_text(value: Any, where: str) -> str:
    """A model id, file or folder name: a non-empty one-line string."""
    if not isinstance(value, str) or not value or len(value) > MAX_PATH or not value.isprintable():
        raise EdgeftError(f"{where} = {show(value)} should be a non-empty one-line string (a name or path)")
    return value


def _budget_key(key: str, where: str) -> None:
    """[budgets.X]: X names a quant or an artifact label, so a typo cannot silently budget nothing."""
    match = BUDGET_KEY.fullmatch(key)
    quant = key.split("-")[1] if match and "-" in key else key
    if not match or quant not in BUDGET_QUANTS:
        raise EdgeftError(
            f"{where}: unknown quant {show(key)} (known: {', '.join(sorted(BUDGET_QUANTS))}, "
            "or an artifact label such as gguf-q4_0 or onnx-int8-acc4)"
        )


FLOAT_SETTINGS = {f.name for f in dataclasses.fields(LoraSettings) if "float" in str(f.type)}


def lora_settings(table: Any, where: str) -> LoraSettings:
    """Validate a [lora] table against LoraSettings' fields, types and ranges."""
    known = {f.name: f for f in dataclasses.fields(LoraSettings)}
    table = expect_table(table, f"{where}: lora", "[lora] with LoRA settings such as r = 16")
    refuse_unknown(table, known, where, "LoRA setting")
    defaults = LoraSettings()
    values = {}
    for key, value in table.items():
        default = getattr(defaults, key)
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if key in FLOAT_SETTINGS and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[key] = value
    try:
        return dataclasses.replace(defaults, **values)
    except EdgeftError as exc:
        raise EdgeftError(f"{where}: {exc}") from None


def finetune_settings(table: Any, where: str) -> tuple[str, float | None]:
    """The [finetune] table → (method, full fine-tuning's lr); one line per bad key or value."""
    table = expect_table(table, f"{where}: finetune", '[finetune] with method = "lora" or "full"')
    refuse_unknown(table, {"method", "lr"}, where, "finetune setting")
    method = table.get("method", "lora")
    check_method(method, f"{where}: finetune.method")
    lr = table.get("lr", FULL_LR)
    if "lr" in table and method != "full":
        raise EdgeftError(
            f"{where}: finetune.lr is full fine-tuning's learning rate, but method is {method!r}; LoRA's is "
            "[lora] lr"
        )
    if lr is None:
        return method, None
    if not _num(lambda v: 0 < v <= 10)(lr):
        raise EdgeftError(f"{where}: finetune.lr = {show(lr)} should be a finite number > 0 and <= 10")
    return method, float(lr)


def check_method(method: Any, where: str) -> str:
    """`method` if it is one of FINETUNE_METHODS, else one line naming the choices."""
    if method not in FINETUNE_METHODS:
        raise EdgeftError(f"{where} = {show(method)} should be one of {', '.join(FINETUNE_METHODS)}")
    return str(method)


def resolve(
    *,
    target: str | list[str] | None,
    model: str | None,
    data: Path | None,
    out: Path | None,
    fail_on_drift: bool | None = None,
    threads: int | None = None,
    cwd: Path | None = None,
    strict: bool | None = None,
    search: bool | None = None,
    limits: dict[str, float] | None = None,
    method: str | None = None,
    adapter: bool | None = None,
    adapter_data: tuple[Path, ...] = (),
) -> BuildConfig:
    """Merge edgeft.toml (if present in `cwd`) with flags; flags win."""
    path = Path(cwd or Path.cwd()) / CONFIG_FILE
    raw = read_toml(path) if path.is_file() else {}
    where = str(path)
    if threads is not None:
        expect_int(threads, "--threads", 1, MAX_THREADS)
    target = target or raw.get("target")
    if not target:
        raise EdgeftError(f"no target: pass --target NAME_OR_TOML or set target in {CONFIG_FILE}")
    names = [target] if isinstance(target, str) else list(target)
    if ALL_TARGETS in names:  # every profile edgeft ships
        names = [n for n in names if n != ALL_TARGETS] + available()
    base = path.parent
    data_path = data or (base / raw["data"] if "data" in raw else None)
    budgets = dict(raw.get("budgets", {}))
    toml_method, full_lr = finetune_settings(raw.get("finetune", {}), where)
    return BuildConfig(
        targets=tuple(dict.fromkeys(str(n) for n in names)),
        model=model or raw.get("model"),
        data=Path(data_path) if data_path else None,
        out=Path(out or (base / raw["out"] if "out" in raw else Path("dist"))),
        lora=lora_settings(raw.get("lora", {}), where),
        budgets=budgets,
        fail_on_drift=raw.get("fail_on_drift", True) if fail_on_drift is None else fail_on_drift,
        threads=threads if threads is not None else raw.get("threads"),
        strict=raw.get("strict", False) if strict is None else strict,
        search=raw.get("search", True) if search is None else search,
        limits=_limits(limits or {}),
        method=check_method(method, "--method") if method is not None else toml_method,
        full_lr=full_lr,
        adapter=raw.get("adapter", False) if adapter is None else adapter,
        adapter_data=tuple(Path(p) for p in adapter_data),
    )


# --max-kld, --min-task-accuracy, --max-size: the budget field each sets, and its bounds.
LIMIT_FIELDS = {
    "kld_mean": ("--max-kld", 0.0, None),
    "min_task_accuracy": ("--min-task-accuracy", 0.0, 1.0),
    "max_size_mb": ("--max-size", 0.0, None),
}


def _limits(limits: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, value in limits.items():
        if value is None:
            continue
        flag, lo, hi = LIMIT_FIELDS[key]
        out[key] = expect_number(value, flag, lo, hi)
    return out


def apply_budgets(
    target: TargetProfile, budgets: dict[str, dict[str, float]], limits: dict[str, float] | None = None
) -> TargetProfile:
    """A target with its artifacts' budgets overridden by edgeft.toml's [budgets.<quant>] tables (a search
    slot's label, or each candidate's quant), then by the command line's limits on every shipped artifact."""

    def budgeted(spec: ArtifactSpec, slot: ArtifactSpec) -> ArtifactSpec:
        table = budgets.get(spec.quant) or budgets.get(spec.label) or budgets.get(slot.slot) or {}
        extra = limits if limits and slot.ship else {}
        if not table and not extra:
            return spec
        merged = {k: v for k, v in dataclasses.asdict(spec.budget).items() if v is not None} | table | extra
        return dataclasses.replace(spec, budget=parse_budget(merged, f"budgets.{spec.quant}"))

    arts = []
    for slot in target.artifacts:
        found = tuple(budgeted(c, slot) for c in slot.search)
        arts.append(dataclasses.replace(budgeted(slot, slot), search=found))
    return dataclasses.replace(target, artifacts=tuple(arts))
