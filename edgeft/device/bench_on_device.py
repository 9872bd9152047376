#!/usr/bin/env python3
"""Benchmark an edgeft bundle on the device it is meant for; prints one JSON object on stdout.

    python3 bench_on_device.py BUNDLE_DIR [--threads 1,2,4] [--runs N] [--prompt-tokens N]
                               [--decode-tokens N] [--artifact RELPATH]...

Needs only Python 3.8+ and the runtime of each artifact (llama-cpp-python for GGUF, onnxruntime-genai for ONNX):
no edgeft, torch or numpy. First it checks the bundle against SHA256SUMS and manifest.json's sha256 map and
benchmarks nothing if any file differs. Then, per artifact, a thread sweep (default 1, 2, 4, … up to the
core count): each point runs in a fresh child process of this interpreter, so its peak RSS is its own, and
reports prefill and decode tok/s, time to first token and peak RSS; the best thread count for prefill and
for decode is named (on a Raspberry Pi 5 decode is fastest at 2 threads while prefill scales to 4,
ref: learn.arm.com/learning-paths/cross-platform/llm-decode-roofline/threads-and-size). Device facts (CPU,
cores, RAM, OS, runtime versions, temperature and throttling before and after) are read where the system
exposes them and null where it does not.
Progress goes to stderr. Exit 0 when the bundle is whole and no artifact failed (a skipped one is fine).

One definition of the figures, shared with `edgeft bench` (edgeft/bench.py imports this module): a prompt of
P random token ids (seeded), prefill = evaluating the prompt and producing the first token (TTFT), decode
tok/s = D / time of the next D tokens, timed after the first token, each one a forward pass of the model.
Generation never stops at an end-of-sequence token inside a timed window (llama.cpp: the low-level
eval/sample path; onnxruntime-genai: `min_length`), so nothing is re-run and every runtime decodes exactly
D tokens. One warm-up run, then medians of the timed runs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import random
import shutil
import stat
import statistics
import subprocess
import sys
import time
import types
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

if __package__:  # imported as edgeft.device.bench_on_device (edgeft bench, edgeft check)
    from edgeft.device import bundle_checks
    from edgeft.device.bundle_manifest import (
        MANIFEST,
        SHA256SUMS,
        ArtifactEntry,
        Manifest,
        ManifestError,
        read_manifest,
        read_sums,
    )
else:  # run as a script (python -I): the schema and folder checks it ships beside it, and nothing else

    def _load_beside(name: str) -> Any:
        """NAME.py beside this script, compiled from its own bytes: never a cached .pyc (one planted in
        __pycache__ would run instead), never through a symlink, and no bytecode written into the bundle."""
        path = Path(__file__).with_name(f"{name}.py")
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise OSError("not a regular file")
            source = path.read_bytes()
        except OSError as e:
            sys.exit(
                f"bench_on_device: error: {path.name} beside this script cannot be read ({e}); copy the whole bundle"
            )
        module = types.ModuleType(name)
        module.__file__ = str(path)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - shipped beside this script
        return module

    _schema = _load_beside("bundle_manifest")
    bundle_checks = _load_beside("bundle_checks")
    MANIFEST, SHA256SUMS, ArtifactEntry, Manifest = (
        _schema.MANIFEST,
        _schema.SHA256SUMS,
        _schema.ArtifactEntry,
        _schema.Manifest,
    )
    ManifestError, read_manifest, read_sums = _schema.ManifestError, _schema.read_manifest, _schema.read_sums

SCHEMA = 1
# format → (module to import, distribution name, install line)
RUNTIMES = {
    "gguf": ("llama_cpp", "llama-cpp-python", "pip install llama-cpp-python"),
    "onnx": ("onnxruntime_genai", "onnxruntime-genai", "pip install onnxruntime-genai"),
}
# Prompt ids are drawn below this: a vocabulary padded past its tokenizer (and very large ones) keeps its
# rarely trained tail out of the prompt, and every runtime gets the same ids for the same vocabulary.
MAX_PROMPT_ID = 32000
PROMPT_SEED = 0
CHILD_TIMEOUT_S = 3600  # one thread point of a large model on a slow board stays well below this
ERROR_PREFIX = "bench_on_device: error: "


# --- the measurement core (shared with edgeft.bench) ----------------------------------------------------------


class Engine(Protocol):
    """A loaded model that evaluates a prompt from an empty context and then extends it greedily."""

    n_vocab: int

    def start(self, ids: list[int]) -> int:
        """Evaluate `ids` from an empty context; return the first generated (greedy) token."""
        ...

    def step(self) -> int:
        """Run the model on the last generated token (one forward pass); return the next token."""
        ...

    def close(self) -> None:
        """Free the model."""
        ...


@dataclass(frozen=True)
class Timing:
    """Medians over the timed runs (after one warm-up) of one engine at one thread count."""

    prefill_tok_s: float
    decode_tok_s: float
    ttft_ms: float
    prompt_tokens: int
    decode_tokens: int
    runs: int


def prompt_ids(n_vocab: int, n: int, seed: int = PROMPT_SEED) -> list[int]:
    """`n` token ids drawn with a seeded generator from [0, min(n_vocab, MAX_PROMPT_ID))."""
    rng = random.Random(seed)
    hi = max(1, min(int(n_vocab), MAX_PROMPT_ID))
    return [rng.randrange(hi) for _ in range(n)]


def time_once(engine: Engine, ids: list[int], decode_tokens: int) -> tuple[float, float, list[int]]:
    """One run: (seconds to the first token, seconds for the next `decode_tokens`, every generated token)."""
    t0 = time.perf_counter()
    out = [engine.start(ids)]
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        out.append(engine.step())
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out


def measure_engine(
    engine: Engine, *, prompt_tokens: int, decode_tokens: int, runs: int, marks: list[Any] | None = None
) -> Timing:
    """Prefill and decode speed of `engine`: one warm-up, then medians of `runs` timed runs. `marks` gets
    (start, first token, last token) perf_counter instants of each timed run (for energy per phase)."""
    ids = prompt_ids(engine.n_vocab, prompt_tokens)
    ttft: list[float] = []
    decode: list[float] = []
    for i in range(runs + 1):  # run 0 is the warm-up
        start = time.perf_counter()
        first, rest, out = time_once(engine, ids, decode_tokens)
        if i and marks is not None:
            marks.append((start, start + first, start + first + rest))
        if len(out) != decode_tokens + 1:
            raise RuntimeError(f"generated {len(out)} tokens, expected {decode_tokens + 1}")
        if i:
            ttft.append(first)
            decode.append(rest)
    t_first = max(statistics.median(ttft), 1e-9)
    t_decode = max(statistics.median(decode), 1e-9)
    return Timing(
        prefill_tok_s=prompt_tokens / t_first,
        decode_tok_s=decode_tokens / t_decode,
        ttft_ms=t_first * 1000,
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        runs=runs,
    )


class LlamaCppEngine:
    """A GGUF file in llama.cpp through llama-cpp-python's low-level `eval` / `sample` (greedy).

    `create_completion` would stop at EOS; `eval` just runs the tokens it is given, so an EOS the model emits
    is fed back like any other token and decoding goes on.
    """

    def __init__(self, path: Path, *, threads: int, n_ctx: int, adapter: Path | None = None) -> None:
        import llama_cpp

        self._llm = llama_cpp.Llama(
            model_path=str(path),
            lora_path=None if adapter is None else str(adapter),  # a LoRA GGUF applied on top
            n_ctx=n_ctx,
            n_batch=n_ctx,  # the whole prompt in one decode call
            n_ubatch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )
        self.n_vocab = int(self._llm.n_vocab())
        self._last = 0

    def _sample(self) -> int:
        # temp=0 builds llama.cpp's greedy sampler (ref: llama_cpp/llama.py Llama._init_sampler).
        self._last = int(self._llm.sample(temp=0.0))
        return self._last

    def start(self, ids: list[int]) -> int:
        self._llm.reset()  # n_tokens = 0; eval then drops the old KV entries
        self._llm.eval(ids)
        return self._sample()

    def step(self) -> int:
        self._llm.eval([self._last])
        return self._sample()

    def close(self) -> None:
        self._llm.close()


class OrtGenaiEngine:
    """An onnxruntime-genai model folder through its `Generator` (greedy), the loop an app runs.

    `min_length` = `max_length` = the context: the generator never ends at EOS before the context is full,
    so a timed run is one prefill and then one decode step per token. `append_tokens` evaluates the
    prompt; the first `generate_next_token` only picks from those logits, each later one runs one step.
    """

    def __init__(self, path: Path, *, threads: int, n_ctx: int) -> None:
        import onnxruntime_genai as og

        self._og = og
        config = og.Config(str(path))
        # ref: onnxruntime-genai src/config.h, Config::SessionOptions intra_op_num_threads.
        overlay = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": overlay}}}))
        self._model = og.Model(config)
        cfg = json.loads((Path(path) / "genai_config.json").read_text(encoding="utf-8"))
        # ref: onnxruntime-genai src/config.h (model.vocab_size, model.context_length)
        self.n_vocab = int(cfg["model"]["vocab_size"])
        self.n_ctx = min(n_ctx, int(cfg["model"].get("context_length", n_ctx)))
        self._gen: Any = None

    def start(self, ids: list[int]) -> int:
        self._gen = None  # free the last run's KV cache before allocating the next
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(do_sample=False, max_length=self.n_ctx, min_length=self.n_ctx)
        self._gen = self._og.Generator(self._model, params)
        self._gen.append_tokens(ids)
        return self.step()

    def step(self) -> int:
        self._gen.generate_next_token()
        return int(self._gen.get_next_tokens()[0])

    def sequence_length(self) -> int:
        """Tokens in the generator's sequence (prompt + generated): shows nothing was restarted."""
        return len(self._gen.get_sequence(0))

    def close(self) -> None:
        self._gen = None
        self._model = None


# At most this many adapters in one base + adapter folder (a stranger's folder of 100k files would
# otherwise be listed and sorted before anything is refused).
MAX_PAIR_ADAPTERS = 64


def gguf_pair(folder: Path, task: str | None, listed: set[str] | frozenset[str]) -> tuple[Path, Path] | None:
    """A base + adapter folder's base GGUF and the adapter of `task` (the manifest entry's; else the first by
    name), or None when `folder` is not one: exactly one base-*.gguf, 1..MAX_PAIR_ADAPTERS adapter-*.gguf,
    nothing else but the .edgeft marker, no links, and every file among `listed` (the bundle-relative paths
    the manifest hashes: a file dropped in afterwards is never loaded). The layout
    edgeft.formats.gguf.adapter writes and edgeft check verifies."""
    if folder.is_symlink() or not folder.is_dir():
        return None
    names = []
    for i, p in enumerate(folder.iterdir()):
        if i > MAX_PAIR_ADAPTERS + 2:
            return None
        names.append(p.name)
    names.sort()
    if any((folder / n).is_symlink() or not (folder / n).is_file() for n in names):
        return None
    rel = folder.name
    if any(f"{rel}/{n}" not in listed for n in names):
        return None
    bases = [n for n in names if n.startswith("base-") and n.endswith(".gguf")]
    adapters = [n for n in names if n.startswith("adapter-") and n.endswith(".gguf")]
    if len(bases) != 1 or not adapters or len(bases) + len(adapters) != len(set(names) - {".edgeft"}):
        return None
    pick = f"adapter-{task}.gguf" if task else adapters[0]
    return (folder / bases[0], folder / pick) if pick in adapters else None


def open_engine(path: Path, fmt: str, *, threads: int, n_ctx: int, adapter: Path | None = None) -> Engine:
    """The engine for an artifact of format `fmt` ("gguf" file, with a LoRA `adapter` on it for a base +
    adapter folder; "onnx" folder)."""
    if fmt == "gguf":
        return LlamaCppEngine(path, threads=threads, n_ctx=n_ctx, adapter=adapter)
    if fmt == "onnx":
        return OrtGenaiEngine(path, threads=threads, n_ctx=n_ctx)
    raise ValueError(f"unknown artifact format {fmt!r}")


def peak_rss_mb() -> float | None:
    """This process's peak resident set size in MB.

    Linux keeps ru_maxrss across fork+exec, so a child would report its parent's peak; VmHWM in
    /proc/self/status belongs to the current address space only (ref: proc(5)). Elsewhere ru_maxrss is
    KiB on Linux/BSD and bytes on macOS (ref: getrusage(2) on each).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


# --- integrity ---------------------------------------------------------------------------------------------


def _inside(bundle: Path, rel: str) -> Path | None:
    """`bundle/rel` when `rel` is a plain relative path that stays inside the bundle, else None."""
    if (
        not rel
        or rel.startswith(("/", "\\"))
        or "\\" in rel
        or any(p in ("", ".", "..") for p in rel.split("/"))
    ):
        return None
    path = bundle / rel
    try:
        path.resolve().relative_to(bundle.resolve())
    except (ValueError, OSError):
        return None
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_integrity(bundle: Path) -> tuple[dict[str, Any], Manifest | None]:
    """Every file SHA256SUMS and manifest.json's "files" name, re-hashed → (integrity, manifest or None).

    SHA256SUMS covers manifest.json, so an edited manifest shows. Files the lists do not name are not
    looked at (a device may keep its own files beside the bundle).
    """
    problems: list[str] = []
    digests: dict[str, str | None] = {}

    def digest(rel: str) -> str | None:
        if rel not in digests:
            path = _inside(bundle, rel)
            if path is None:
                problems.append(f"{rel!r}: not a path inside the bundle")
                digests[rel] = None
            elif path.is_symlink() or not path.is_file():
                problems.append(f"{rel}: missing" if not path.exists() else f"{rel}: not a regular file")
                digests[rel] = None
            else:
                try:
                    digests[rel] = sha256_file(path)
                except OSError as e:
                    problems.append(f"{rel}: cannot be read ({e.strerror or e})")
                    digests[rel] = None
        return digests[rel]

    if not bundle.is_dir():
        return {"ok": False, "files_checked": 0, "problems": [f"{bundle}: not a folder"]}, None
    sums, bad = read_sums(bundle / SHA256SUMS)
    problems += bad
    for rel, want in sums.items():
        got = digest(rel)
        if got is not None and got != want:
            problems.append(f"{rel}: sha256 differs from {SHA256SUMS}")
    if sums and MANIFEST not in sums:
        problems.append(f"{MANIFEST}: not covered by {SHA256SUMS}")
    manifest: Manifest | None = None
    try:
        manifest = read_manifest(bundle / MANIFEST, tuple(RUNTIMES), MANIFEST)
    except ManifestError as e:
        problems.append(str(e))
    for rel, want in (manifest.files if manifest is not None else {}).items():
        if rel not in sums:
            problems.append(f"{rel}: in {MANIFEST} but not in {SHA256SUMS}")
        got = digest(rel)
        if got is not None and got != want:
            problems.append(f"{rel}: sha256 differs from {MANIFEST}")
    ok = not problems
    return {"ok": ok, "files_checked": sum(d is not None for d in digests.values()), "problems": problems}, (
        manifest if ok else None
    )


# --- device facts ------------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _cpuinfo() -> tuple[str | None, list[str]]:
    """CPU model and feature flags from /proc/cpuinfo (x86 "model name"/"flags"; Arm "Features", and the
    board's "Model" line on a Raspberry Pi; ref: proc(5), arch/arm64/kernel/cpuinfo.c)."""
    text = _read("/proc/cpuinfo")
    if text is None:
        model = platform.processor() or None
        if sys.platform == "darwin" and shutil.which("sysctl"):
            model = _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or model
        return model, []
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    model = (
        fields.get("model name") or fields.get("Model") or fields.get("Hardware") or fields.get("cpu model")
    )
    if fields.get("model name") and fields.get("Model"):
        model = f"{fields['Model']} ({fields['model name']})"
    flags = fields.get("flags") or fields.get("Features") or ""
    return model or platform.processor() or None, sorted(set(flags.split()))


def _ram_mb() -> int | None:
    text = _read("/proc/meminfo")
    for line in (text or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024  # kB
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError, AttributeError):
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def cpu_temperature_c() -> float | None:
    """The CPU's thermal zone in °C (sysfs millidegrees; ref: Linux Documentation/ABI sysfs-class-thermal):
    the zone whose type names the CPU or SoC ("cpu-thermal" on a Raspberry Pi, "x86_pkg_temp"), else the
    first readable one; None when there is none."""
    zones = sorted(Path("/sys/class/thermal").glob("thermal_zone*"))
    preferred = [
        z for z in zones if any(k in (_read(str(z / "type")) or "").lower() for k in ("cpu", "soc", "pkg"))
    ]
    for zone in preferred + zones:
        raw = _read(str(zone / "temp"))
        try:
            return int(raw.strip()) / 1000 if raw is not None else None
        except ValueError:
            continue
    return None


def throttled() -> str | None:
    """Raspberry Pi firmware's throttling bits (`vcgencmd get_throttled` → "throttled=0x0"), or None where
    there is no vcgencmd. ref: raspberrypi.com documentation, os.adoc "get_throttled"."""
    if shutil.which("vcgencmd") is None:
        return None
    out = _run(["vcgencmd", "get_throttled"])
    return out.split("=", 1)[1].strip() if out and "=" in out else out


def runtime_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def device_facts() -> dict[str, Any]:
    """What the device is; every value read from the system, None where it is not exposed."""
    model, features = _cpuinfo()
    return {
        "hostname": platform.node() or None,
        "machine": platform.machine() or None,
        "os": platform.platform(),
        "cpu_model": model,
        "cpu_features": features,
        "cores": os.cpu_count(),
        "ram_mb": _ram_mb(),
        "python": platform.python_version(),
        "runtimes": {dist: runtime_version(dist) for _mod, dist, _line in RUNTIMES.values()},
        "temperature_c": {"before": cpu_temperature_c(), "after": None},
        "throttled": {"before": throttled(), "after": None},
    }


# --- energy per token ---------------------------------------------------------------------------------------
# Joules per token where the device exposes a counter, never a made-up number: where none is readable the
# result says why. Sources, in the order they are looked for:
# - Linux powercap/RAPL (x86 laptops and desktops): cumulative energy_uj per zone, wrapping at
#   max_energy_range_uj (ref: Linux Documentation/power/powercap/powercap.rst). Top-level zones only (their
#   subzones, core/uncore/dram, are inside the package's count); "psys" (the whole platform) when present.
#   energy_uj is readable by root only since Linux 5.10 (CVE-2020-8694, "Platypus").
# - NVIDIA Jetson's INA3221 power monitor: hwmon in[123]_input (bus mV), curr[123]_input (mA), in[123]_label
#   (ref: Linux Documentation/hwmon/ina3221.rst; JetPack 5/6), the rail labelled VDD_IN (the module's input)
#   when there is one; JetPack 4's iio driver: in_power[012]_input (mW) with rail_name_[012].
# - Raspberry Pi 5's PMIC: `vcgencmd pmic_read_adc` prints each rail's current ("NAME_A current(i)=...A") and
#   voltage ("NAME_V volt(j)=...V"); power is the sum over rails of current × voltage (ref: raspberrypi.com
#   documentation, computers/os.adoc "vcgencmd" pmic_read_adc; Raspberry Pi 5 only).
# The power monitors give watts at an instant, so a sampler thread integrates them (trapezoids); RAPL counts
# joules itself. Idle power is measured first, before any model is loaded.

ENERGY_SAMPLE_S = {"counter": 0.02, "power": 0.05, "vcgencmd": 0.1}
IDLE_SECONDS = 2.0
# A phase is measured only when a sampled power monitor read it at least this many times (RAPL counts itself).
MIN_SAMPLES_PER_WINDOW = 3
JETSON_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


def _read_text(path: str) -> str:
    """One small sysfs file (tests replace this to play permissions)."""
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


class EnergySource:
    """A readable energy counter or power monitor: `read()` is joules so far (kind "counter") or watts now
    (kind "power")."""

    def __init__(self, name: str, kind: str, read: Any, detail: str, interval: float) -> None:
        self.name, self.kind, self.read, self.detail, self.interval = name, kind, read, detail, interval


def _rapl(sys_root: Path) -> tuple[EnergySource | None, str | None]:
    base = sys_root / "class" / "powercap"
    zones = [z for z in sorted(base.glob("intel-rapl:*")) if z.name.count(":") == 1]
    if not zones:
        return None, None
    named = {z: (_read(str(z / "name")) or "").strip() for z in zones}
    psys = [z for z in zones if named[z] == "psys"]
    chosen = psys or [z for z in zones if named[z].startswith("package")] or zones
    ranges: list[int] = []
    for z in chosen:
        try:
            int(_read_text(str(z / "energy_uj")).strip())
            ranges.append(int(_read_text(str(z / "max_energy_range_uj")).strip()))
        except PermissionError:
            return None, (
                f"{z / 'energy_uj'} is readable by root only (Linux 5.10+, CVE-2020-8694): run as root, or "
                "grant read access to it"
            )
        except (OSError, ValueError) as e:
            return None, f"{z / 'energy_uj'}: not readable ({type(e).__name__})"
    last: list[int | None] = [None] * len(chosen)
    total = [0]

    def read() -> float:
        for i, z in enumerate(chosen):
            raw = int(_read_text(str(z / "energy_uj")).strip())
            prev = last[i]
            if prev is not None:
                delta = raw - prev
                if delta < 0:  # the counter wrapped at max_energy_range_uj
                    delta += ranges[i]
                total[0] += delta
            last[i] = raw
        return total[0] / 1e6

    names = "+".join(named[z] or z.name for z in chosen)
    return EnergySource("rapl", "counter", read, f"powercap {names}", ENERGY_SAMPLE_S["counter"]), None


def _jetson(sys_root: Path) -> tuple[EnergySource | None, str | None]:
    drivers = sys_root / "bus" / "i2c" / "drivers"
    channels: list[tuple[str, Any]] = []  # (label, watts reader)
    for hw in sorted(drivers.glob("ina3221/*/hwmon/hwmon*")):
        for volt in sorted(hw.glob("in[1-3]_input")):  # in4-in7 are shunt voltages (µV), curr4 a sum
            n = volt.name[2]
            curr = hw / f"curr{n}_input"
            label = (_read(str(hw / f"in{n}_label")) or f"{hw.name} in{n}").strip()
            if (
                not curr.is_file()
                or label == "NC"
                or (_read(str(hw / f"in{n}_enable")) or "1").strip() == "0"
            ):
                continue  # an unconnected or disabled channel

            def watts(v: Path = volt, c: Path = curr) -> float:  # mV × mA
                return int(_read_text(str(v)).strip()) * int(_read_text(str(c)).strip()) / 1e6

            channels.append((label, watts))
    for dev in sorted(drivers.glob("ina3221x/*/iio:device*")):
        for power in sorted(dev.glob("in_power[0-9]_input")):
            n = power.name[len("in_power")]
            label = (_read(str(dev / f"rail_name_{n}")) or f"{dev.name} power{n}").strip()

            def watts_iio(p: Path = power) -> float:  # mW
                return int(_read_text(str(p)).strip()) / 1e3

            channels.append((label, watts_iio))
    if not channels:
        return None, None
    inputs = [c for c in channels if c[0] in JETSON_INPUT_RAILS]
    chosen = inputs[:1] or channels
    try:
        for _label, f in chosen:
            f()
    except PermissionError as e:
        return None, f"{e.filename}: not readable by this user: run as root, or grant read access to it"
    except (OSError, ValueError) as e:
        return None, f"INA3221 power monitor not readable ({type(e).__name__}: {e})"

    def read() -> float:
        return sum(f() for _label, f in chosen)

    detail = "INA3221 " + "+".join(label for label, _f in chosen)
    return EnergySource("jetson-ina3221", "power", read, detail, ENERGY_SAMPLE_S["power"]), None


def parse_pmic_adc(text: str) -> float | None:
    """Watts from `vcgencmd pmic_read_adc` output: Σ over rails of NAME_A current × NAME_V voltage."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2 or "=" not in parts[1]:
            continue
        name, value = parts[0], parts[1].split("=", 1)[1]
        try:
            if name.endswith("_A") and value.endswith("A"):
                amps[name[:-2]] = float(value[:-1])
            elif name.endswith("_V") and value.endswith("V"):
                volts[name[:-2]] = float(value[:-1])
        except ValueError:
            continue
    rails = [r for r in amps if r in volts]
    return sum(amps[r] * volts[r] for r in rails) if rails else None


def _pi5_pmic(run: Any, which: Any) -> tuple[EnergySource | None, str | None]:
    if which("vcgencmd") is None:
        return None, None
    out = run(["vcgencmd", "pmic_read_adc"])
    if out is None or parse_pmic_adc(out) is None:
        return None, None  # not a Raspberry Pi 5 (older boards' firmware has no PMIC ADC)

    def read() -> float:
        text = run(["vcgencmd", "pmic_read_adc"])
        watts = parse_pmic_adc(text or "")
        if watts is None:
            raise OSError("vcgencmd pmic_read_adc gave no rail readings")
        return watts

    return EnergySource(
        "pi5-pmic", "power", read, "PMIC rails (vcgencmd pmic_read_adc)", ENERGY_SAMPLE_S["vcgencmd"]
    ), None


def find_energy_source(
    sys_root: Path = Path("/sys"), run: Any = None, which: Any = None
) -> tuple[EnergySource | None, str]:
    """The first readable source (RAPL, Jetson INA3221, Raspberry Pi 5 PMIC) → (source, ""), or (None, why)."""
    run = run or _run
    which = which or shutil.which
    reasons: list[str] = []
    for find in (lambda: _rapl(sys_root), lambda: _jetson(sys_root), lambda: _pi5_pmic(run, which)):
        source, why = find()
        if source is not None:
            return source, ""
        if why:
            reasons.append(why)
    if reasons:
        return None, reasons[0]
    return None, (
        "no energy or power counter here (looked for powercap RAPL energy_uj, a Jetson INA3221 monitor, the "
        "Raspberry Pi 5 PMIC through vcgencmd pmic_read_adc)"
    )


class EnergySampler:
    """Samples a source in a background thread into a cumulative-joules curve; `joules(t0, t1)` is the
    energy between two time.perf_counter() instants (linear between samples)."""

    def __init__(self, source: EnergySource) -> None:
        import threading

        self.source = source
        self.times: list[float] = []
        self.joules: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.error: str | None = None

    def _sample(self) -> None:
        before = time.perf_counter()
        value = self.source.read()
        t = (before + time.perf_counter()) / 2  # a reading that takes time (vcgencmd) is stamped mid-way
        if self.source.kind == "counter":
            total = value
        elif not self.times:
            total, self._watts = 0.0, value
        else:  # trapezoid between the last sample and this one
            total = self.joules[-1] + (self._watts + value) / 2 * (t - self.times[-1])
            self._watts = value
        self.times.append(t)
        self.joules.append(total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception as e:  # noqa: BLE001 - any reader failure ends the readings, named
                self.error = f"{type(e).__name__}: {e}"
                return
            self._stop.wait(self.source.interval)

    def __enter__(self) -> EnergySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is None:
            self._sample()

    def at(self, t: float) -> float:
        """Cumulative joules at instant t (clamped to the sampled span)."""
        import bisect

        i = bisect.bisect_left(self.times, t)
        if i <= 0:
            return self.joules[0]
        if i >= len(self.times):
            return self.joules[-1]
        t0, t1 = self.times[i - 1], self.times[i]
        j0, j1 = self.joules[i - 1], self.joules[i]
        return j0 + (j1 - j0) * (t - t0) / (t1 - t0) if t1 > t0 else j1

    def between(self, t0: float, t1: float) -> float:
        return self.at(t1) - self.at(t0)


def energy_facts(a: argparse.Namespace) -> dict[str, Any]:
    """Which energy source this run reads and the idle power measured first; or why there is none. Turns
    `a.energy` off when there is nothing to read, so the thread points skip the sampler."""
    if not a.energy:
        return {"available": False, "reason": "not measured (--no-energy)"}
    source, why = find_energy_source()
    if source is None:
        a.energy = False
        _say(f"energy: not available: {why}")
        return {"available": False, "reason": why}
    idle = idle_watts(source, IDLE_SECONDS)
    if idle is None or idle <= 0:  # a counter stuck at zero (some desktops' psys) measures nothing
        a.energy = False
        why = f"{source.detail} did not advance over {IDLE_SECONDS:g} s of idle: no usable reading"
        _say(f"energy: not available: {why}")
        return {"available": False, "reason": why}
    _say(f"energy: {source.detail}, idle {idle:.2f} W")
    return {
        "available": True,
        "source": source.name,
        "detail": source.detail,
        "sample_interval_ms": None if source.kind == "counter" else round(source.interval * 1000),
        "idle_w": idle,
        "idle_seconds": IDLE_SECONDS,
    }


def phase_energy(
    sampler: EnergySampler, marks: list[Any], prompt_tokens: int, decode_tokens: int
) -> dict[str, Any]:
    """Medians over the timed runs: joules per prompt token (prefill, to the first token), joules per decoded
    token and average watts while decoding; an error line instead when the source stopped answering."""
    if sampler.error is not None or not marks:
        return {"error": sampler.error or "no timed run"}
    need = MIN_SAMPLES_PER_WINDOW * sampler.source.interval

    def per_token(windows: list[tuple[float, float]], tokens: int, phase: str, flag: str) -> Any:
        shortest = min(t1 - t0 for t0, t1 in windows)
        if sampler.source.kind == "power" and shortest < need:  # interpolating a guess is not a measurement
            return None, (
                f"{phase} lasted {shortest * 1000:.0f} ms, under {MIN_SAMPLES_PER_WINDOW} samples of "
                f"{sampler.source.interval * 1000:.0f} ms: raise {flag}"
            )
        return statistics.median(sampler.between(t0, t1) / tokens for t0, t1 in windows), None

    prefill, why_prefill = per_token(
        [(m[0], m[1]) for m in marks], prompt_tokens, "prefill", "--prompt-tokens"
    )
    decode, why_decode = per_token([(m[1], m[2]) for m in marks], decode_tokens, "decode", "--decode-tokens")
    watts = None if decode is None else decode * decode_tokens / statistics.median(m[2] - m[1] for m in marks)
    return {
        "prefill_j_per_token": prefill,
        "decode_j_per_token": decode,
        "decode_w": watts,
        "samples": len(sampler.times),
        "note": "; ".join(w for w in (why_prefill, why_decode) if w) or None,
    }


def idle_watts(source: EnergySource, seconds: float = IDLE_SECONDS) -> float | None:
    """Average power over `seconds` with nothing of the benchmark running."""
    with EnergySampler(source) as s:
        time.sleep(seconds)
    if s.error is not None or s.times[-1] <= s.times[0]:
        return None
    return s.between(s.times[0], s.times[-1]) / (s.times[-1] - s.times[0])


# --- the sweep ---------------------------------------------------------------------------------------------


def default_threads(cores: int | None) -> list[int]:
    """1, 2, 4, … up to the core count, and the core count itself (1, 2, 4 on a 4-core device)."""
    cores = max(1, cores or 1)
    out, n = [], 1
    while n < cores:
        out.append(n)
        n *= 2
    return [*out, cores]


def _runtime_missing(fmt: str) -> str | None:
    """Why the runtime of `fmt` cannot be imported here, or None when it can."""
    module = RUNTIMES[fmt][0]
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError from a missing shared library
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return f"{module} is not importable here ({type(e).__name__}: {first})"
    return None


def run_point(
    path: Path, fmt: str, threads: int, a: argparse.Namespace, adapter: Path | None = None
) -> dict[str, Any]:
    """One thread count, measured in a fresh child of this interpreter (`-I`: nothing from the working folder
    or PYTHON* variables); raises RuntimeError with the child's error line."""
    cmd = [sys.executable, "-I", str(Path(__file__).resolve()), "--child", str(path), "--format", fmt]
    cmd += ["--adapter", str(adapter)] if adapter is not None else []
    cmd += ["--threads", str(threads), "--runs", str(a.runs)]
    cmd += ["--prompt-tokens", str(a.prompt_tokens), "--decode-tokens", str(a.decode_tokens)]
    if not a.energy:  # no readable counter here, or not asked for
        cmd.append("--no-energy")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no result within {CHILD_TIMEOUT_S} s at {threads} threads") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        ours = [ln[len(ERROR_PREFIX) :] for ln in lines if ln.startswith(ERROR_PREFIX)]
        why = ours[-1] if ours else (lines[-1] if lines else f"exit status {proc.returncode}")
        raise RuntimeError(f"at {threads} threads: {why}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"at {threads} threads: no result from the child") from None


def bench_artifact(
    bundle: Path,
    entry: ArtifactEntry,
    a: argparse.Namespace,
    threads: list[int],
    listed: set[str] | frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Sweep one manifest artifact entry over `threads`; a result entry of the JSON's "artifacts"."""
    rel, fmt = entry.path, entry.format or None
    res: dict[str, Any] = {
        "path": rel if isinstance(rel, str) else str(rel),
        "format": fmt,
        "status": "failed",
        "reason": None,
        "install": None,
        "sweep": [],
        "best_threads": None,
        "prefill_tok_s": None,
        "decode_tok_s": None,
        "ttft_ms": None,
        "peak_rss_mb": None,
        "decode_bytes_per_token": None,
        "effective_gb_s": None,
        "energy": None,
    }
    path = _inside(bundle, rel) if isinstance(rel, str) else None
    if path is None or fmt not in RUNTIMES:
        res["reason"] = f'{MANIFEST}: artifact entry has no usable "path" and "format" ("gguf" or "onnx")'
        return res
    res["decode_bytes_per_token"] = entry.decode_bytes_per_token
    missing = _runtime_missing(fmt)
    if missing:
        res.update(status="skipped", reason=missing, install=RUNTIMES[fmt][2])
        return res
    adapter = None
    if fmt == "gguf" and path.is_dir():  # a base + adapter folder: the base, with the entry's task's adapter
        pair = gguf_pair(path, entry.task, listed)
        path, adapter = pair if pair is not None else (path, None)
        shape_ok = pair is not None
    else:
        shape_ok = path.is_file() if fmt == "gguf" else (path / "genai_config.json").is_file()
    if shape_ok and fmt == "onnx":  # the checks every loader runs before onnxruntime-genai sees the folder
        try:
            bundle_checks.check_onnx_folder(path, allow_native_libs=a.allow_native_libs)
        except bundle_checks.FolderError as e:
            res["reason"] = str(e)
            return res
    if not shape_ok:
        shape = (
            "GGUF file or base + adapter folder whose every file the manifest lists"
            if fmt == "gguf"
            else "folder with genai_config.json"
        )
        res["reason"] = f"{rel}: not a {shape}"
        return res
    for n in threads:
        try:
            point = run_point(path, fmt, n, a, adapter)
        except RuntimeError as e:
            res["reason"] = str(e)
            return res
        res["sweep"].append({"threads": n, **point})
        _say(
            f"{rel} at {n} threads: prefill {point['prefill_tok_s']:.1f} tok/s, decode "
            f"{point['decode_tok_s']:.1f} tok/s, TTFT {point['ttft_ms']:.1f} ms, peak RSS "
            f"{point['peak_rss_mb'] or 0:.0f} MB"
        )
    best_prefill = max(res["sweep"], key=lambda p: p["prefill_tok_s"])
    best_decode = max(res["sweep"], key=lambda p: p["decode_tok_s"])
    rss = [p["peak_rss_mb"] for p in res["sweep"] if p["peak_rss_mb"] is not None]
    res.update(
        status="ok",
        best_threads={"prefill": best_prefill["threads"], "decode": best_decode["threads"]},
        prefill_tok_s=best_prefill["prefill_tok_s"],
        ttft_ms=best_prefill["ttft_ms"],
        decode_tok_s=best_decode["decode_tok_s"],
        peak_rss_mb=max(rss) if rss else None,  # the highest of the sweep: what the device must hold
    )
    if res["decode_bytes_per_token"] is not None:
        res["effective_gb_s"] = res["decode_bytes_per_token"] * res["decode_tok_s"] / 1e9
    # energy at the fastest settings: decode at the best decode threads, prefill at the best prefill threads
    e_decode, e_prefill = best_decode.get("energy") or {}, best_prefill.get("energy") or {}
    if e_decode or e_prefill:
        notes = [e.get("note") or e.get("error") for e in (e_prefill, e_decode)]
        res["energy"] = {
            "decode_j_per_token": e_decode.get("decode_j_per_token"),
            "prefill_j_per_token": e_prefill.get("prefill_j_per_token"),
            "decode_w": e_decode.get("decode_w"),
            "note": "; ".join(dict.fromkeys(n for n in notes if n)) or None,
        }
    else:
        res["energy"] = None
    return res


def _say(msg: str) -> None:
    print(f"bench_on_device: {msg}", file=sys.stderr, flush=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run(a: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """The whole benchmark → (the JSON object, exit status)."""
    bundle = Path(a.bundle)
    started = _now()
    device = device_facts()
    integrity, manifest = check_integrity(bundle)
    _say(f"integrity: {'ok' if integrity['ok'] else 'FAILED'} ({integrity['files_checked']} files checked)")
    for p in integrity["problems"]:
        _say(f"  {p}")
    results: list[dict[str, Any]] = []
    threads = a.threads or default_threads(device["cores"])
    device["energy"] = energy_facts(a) if manifest is not None and integrity["ok"] else None
    if manifest is not None:
        entries = manifest.artifacts
        if a.artifact:
            by_path = {e.path: e for e in entries}
            entries = [by_path.get(rel, ArtifactEntry(rel, "", "")) for rel in a.artifact]
        for entry in entries:
            results.append(bench_artifact(bundle, entry, a, threads, set(manifest.files)))
            if results[-1]["status"] != "ok":
                _say(f"{results[-1]['path']}: {results[-1]['status']}: {results[-1]['reason']}")
    device["temperature_c"]["after"] = cpu_temperature_c()
    device["throttled"]["after"] = throttled()
    out = {
        "schema": SCHEMA,
        "bundle": str(bundle.resolve()),
        "started": started,
        "finished": _now(),
        "integrity": integrity,
        "device": device,
        # what was asked for: runs are compared only with runs of the same settings
        "settings": {
            "prompt_tokens": a.prompt_tokens,
            "decode_tokens": a.decode_tokens,
            "runs": a.runs,
            "threads": list(threads),
        },
        "artifacts": results,
    }
    ok = integrity["ok"] and all(r["status"] != "failed" for r in results)
    return out, 0 if ok else 1


def _child(a: argparse.Namespace) -> None:
    """`--child PATH --format F --threads N`: measure one thread count here, print one JSON line."""
    try:
        n_ctx = a.prompt_tokens + a.decode_tokens + 8
        adapter = Path(a.adapter) if a.adapter else None
        engine = open_engine(Path(a.bundle), a.format, threads=a.threads[0], n_ctx=n_ctx, adapter=adapter)
        source = find_energy_source()[0] if a.energy else None
        energy = None
        try:
            t = measure_engine(
                engine, prompt_tokens=a.prompt_tokens, decode_tokens=a.decode_tokens, runs=a.runs
            )
            if source is not None:
                # a pass of its own after the timed runs: sampling (a process per vcgencmd reading on a Pi)
                # never competes with the runs whose speed is reported
                marks: list[Any] = []
                try:
                    with EnergySampler(source) as sampler:
                        measure_engine(
                            engine,
                            prompt_tokens=a.prompt_tokens,
                            decode_tokens=a.decode_tokens,
                            runs=a.runs,
                            marks=marks,
                        )
                    energy = phase_energy(sampler, marks, a.prompt_tokens, a.decode_tokens)
                except (OSError, ValueError) as e:
                    energy = {"error": f"{type(e).__name__}: {e}"}
        finally:
            engine.close()
    except Exception as e:  # noqa: BLE001 - any runtime error becomes the artifact's reason, one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"{ERROR_PREFIX}{type(e).__name__}: {first}", file=sys.stderr)
        sys.exit(1)
    point = asdict(t)
    print(
        json.dumps(
            dict(
                {k: point[k] for k in ("prefill_tok_s", "decode_tok_s", "ttft_ms")},
                peak_rss_mb=peak_rss_mb(),
                energy=energy,
            )
        )
    )


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not 1 or more")
    return n


def _thread_list(text: str) -> list[int]:
    return sorted({_positive(t.strip()) for t in text.split(",") if t.strip()}) or [_positive("")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench_on_device.py",
        description="Benchmark an edgeft bundle on this device; prints one JSON object on stdout.",
        epilog="Example: python3 bench_on_device.py . --threads 1,2,4",
    )
    ap.add_argument("bundle", help="the bundle folder (holds manifest.json and SHA256SUMS)")
    ap.add_argument("--threads", type=_thread_list, default=None, help="thread counts to sweep, e.g. 1,2,4")
    ap.add_argument("--runs", type=_positive, default=3, help="timed runs after one warm-up (medians)")
    ap.add_argument("--prompt-tokens", type=_positive, default=64, help="prompt length P")
    ap.add_argument("--decode-tokens", type=_positive, default=64, help="tokens decoded after the first, D")
    ap.add_argument(
        "--artifact", action="append", default=[], help="only this artifact (path in the bundle); repeatable"
    )
    ap.add_argument(
        "--no-energy",
        dest="energy",
        action="store_false",
        help="skip the idle-power wait and energy readings (they run where a counter is readable)",
    )
    ap.add_argument(
        "--allow-native-libs",
        action="store_true",
        help="load an ONNX folder whose genai_config.json names native libraries (custom ops, providers)",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--format", choices=sorted(RUNTIMES), help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        _child(a)
        return 0
    out, status = run(a)
    print(json.dumps(out, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
