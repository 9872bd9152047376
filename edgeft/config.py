"""Build settings: `edgeft.toml` in the working directory, overridden by command-line flags.

edgeft.toml (every key optional):

    model = "HuggingFaceTB/SmolLM2-135M-Instruct"   # HF dir or hub id; default: the built-in demo model
    data = "data/commands.jsonl"                     # default: the built-in demo dataset
    target = "raspberrypi"                           # profile name or path to a TOML profile
    out = "dist"
    fail_on_drift = true
    trust_remote_code = false
    [lora]                                           # any field of edgeft.finetune.LoraSettings
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
from .finetune import LoraSettings
from .targets import TargetProfile, parse_budget

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
    source: str = "flags"

    @property
    def is_demo(self) -> bool:
        return self.model is None and self.data is None


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
        source=where if raw else "flags",
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
