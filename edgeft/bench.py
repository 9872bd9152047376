"""Bench: latency of an artifact on this machine, through the same runtime interface as verify.

Each artifact runs in a fresh child process so its peak RSS is its own (the parent holds PyTorch and the
reference model). One warm-up, then repeated runs; medians are reported. Decode speed of a small model is
bounded by memory bandwidth (../shared/REFERENCE.md: "decode tok/s ≈ effective bandwidth ÷ bytes of
weights read per token"), so the report also gives size × tok/s, the bandwidth the decode actually used.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import EdgeftError
from .files import tree_bytes


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


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    Linux keeps ru_maxrss across fork+exec, so a child would report its parent's peak; VmHWM in
    /proc/self/status belongs to the current address space only (ref: proc(5)).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(
    path: Path,
    *,
    threads: int,
    prompt_tokens: int = 64,
    decode_tokens: int = 64,
    runs: int = 3,
    allow_native_libs: bool = False,
) -> LatencyReport:
    """Time prefill and decode in this process (call through `bench` to isolate peak RSS)."""
    from .runtime import open_runtime

    n_ctx = prompt_tokens + decode_tokens + 8
    rt = open_runtime(
        path, threads=threads, n_ctx=n_ctx, all_logits=False, allow_native_libs=allow_native_libs
    )
    try:
        rng = np.random.default_rng(0)
        ids = rng.integers(low=0, high=min(int(rt.n_vocab), 32000), size=prompt_tokens).tolist()
        ttft, total = [], []
        for i in range(runs + 1):  # the first run is the warm-up
            t0 = time.perf_counter()
            rt.generate(ids, 1)
            t1 = time.perf_counter()
            out = rt.generate(ids, decode_tokens + 1)
            t2 = time.perf_counter()
            if len(out) != decode_tokens + 1:
                raise EdgeftError(f"{path}: generated {len(out)} tokens, expected {decode_tokens + 1}")
            if i:
                ttft.append(t1 - t0)
                total.append(t2 - t1)
    finally:
        rt.close()
    t_first = statistics.median(ttft)
    t_decode = max(statistics.median(total) - t_first, 1e-9)
    size = tree_bytes(path)
    decode_tok_s = decode_tokens / t_decode
    return LatencyReport(
        prefill_tok_s=prompt_tokens / t_first,
        decode_tok_s=decode_tok_s,
        ttft_ms=t_first * 1000,
        peak_rss_mb=peak_rss_mb(),
        bytes=size,
        effective_gb_s=size * decode_tok_s / 1e9,
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
