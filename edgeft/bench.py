"""Bench: latency of an artifact on this machine, timed exactly as on the device.

The timing is edgeft/device/bench_on_device.py's `measure_engine` (the script every bundle carries), so
`edgeft bench`, the bench/ scripts and the device share one definition of prefill and decode tok/s. Each
artifact runs in a fresh child process so its peak RSS is its own (the parent holds PyTorch and the
reference model). One warm-up, then repeated runs; medians are reported. Decode speed of a small model is
bounded by memory bandwidth (decode tok/s ≈ effective bandwidth ÷ bytes of weights read per token; ref:
llama-roofline, learn.arm.com/learning-paths/cross-platform/llm-decode-roofline), so the report also gives
bytes read per token × tok/s, the bandwidth the decode actually used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeft import formats
from edgeft.device.bench_on_device import Engine, measure_engine, peak_rss_mb
from edgeft.errors import EdgeftError
from edgeft.files import tree_bytes


@dataclass(frozen=True)
class LatencyReport:
    """Medians over runs on this host."""

    prefill_tok_s: float
    decode_tok_s: float
    ttft_ms: float
    peak_rss_mb: float
    bytes: int
    effective_gb_s: float
    prompt_tokens: int
    decode_tokens: int
    runs: int
    threads: int

    def metrics(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb")}


def _open_engine(path: Path, *, threads: int, n_ctx: int, allow_native_libs: bool) -> Engine:
    """The measurement engine for an artifact, after the same safety checks every runtime makes."""
    try:
        return formats.format_of(path).bench_engine(
            path, threads=threads, n_ctx=n_ctx, allow_native_libs=allow_native_libs
        )
    except EdgeftError:
        raise
    except Exception as e:  # noqa: BLE001 - llama.cpp and onnxruntime-genai raise their own types
        raise EdgeftError(f"{path}: cannot load it for the benchmark ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def measure(
    path: Path,
    *,
    threads: int,
    prompt_tokens: int = 64,
    decode_tokens: int = 64,
    runs: int = 3,
    allow_native_libs: bool = False,
) -> LatencyReport:
    """Time prefill and decode in this process (call through `bench` to isolate peak RSS).

    The timing is edgeft.device.bench_on_device's `measure_engine`, the one the on-device script runs.
    """
    path = Path(path)
    n_ctx = prompt_tokens + decode_tokens + 8
    engine = _open_engine(path, threads=threads, n_ctx=n_ctx, allow_native_libs=allow_native_libs)
    try:
        t = measure_engine(engine, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, runs=runs)
    except EdgeftError:
        raise
    except Exception as e:  # noqa: BLE001 - a runtime error while generating, as one line
        raise EdgeftError(f"{path}: the benchmark failed ({type(e).__name__}: {_first_line(e)})") from None
    finally:
        engine.close()
    size = tree_bytes(path)
    return LatencyReport(
        prefill_tok_s=t.prefill_tok_s,
        decode_tok_s=t.decode_tok_s,
        ttft_ms=t.ttft_ms,
        peak_rss_mb=peak_rss_mb() or 0.0,
        bytes=size,
        # bandwidth the decode used: weight bytes streamed per token (edgeft.footprint) × tok/s
        effective_gb_s=formats.decode_bytes_per_token(path) * t.decode_tok_s / 1e9,
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        runs=runs,
        threads=threads,
    )


def bench(
    path: Path,
    *,
    threads: int | None = None,
    prompt_tokens: int = 64,
    decode_tokens: int = 64,
    runs: int = 3,
    allow_native_libs: bool = False,
) -> LatencyReport:
    """Measure an artifact in a child process; returns the medians.

    The child is isolated from the working folder (`python -I`, run in a fresh empty folder): a `numpy.py`
    or `edgeft/` next to the user's files is never imported, and PYTHON* variables do not redirect it.
    """
    path = Path(path).resolve()
    if not path.exists():
        raise EdgeftError(f"artifact {path} does not exist")
    threads = threads or min(4, os.cpu_count() or 1)
    cmd = [sys.executable, "-I", "-m", "edgeft.bench", str(path), "--threads", str(threads)]
    cmd += ["--prompt-tokens", str(prompt_tokens), "--decode-tokens", str(decode_tokens), "--runs", str(runs)]
    cmd += ["--allow-native-libs"] if allow_native_libs else []
    with tempfile.TemporaryDirectory(prefix="edgeft-bench-") as cwd:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeftError(f"bench of {path} failed: {last}")
    return LatencyReport(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _child() -> None:
    """`python -m edgeft.bench PATH`: measure and print one JSON line (used by `bench`)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--allow-native-libs", action="store_true")
    a = ap.parse_args()
    try:
        rep = measure(
            a.path,
            threads=a.threads,
            prompt_tokens=a.prompt_tokens,
            decode_tokens=a.decode_tokens,
            runs=a.runs,
            allow_native_libs=a.allow_native_libs,
        )
    except EdgeftError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    print(json.dumps(asdict(rep)))


if __name__ == "__main__":
    _child()
