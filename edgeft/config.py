"""Build settings: `edgeft.toml` in the working directory, overridden by command-line flags.

edgeft.toml (every key optional):

    model = "Qwen/Qwen2.5-0.5B-Instruct"             # HF dir or hub id; default: the built-in demo model
    data = "data/commands.jsonl"                     # default: the built-in demo dataset
    target = "raspberrypi"                           # profile name or path to a TOML profile
    out = "dist"
    fail_on_drift = true
    trust_remote_code = false
    [lora]                                           # any field of LoraSettings below
    r = 16
    epochs = 3
    [budgets.q4_0]                                   # tighten/loosen a target's drift budget per quant
    kld_mean = 0.05
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .constants import CONFIG_FILE
from .errors import EdgeftError
from .targets import TargetProfile, parse_budget

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

    The defaults are tuned for the shipped demo (a 4.2M-parameter model, 1080 short training examples):
    ~340 steps, ~70 s on 2 CPU cores, ~96% held-out exact match (base: 0%). For bigger models a lower lr
    (1e-4 .. 3e-4) and fewer epochs are the usual choice.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 4e-3
    epochs: float = 5.0
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

    def __post_init__(self) -> None:
        checks = {
            "r": self.r >= 1,
            "alpha": self.alpha > 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "lr": self.lr > 0,
            "epochs": self.epochs > 0,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "max_len": self.max_len >= 8,
            "eval_fraction": 0.0 <= self.eval_fraction < 1.0,
            "warmup_ratio": 0.0 <= self.warmup_ratio < 1.0,
            "target_modules": len(self.target_modules) > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise EdgeftError(
                f"LoRA settings out of range: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}"
            )


KNOWN_KEYS = {
    "model",
    "data",
    "target",
    "out",
    "fail_on_drift",
    "trust_remote_code",
    "threads",
    "lora",
    "budgets",
}


@dataclass(frozen=True)
class BuildConfig:
    """Everything `edgeft build` needs, resolved from defaults, edgeft.toml and flags."""

    target: str
    model: str | None = None
    data: Path | None = None
    out: Path = Path("dist")
    lora: LoraSettings = field(default_factory=LoraSettings)
    budgets: dict[str, dict[str, float]] = field(default_factory=dict)
    fail_on_drift: bool = True
    trust_remote_code: bool = False
    threads: int | None = None


def read_toml(path: Path) -> dict[str, Any]:
    """Parse edgeft.toml; unknown keys are errors (a typo should not be silently ignored)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgeftError(f"{path}: not valid TOML ({exc})") from None
    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise EdgeftError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(KNOWN_KEYS))})"
        )
    return data


def lora_settings(table: dict[str, Any], where: str) -> LoraSettings:
    """Validate a [lora] table against LoraSettings' fields and types."""
    known = {f.name: f for f in dataclasses.fields(LoraSettings)}
    defaults = LoraSettings()
    values = {}
    for key, value in table.items():
        if key not in known:
            raise EdgeftError(f"{where}: unknown LoRA setting '{key}' (known: {', '.join(sorted(known))})")
        default = getattr(defaults, key)
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        ok = (
            value is None
            or default is None
            or isinstance(value, type(default))
            or (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool))
        )
        if not ok:
            raise EdgeftError(f"{where}: lora.{key} = {value!r} should be like {default!r}")
        values[key] = float(value) if isinstance(default, float) else value
    return dataclasses.replace(defaults, **values)


def resolve(
    *,
    target: str | None,
    model: str | None,
    data: Path | None,
    out: Path | None,
    fail_on_drift: bool | None = None,
    threads: int | None = None,
    cwd: Path | None = None,
) -> BuildConfig:
    """Merge edgeft.toml (if present in `cwd`) with flags; flags win."""
    path = Path(cwd or Path.cwd()) / CONFIG_FILE
    raw = read_toml(path) if path.is_file() else {}
    where = str(path)
    target = target or raw.get("target")
    if not target:
        raise EdgeftError(f"no target: pass --target NAME_OR_TOML or set target in {CONFIG_FILE}")
    base = path.parent
    data_path = data or (base / raw["data"] if "data" in raw else None)
    budgets = {}
    for quant, table in raw.get("budgets", {}).items():
        parse_budget(table, f"{where}: budgets.{quant}")
        budgets[quant] = table
    return BuildConfig(
        target=str(target),
        model=model or raw.get("model"),
        data=Path(data_path) if data_path else None,
        out=Path(out or (base / raw["out"] if "out" in raw else Path("dist"))),
        lora=lora_settings(raw.get("lora", {}), where),
        budgets=budgets,
        fail_on_drift=raw.get("fail_on_drift", True) if fail_on_drift is None else fail_on_drift,
        trust_remote_code=bool(raw.get("trust_remote_code", False)),
        threads=threads or raw.get("threads"),
    )


def apply_budgets(target: TargetProfile, budgets: dict[str, dict[str, float]]) -> TargetProfile:
    """A target with its artifacts' budgets overridden by edgeft.toml's [budgets.<quant>] tables."""
    arts = []
    for spec in target.artifacts:
        table = budgets.get(spec.quant) or budgets.get(spec.label)
        if table:
            merged = {k: v for k, v in dataclasses.asdict(spec.budget).items() if v is not None} | table
            spec = dataclasses.replace(spec, budget=parse_budget(merged, f"budgets.{spec.quant}"))
        arts.append(spec)
    return dataclasses.replace(target, artifacts=tuple(arts))
