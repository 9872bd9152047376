"""Weights that already lie on a quantization grid (a checkpoint dequantized from a Q4_1 GGUF, then changed a
little, as a fine-tune does): quantizing to that grid again loses the change, so edgeft steers the types that
would (docs/requantization.md); weights that never were quantized are left as llama.cpp chose."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file
from tinymodels import cached_model

from edgeft.formats import tensor_types
from edgeft.formats.gguf import quantize as quant_mod
from edgeft.formats.gguf.constants import GGUF_KEY_STEERED
from edgeft.formats.gguf.export import export_float_gguf


def _on_q4_1_grid(model: Path, out: Path, change: float) -> Path:
    """A copy of `model` whose matrices are rounded to Q4_1 (gguf-py's reference rounding, as llama.cpp's) and
    then moved by `change` × a Q4_1 step, Gaussian: a fine-tune of a checkpoint that came from a Q4_1 file."""
    shutil.copytree(model, out)
    tensors = load_file(str(out / "model.safetensors"))
    rng = np.random.default_rng(0)
    for name, t in tensors.items():
        w = t.float().numpy()
        if w.ndim != 2 or w.shape[1] % 32:
            continue
        w = w.astype(np.float16).astype(np.float32)
        grid = dequantize(quantize(w, Q.Q4_1), Q.Q4_1).reshape(w.shape)
        blocks = grid.reshape(-1, 32)
        step = ((blocks.max(1) - blocks.min(1)) / 15)[:, None]
        moved = blocks + change * step * rng.standard_normal(blocks.shape)
        tensors[name] = t.new_tensor(moved.reshape(w.shape))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("requant")
    plain = cached_model("llama", "bpe")  # hidden 64: q5_k_m falls back to Q5_1 for every matrix
    grid = _on_q4_1_grid(plain, root / "grid", 0.03)
    out = {}
    for name, model in (("plain", plain), ("grid", grid)):
        folder = root / f"{name}-f16"
        folder.mkdir()
        out[name] = export_float_gguf(model, folder).path
    return out


def test_the_probe_tells_weights_on_a_grid_from_weights_off_it(models: dict[str, Path]) -> None:
    plain, grid = quant_mod.change_kept(models["plain"]), quant_mod.change_kept(models["grid"])
    assert all(0.8 <= v <= 1.25 for v in plain.values()), plain  # unbiased rounding keeps the change
    assert grid["q4_1"] < 0.3 and grid["q5_1"] > 1.25, grid  # snapped back / amplified
    assert 0.8 <= grid["q4_0"] <= 1.25 and 0.8 <= grid["q5_0"] <= 1.25 and 0.8 <= grid["q8_0"] <= 1.25
    assert quant_mod.steering(grid) == {"q4_1": "q4_0", "q5_1": "q5_0"}
    assert quant_mod.steering(plain) == {}


def test_q5_k_m_on_grid_weights_is_steered_and_says_so(models: dict[str, Path], tmp_path: Path) -> None:
    plain = quant_mod.quantize_gguf(models["plain"], tmp_path / "plain-q5_k_m.gguf", "q5_k_m")
    assert "q5_1" in tensor_types(plain).matrices and tensor_types(plain).steered is None
    steered = quant_mod.quantize_gguf(models["grid"], tmp_path / "grid-q5_k_m.gguf", "q5_k_m")
    types = tensor_types(steered)
    assert "q5_1" not in types.matrices and types.matrices.get("q5_0", 0) >= 1
    note = str(GGUFReader(str(steered)).fields[GGUF_KEY_STEERED].contents())
    assert note == types.steered and "q5_1->q5_0" in note
    # every other matrix keeps the type llama.cpp chose
    unsteered = quant_mod.quantize_gguf(models["grid"], tmp_path / "raw.gguf", "q5_k_m", steer=False)
    before, after = quant_mod._matrix_types(unsteered), quant_mod._matrix_types(steered)
    assert {n for n in before if before[n] != after[n]} == {n for n, t in before.items() if t == "q5_1"}
    assert all(after[n] == "q5_0" for n, t in before.items() if t == "q5_1")
