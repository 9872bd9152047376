"""Target device profiles: TOML data in `targets/`, validated into frozen dataclasses.

A profile says what the device is (threads, RAM, memory bandwidth), which artifacts to build for it and
how much drift each may show. `--target` takes a profile name or a path to a TOML file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .constants import (
    BUDGET_KINDS,
    FORMAT_GGUF,
    FORMAT_ONNX,
    FORMATS,
    GGUF_QUANTS,
    ONNX_ACCURACY_LEVELS,
    ONNX_FLOAT_QUANTS,
    ONNX_QUANTS,
)
from .errors import EdgeftError

QUANTS_BY_FORMAT: dict[str, tuple[str, ...]] = {FORMAT_GGUF: GGUF_QUANTS, FORMAT_ONNX: ONNX_QUANTS}


@dataclass(frozen=True)
class DriftBudget:
    """Limits on drift against the float model; None means unchecked."""

    kld_mean: float | None = None
    kld_p99: float | None = None
    top1: float | None = None
    ppl_ratio: float | None = None
    task_accuracy_drop: float | None = None
    # The app path: a tokenization or template difference fails the build unless a profile loosens it.
    prompt_ids_match: float | None = 1.0
    answers_match: float | None = None

    def violations(self, drift: dict[str, float | None], reference_accuracy: float | None) -> list[str]:
        """One line per exceeded limit, naming metric, value and budget."""
        values = dict(drift)
        acc = drift.get("task_accuracy")
        values["task_accuracy_drop"] = (
            None if acc is None or reference_accuracy is None else reference_accuracy - acc
        )
        out = []
        for name, kind in BUDGET_KINDS.items():
            limit, value = getattr(self, name), values.get(name)
            if limit is None or value is None:
                continue
            bad = value > limit if kind == "max" else value < limit
            if bad or value != value:  # NaN always fails
                sign = "<=" if kind == "max" else ">="
                out.append(f"{name} = {value:.4g}, budget {sign} {limit:g}")
        return out


@dataclass(frozen=True)
class ArtifactSpec:
    """One artifact to build for a target: a format, a quant and its drift budget.

    `accuracy_level` (ONNX int quants) is MatMulNBits' activation precision: 4 = int8 (fast), 1 = fp32.
    `ship = false` builds, verifies and benches it for the report only, so a user sees the trade-off.
    """

    format: str
    quant: str
    budget: DriftBudget = DriftBudget()
    accuracy_level: int | None = None
    ship: bool = True

    @property
    def label(self) -> str:
        level = f"-acc{self.accuracy_level}" if self.accuracy_level is not None else ""
        return f"{self.format}-{self.quant}{level}"


@dataclass(frozen=True)
class TargetProfile:
    """A device: what it has, and what to ship to it."""

    name: str
    description: str
    arch: str
    threads: int
    ram_mb: int
    ram_budget_mb: int
    context_length: int
    bandwidth_gb_s: float
    artifacts: tuple[ArtifactSpec, ...]

    def summary(self) -> str:
        """One line with the key facts, for `edgeft targets`."""
        arts = ", ".join(a.label + ("" if a.ship else " (compare)") for a in self.artifacts)
        return (
            f"{self.name:<14} {self.description} | {self.threads} threads, RAM budget {self.ram_budget_mb} MB "
            f"at ctx {self.context_length}, ~{self.bandwidth_gb_s:g} GB/s | {arts}"
        )


def profiles_dir() -> Path:
    """Where the shipped profiles live: inside the installed package, or `targets/` in a source checkout."""
    installed = resources.files("edgeft") / "targets"
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parent.parent / "targets"


def available() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def _expect(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in table:
        raise EdgeftError(f"{where}: missing field '{key}'")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise EdgeftError(f"{where}: field '{key}' = {value!r} should be a {want}")
    return value


def parse_budget(table: dict[str, Any], where: str) -> DriftBudget:
    """Validate a [budget] table: known metric names, non-negative numbers."""
    known = {f.name for f in fields(DriftBudget)}
    for key, value in table.items():
        if key not in known:
            raise EdgeftError(f"{where}: unknown budget '{key}' (known: {', '.join(sorted(known))})")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise EdgeftError(f"{where}: budget '{key}' = {value!r} should be a number >= 0")
    return DriftBudget(**{k: float(v) for k, v in table.items()})


def parse_profile(data: dict[str, Any], source: str) -> TargetProfile:
    """Validate one profile's TOML table into a TargetProfile; errors name the file and field."""
    arts = []
    raw_arts = data.get("artifacts")
    if not isinstance(raw_arts, list) or not raw_arts:
        raise EdgeftError(f"{source}: needs at least one [[artifacts]] table with format and quant")
    for i, art in enumerate(raw_arts):
        where = f"{source}: artifacts[{i}]"
        fmt = _expect(art, "format", str, where)
        if fmt not in QUANTS_BY_FORMAT:
            raise EdgeftError(f"{where}: unknown format '{fmt}' (known: {', '.join(FORMATS)})")
        quant = _expect(art, "quant", str, where)
        if quant not in QUANTS_BY_FORMAT[fmt]:
            raise EdgeftError(
                f"{where}: unknown {fmt} quant '{quant}' (known: {', '.join(QUANTS_BY_FORMAT[fmt])})"
            )
        level = art.get("accuracy_level")
        if level is not None and (fmt != FORMAT_ONNX or quant in ONNX_FLOAT_QUANTS):
            raise EdgeftError(f"{where}: accuracy_level applies to onnx int8/int4 only, not {fmt} {quant}")
        if level is not None and level not in ONNX_ACCURACY_LEVELS:
            raise EdgeftError(
                f"{where}: accuracy_level = {level!r} (known: {', '.join(map(str, ONNX_ACCURACY_LEVELS))})"
            )
        ship = art.get("ship", True)
        if not isinstance(ship, bool):
            raise EdgeftError(f"{where}: ship = {ship!r} should be true or false")
        budget = parse_budget(art.get("budget", {}), f"{where}.budget")
        arts.append(ArtifactSpec(fmt, quant, budget, level, ship))
    labels = [a.label for a in arts]
    if len(set(labels)) != len(labels):
        raise EdgeftError(f"{source}: artifacts repeat a format/quant pair: {', '.join(labels)}")
    shipped = [(a.format, a.quant) for a in arts if a.ship]
    if not shipped:
        raise EdgeftError(f"{source}: every artifact has ship = false; ship at least one")
    if len(set(shipped)) != len(shipped):
        raise EdgeftError(
            f"{source}: two shipped artifacts share a format and quant; set ship = false on one"
        )
    profile = TargetProfile(
        name=_expect(data, "name", str, source),
        description=str(data.get("description", "")),
        arch=str(data.get("arch", "native")),
        threads=_expect(data, "threads", int, source),
        ram_mb=_expect(data, "ram_mb", int, source),
        ram_budget_mb=_expect(data, "ram_budget_mb", int, source),
        context_length=_expect(data, "context_length", int, source),
        bandwidth_gb_s=float(_expect(data, "bandwidth_gb_s", (int, float), source)),
        artifacts=tuple(arts),
    )
    for key in ("threads", "ram_mb", "ram_budget_mb", "context_length"):
        if getattr(profile, key) <= 0:
            raise EdgeftError(f"{source}: field '{key}' must be > 0")
    if profile.ram_budget_mb > profile.ram_mb:
        raise EdgeftError(
            f"{source}: ram_budget_mb ({profile.ram_budget_mb}) exceeds ram_mb ({profile.ram_mb})"
        )
    return profile


def load(name_or_path: str | Path) -> TargetProfile:
    """Load a shipped profile by name, or a TOML file by path."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".toml") or path.is_file()):
        path = profiles_dir() / f"{text}.toml"
        if not path.is_file():
            raise EdgeftError(
                f"unknown target '{text}' (available: {', '.join(available())}, or a .toml path)"
            )
    if not path.is_file():
        raise EdgeftError(f"target file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgeftError(f"{path}: not valid TOML ({exc})") from None
    return parse_profile(data, str(path))


def load_all() -> list[TargetProfile]:
    """Every shipped profile, validated."""
    return [load(name) for name in available()]
