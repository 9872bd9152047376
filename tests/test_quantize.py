"""llama.cpp quantization of exported GGUFs: types applied, loads, drift ordered by bits."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from test_gguf import TEXT, gguf_logits, kld, torch_logits
from tinymodels import cached_model, load_tokenizer

from edgeft.errors import EdgeftError
from edgeft.formats.gguf.export import export_gguf
from edgeft.formats.gguf.quantize import quantize_gguf

Q = gguf.GGMLQuantizationType


def _types(path: Path) -> dict[str, Q]:
    return {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}


def test_drift_ordered_f32_q8_q4(tmp_path: Path) -> None:
    model_dir = cached_model("llama", "bpe")
    ids = load_tokenizer(model_dir).encode(TEXT)
    ref = torch_logits(model_dir, ids)
    drift: dict[str, float] = {}
    for quant, qtype in (("f32", Q.F32), ("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)):
        res = export_gguf(model_dir, tmp_path / f"m-{quant}.gguf", quant)
        assert res.quant == quant and res.n_tensors == 20
        assert _types(res.path)["blk.0.ffn_up.weight"] == qtype
        logits = gguf_logits(res.path, ids)
        assert np.isfinite(logits).all()
        drift[quant] = kld(ref, logits)
    print(f"KLD vs PyTorch: {drift}")
    assert drift["f32"] < drift["q8_0"] < drift["q4_0"]
    assert drift["q8_0"] < 5e-3
    sizes = {q: (tmp_path / f"m-{q}.gguf").stat().st_size for q in drift}
    assert sizes["f32"] > sizes["q8_0"] > sizes["q4_0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-f32.gguf", "m-q4_0.gguf", "m-q8_0.gguf"]


def test_q4_k_m_hidden_256(tmp_path: Path) -> None:
    model_dir = cached_model("llama", "bpe", hidden=256, intermediate=512, seed=3)
    ids = load_tokenizer(model_dir).encode(TEXT)
    ref = torch_logits(model_dir, ids)
    f32 = export_gguf(model_dir, tmp_path / "f32.gguf", "f32")
    res = export_gguf(model_dir, tmp_path / "q4km.gguf", "q4_k_m")
    types = _types(res.path)
    assert types["blk.0.attn_q.weight"] == Q.Q4_K
    assert Q.Q6_K in types.values()  # the _m mix keeps some tensors at 6 bits
    logits = gguf_logits(res.path, ids)
    assert np.isfinite(logits).all()
    d32, dq = kld(ref, gguf_logits(f32.path, ids)), kld(ref, logits)
    print(f"KLD vs PyTorch (hidden 256): f32 {d32:.3g}, q4_k_m {dq:.3g}")
    assert d32 < 1e-6 and 1e-4 < dq < 0.5


def test_quantize_errors(tmp_path: Path) -> None:
    with pytest.raises(EdgeftError, match="q4_0"):
        quantize_gguf(tmp_path / "a.gguf", tmp_path / "b.gguf", "q1_x")
    with pytest.raises(EdgeftError, match="does not exist"):
        quantize_gguf(tmp_path / "a.gguf", tmp_path / "b.gguf", "q8_0")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EdgeftError, match="not a usable GGUF"):
        quantize_gguf(bad, out / "b.gguf", "q8_0")
    assert list(out.iterdir()) == []
