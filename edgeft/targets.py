"""Target device profiles: TOML data in `targets/`, validated into frozen dataclasses.

A profile says what the device is (threads, RAM, memory bandwidth), which artifacts to build for it and
how much drift each may show. `--target` takes a profile name or a path to a TOML file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from edgeft import formats
from edgeft.constants import BUDGET_KINDS
from edgeft.errors import EdgeftError, show
from edgeft.spec import ArtifactSpec, DriftBudget
from edgeft.ui import info


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
    # CPU features the runtimes' fast kernels need (llama.cpp ggml-cpu, onnxruntime MLAS), and how to get
    # builds that use them; empty for `host` (whatever this machine has).
    isa: tuple[str, ...] = ()
    notes: str = ""

    def summary(self) -> str:
        """One line with the key facts, for `edgeft targets`."""
        arts = ", ".join(a.label + ("" if a.ship else " (compare)") for a in self.artifacts)
        isa = f" | {'+'.join(self.isa)}" if self.isa else ""
        return (
            f"{self.name:<16} {self.description} | {self.threads} threads, RAM budget {self.ram_budget_mb} MB "
            f"at ctx {self.context_length}, ~{self.bandwidth_gb_s:g} GB/s{isa} | {arts}"
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


# A profile's name becomes a directory (OUT/<name>/): one plain path component, not
# hidden, not "." or "..", short enough for any filesystem.
# A bundle whose shipped artifact is over budget is written as OUT/<name>.rejected (edgeft.stages.ship).
REJECTED_SUFFIX = ".rejected"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
PROFILE_KEYS = (
    "name",
    "description",
    "arch",
    "threads",
    "ram_mb",
    "ram_budget_mb",
    "context_length",
    "bandwidth_gb_s",
    "artifacts",
    "isa",
    "notes",
)
# CPU features that select kernels in llama.cpp (ggml-cpu: GGML_CPU_ARM_ARCH / GGML_AVX2, GGML_AVX512, ...)
# and onnxruntime's MLAS; an unknown name is a typo, refused with this list.
ISA_FEATURES = (
    "neon",
    "fp16",
    "dotprod",
    "i8mm",
    "sve",
    "sve2",
    "sme",
    "sse4.2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx",
)
MAX_NOTES = 600  # a few sentences: which llama.cpp build flags / wheels reach the ISA
# Keys of every [[artifacts]] table; a format adds its own options (Format.option_keys).
ARTIFACT_KEYS = ("format", "quant", "ship", "budget", "search", *formats.option_keys())
# Generous upper bounds: far past any real device, there so a typo is refused here, not a crash later.
MAX_THREADS = 1024
INT_BOUNDS = {
    "threads": (1, MAX_THREADS),
    "ram_mb": (1, 1 << 24),
    "ram_budget_mb": (1, 1 << 24),
    "context_length": (1, 1 << 24),
}
MAX_BANDWIDTH_GB_S = 100_000.0
MAX_TEXT = 200  # description/arch: one short line in `edgeft targets` and the report


def expect_int(value: Any, where: str, lo: int, hi: int) -> int:
    """`value` as an int in lo..hi (booleans refused); `where` names file and field."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise EdgeftError(f"{where} = {show(value)} should be an integer from {lo} to {hi}")
    return value


def expect_number(
    value: Any, where: str, lo: float, hi: float | None = None, *, above: bool = False
) -> float:
    """`value` as a finite float >= lo (> lo when `above`) and <= hi; NaN/inf and booleans refused.

    NaN compares false with everything, so a NaN limit would silently switch a check off."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        number = float(value)
        ok = (
            math.isfinite(number)
            and (number > lo if above else number >= lo)
            and (hi is None or number <= hi)
        )
    if not ok:
        bound = f"> {lo:g}" if above else f">= {lo:g}"
        rng = f"from {lo:g} to {hi:g}" if hi is not None and not above else bound
        if hi is not None and above:
            rng += f" and <= {hi:g}"
        raise EdgeftError(f"{where} = {show(value)} should be a finite number {rng}")
    return number


def expect_table(value: Any, where: str, what: str) -> dict[str, Any]:
    """`value` as a TOML table; `what` says what the table should hold."""
    if not isinstance(value, dict):
        raise EdgeftError(f"{where} = {show(value)} should be a table ({what})")
    return value


def refuse_unknown(table: dict[str, Any], known: Any, where: str, what: str = "key") -> None:
    """An unknown key is a typo until proven otherwise: refuse it, listing the known ones."""
    unknown = [k for k in table if k not in known]
    if unknown:
        raise EdgeftError(
            f"{where}: unknown {what}(s) {', '.join(show(k) for k in sorted(unknown))} "
            f"(known: {', '.join(sorted(known))})"
        )


def _required(table: dict[str, Any], key: str, where: str) -> Any:
    if key not in table:
        raise EdgeftError(f"{where}: missing field '{key}'")
    return table[key]


def _expect(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = _required(table, key, where)
    if not isinstance(value, kind) or isinstance(value, bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise EdgeftError(f"{where}: field '{key}' = {show(value)} should be a {want}")
    return value


def _text(table: dict[str, Any], key: str, default: str, where: str) -> str:
    """An optional one-line string field."""
    value = table.get(key, default)
    if not isinstance(value, str) or len(value) > MAX_TEXT or not value.isprintable():
        raise EdgeftError(
            f"{where}: field '{key}' = {show(value)} should be a one-line string of at most {MAX_TEXT} characters"
        )
    return value


def parse_isa(value: Any, where: str) -> tuple[str, ...]:
    """`isa = ["neon", "dotprod"]`: known feature names, each once."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EdgeftError(f"{where}: isa = {show(value)} should be a list of CPU feature names")
    unknown = [v for v in value if v not in ISA_FEATURES]
    if unknown:
        raise EdgeftError(
            f"{where}: unknown isa feature(s) {', '.join(show(v) for v in unknown)} "
            f"(known: {', '.join(ISA_FEATURES)})"
        )
    if len(set(value)) != len(value):
        raise EdgeftError(f"{where}: isa = {show(value)} names a feature twice")
    return tuple(value)


def _notes(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_NOTES or not value.replace("\n", " ").isprintable():
        raise EdgeftError(
            f"{where}: notes = {show(value)} should be a string of at most {MAX_NOTES} characters"
        )
    return " ".join(value.split())


def check_name(value: Any, where: str) -> str:
    """A target name: it becomes a directory name, so one plain path component."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise EdgeftError(
            f"{where}: name = {show(value)} should be 1-64 of A-Z a-z 0-9 . _ - not starting with '.' "
            "(it becomes the bundle's directory name)"
        )
    if value.lower().endswith(REJECTED_SUFFIX):
        raise EdgeftError(
            f"{where}: name = {show(value)} ends in {REJECTED_SUFFIX}, the folder of a rejected bundle"
        )
    return value


def parse_budget(table: Any, where: str) -> DriftBudget:
    """Validate a [budget] table: known metric names, finite numbers >= 0 (shares of 0..1 for the `min` kinds)."""
    known = {f.name for f in fields(DriftBudget)}
    table = expect_table(table, where, f"metric = number, known metrics: {', '.join(sorted(known))}")
    refuse_unknown(table, known, where, "budget")
    values = {}
    for key, value in table.items():
        hi = 1.0 if BUDGET_KINDS.get(key) == "min" else None
        values[key] = expect_number(value, f"{where}: budget '{key}'", 0.0, hi)
    return DriftBudget(**values)


def _parse_artifact(art: Any, where: str) -> ArtifactSpec:
    """One [[artifacts]] table: the keys every format has here, its own options checked by the format."""
    art = expect_table(art, where, "an [[artifacts]] table with format and quant")
    refuse_unknown(art, ARTIFACT_KEYS, where)
    name = _expect(art, "format", str, where)
    if name not in formats.names():
        raise EdgeftError(f"{where}: unknown format {show(name)} (known: {', '.join(formats.names())})")
    fmt = formats.get(name)
    quant = _expect(art, "quant", str, where)
    if quant not in fmt.quants:
        raise EdgeftError(f"{where}: unknown {name} quant {show(quant)} (known: {', '.join(fmt.quants)})")
    for key in formats.option_keys():  # an option another format takes, set to something, is a mistake
        if key in art and key not in fmt.option_keys and art[key] not in (False, [], ""):
            if key in fmt.declined:
                raise EdgeftError(f"{where}: {key} is not offered for {name}: {fmt.declined[key]}")
            raise EdgeftError(f"{where}: {key} applies to {formats.owners(key)} only, not {name}")
    ship = art.get("ship", True)
    if not isinstance(ship, bool):
        raise EdgeftError(f"{where}: ship = {show(ship)} should be true or false")
    budget = parse_budget(art.get("budget", {}), f"{where}.budget")
    search = _quant_list(art.get("search", []), fmt.quants, name, f"{where}: search")
    return fmt.parse_slot(art, ArtifactSpec(name, quant, budget, ship=ship), search, where)


def _quant_list(value: Any, known: tuple[str, ...], name: str, where: str) -> list[str]:
    """A list of known quant names of format `name`, each once."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EdgeftError(f"{where} = {show(value)} should be a list of {name} quant names")
    unknown = [v for v in value if v not in known]
    if unknown:
        raise EdgeftError(
            f"{where}: unknown {name} quant(s) {', '.join(show(v) for v in unknown)} (known: {', '.join(known)})"
        )
    if len(set(value)) != len(value):
        raise EdgeftError(f"{where} = {show(value)} names a quant twice")
    return list(value)


def parse_profile(data: Any, source: str) -> TargetProfile:
    """Validate one profile's TOML table into a TargetProfile; errors name the file and field."""
    data = expect_table(data, source, "a target profile")
    refuse_unknown(data, PROFILE_KEYS, source)
    name = check_name(_expect(data, "name", str, source), source)
    raw_arts = data.get("artifacts")
    if not isinstance(raw_arts, list) or not raw_arts:
        raise EdgeftError(f"{source}: needs at least one [[artifacts]] table with format and quant")
    arts = [_parse_artifact(art, f"{source}: artifacts[{i}]") for i, art in enumerate(raw_arts)]
    labels = [a.slot for a in arts]
    if len(set(labels)) != len(labels):
        raise EdgeftError(f"{source}: artifacts repeat a format/quant pair: {', '.join(labels)}")
    # two shipped slots could choose files of one name in the bundle: their candidates must differ
    per_slot = [{(c.format, c.quant, c.head_type, c.adapter) for c in (*a.search, a)} for a in arts if a.ship]
    names = [name for slot in per_slot for name in slot]
    if len(set(names)) != len(names):
        raise EdgeftError(
            f"{source}: two shipped artifacts could be the same {names[0][0]} file; set ship = false on one or split their search lists"
        )
    shipped = [(a.format, a.quant, a.adapter) for a in arts if a.ship]
    if not shipped:
        raise EdgeftError(f"{source}: every artifact has ship = false; ship at least one")
    if len(set(shipped)) != len(shipped):
        raise EdgeftError(
            f"{source}: two shipped artifacts share a format and quant; set ship = false on one"
        )
    ints = {
        key: expect_int(_required(data, key, source), f"{source}: field '{key}'", lo, hi)
        for key, (lo, hi) in INT_BOUNDS.items()
    }
    bandwidth = expect_number(
        _required(data, "bandwidth_gb_s", source),
        f"{source}: field 'bandwidth_gb_s'",
        0.0,
        MAX_BANDWIDTH_GB_S,
        above=True,
    )
    profile = TargetProfile(
        name=name,
        description=_text(data, "description", "", source),
        arch=_text(data, "arch", "native", source),
        threads=ints["threads"],
        ram_mb=ints["ram_mb"],
        ram_budget_mb=ints["ram_budget_mb"],
        context_length=ints["context_length"],
        bandwidth_gb_s=bandwidth,
        artifacts=tuple(arts),
        isa=parse_isa(data.get("isa", []), source),
        notes=_notes(data.get("notes", ""), source),
    )
    if profile.ram_budget_mb > profile.ram_mb:
        raise EdgeftError(
            f"{source}: ram_budget_mb ({profile.ram_budget_mb}) exceeds ram_mb ({profile.ram_mb})"
        )
    return profile


def read_toml_file(path: Path) -> dict[str, Any]:
    """A TOML file's tables; EdgeftError naming the file when it cannot be read or parsed (BOM tolerated)."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
        return tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise EdgeftError(f"{path}: not UTF-8 text (byte {exc.start}); expected a TOML file") from None
    except OSError as exc:
        raise EdgeftError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except RecursionError:
        raise EdgeftError(f"{path}: not valid TOML (nested too deeply)") from None
    except ValueError as exc:  # TOMLDecodeError, and integers past Python's digit limit
        raise EdgeftError(f"{path}: not valid TOML ({' '.join(str(exc).split())[:200]})") from None


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
    return parse_profile(read_toml_file(path), str(path))


def load_all() -> list[TargetProfile]:
    """Every shipped profile, validated."""
    return [load(name) for name in available()]


def with_adapters(profile: TargetProfile) -> tuple[TargetProfile, list[str]]:
    """`--adapter`: every slot whose format runs an adapter on a quantized base ships base + LoRA adapter
    (its search candidates too, none with an importance matrix); the others stay merged. Returns the profile
    and one line per slot left merged, with its format's reason."""
    arts, kept = [], []
    paired = {(a.format, a.quant, a.head_type) for a in profile.artifacts if a.adapter}
    for a in profile.artifacts:
        fmt = formats.get(a.format)
        if "adapter" not in fmt.option_keys or (a.format, a.quant, a.head_type) in paired:
            arts.append(a)
            why = fmt.declined.get("adapter", f"{a.format} takes no adapter")
            if not a.adapter:
                twin = (a.format, a.quant, a.head_type) in paired
                kept.append(
                    f"{profile.name} {a.slot} ships merged: {'its base + adapter twin is a slot of its own' if twin else why}"
                )
            continue

        def lora(s: ArtifactSpec) -> ArtifactSpec:
            return dataclasses.replace(s, adapter=True, imatrix=False)

        arts.append(dataclasses.replace(lora(a), search=tuple(dict.fromkeys(lora(c) for c in a.search))))
    return dataclasses.replace(profile, artifacts=tuple(arts)), kept


def adapters_only(profile: TargetProfile) -> TargetProfile:
    """With several task data sets only a base + adapter slot serves every task: the others are left out
    (one line each says so); a profile with none is one error line."""
    keep = tuple(a for a in profile.artifacts if a.adapter)
    if not any(a.ship for a in keep):
        raise EdgeftError(
            f"{profile.name}: several --data sets ship as adapters over one base, but no slot of this profile "
            f"ships one; add --adapter (or adapter = true in a {formats.owners('adapter').split()[0]} slot)"
        )
    for a in profile.artifacts:
        if not a.adapter:
            info(
                f"[yellow]{profile.name} {a.slot} left out[/]: it would serve one task; only a base + adapter serves several"
            )
    return dataclasses.replace(profile, artifacts=keep)
