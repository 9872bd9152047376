"""HF → GGUF export: logits in llama.cpp match PyTorch, metadata survives, bad inputs fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tinymodels import cached_model, kld, load_tokenizer, quiet_transformers

from edgeft.errors import EdgeftError
from edgeft.formats.gguf.export import export_gguf
from edgeft.formats.gguf.runtime import LlamaCppRuntime

TEXT = (
    "The quick brown fox jumps over the lazy dog. In Python, a function is defined with def; "
    "for example:\n\ndef square(x):\n\treturn x ** 2  # 1234567890\n\n"
    "Names are bound to objects, and the for statement iterates over the items of any sequence."
)


def decisive_top1(ref_logits: np.ndarray, test_logits: np.ndarray, gap: float = 1e-2) -> float:
    """Top-1 agreement on positions whose reference top-2 logits differ by more than `gap`.

    Random tiny models have occasional exact-ish ties (|Δ| ~ 1e-3) where float summation order decides.
    """
    top2 = np.sort(ref_logits, -1)[:, -2:]
    keep = (top2[:, 1] - top2[:, 0]) > gap
    assert keep.mean() > 0.9
    return float((ref_logits.argmax(-1)[keep] == test_logits.argmax(-1)[keep]).mean())


def torch_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def gguf_logits(path: Path, ids: list[int]) -> np.ndarray:
    rt = LlamaCppRuntime(path, threads=2)
    try:
        return rt.logits(ids)
    finally:
        rt.close()


CASES = [("llama", "bpe"), ("llama", "spm"), ("qwen2", "bpe")]


@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_f32_matches_torch(arch: str, kind: str, tmp_path: Path) -> None:
    model_dir = cached_model(arch, kind)
    ids = load_tokenizer(model_dir).encode(TEXT)
    assert len(ids) > 60
    res = export_gguf(model_dir, tmp_path / "m.gguf", "f32")
    assert res.path.is_file() and res.bytes == res.path.stat().st_size
    assert res.arch == arch and res.quant == "f32"
    ref = torch_logits(model_dir, ids)
    got = gguf_logits(res.path, ids)
    assert got.shape == ref.shape
    assert kld(ref, got) < 1e-6  # llama.cpp's f16 KV cache is the noise floor here (~1e-7)
    assert decisive_top1(ref, got) == 1.0


@pytest.mark.parametrize("quant", ["f16", "bf16"])
def test_half_precision(quant: str, tmp_path: Path) -> None:
    model_dir = cached_model("llama", "bpe")
    ids = load_tokenizer(model_dir).encode(TEXT)
    res = export_gguf(model_dir, tmp_path / "m.gguf", quant)
    reader = gguf.GGUFReader(res.path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # 1-D stays f32
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType[quant.upper()]
    ref = torch_logits(model_dir, ids)
    assert kld(ref, gguf_logits(res.path, ids)) < 5e-3


def test_untied_embeddings_and_progress(tmp_path: Path) -> None:
    model_dir = cached_model("qwen2", "bpe", tie_embeddings=False, seed=1)
    calls: list[tuple[int, int]] = []
    res = export_gguf(model_dir, tmp_path / "m.gguf", "f32", progress=lambda i, n: calls.append((i, n)))
    names = {t.name for t in gguf.GGUFReader(res.path).tensors}
    assert "output.weight" in names and "blk.0.attn_q.bias" in names
    assert calls[-1] == (res.n_tensors, res.n_tensors) and len(calls) == res.n_tensors
    tied = export_gguf(cached_model("qwen2", "bpe"), tmp_path / "t.gguf", "f32")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(tied.path).tensors}
    ids = load_tokenizer(model_dir).encode(TEXT)
    assert kld(torch_logits(model_dir, ids), gguf_logits(res.path, ids)) < 1e-6


def _field(reader: gguf.GGUFReader, key: str):  # noqa: ANN202 - scalar, str or list
    return reader.fields[key].contents()


@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_tokenizer_metadata_survives(arch: str, kind: str, tmp_path: Path) -> None:
    model_dir = cached_model(arch, kind)
    tok = load_tokenizer(model_dir)
    res = export_gguf(model_dir, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(res.path)
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") == (tok.encode("a")[0] == tok.bos_token_id)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == len(tok)
    for special in tok.all_special_tokens:
        tid = tok.convert_tokens_to_ids(special)
        assert tokens[tid] == special
        expected = gguf.TokenType.UNKNOWN if special == tok.unk_token else gguf.TokenType.CONTROL
        assert types[tid] == expected, special
    if kind == "spm":
        assert _field(reader, "tokenizer.ggml.model") == "llama"
        assert types[tok.convert_tokens_to_ids("<0x0A>")] == gguf.TokenType.BYTE
    else:
        assert _field(reader, "tokenizer.ggml.model") == "gpt2"
        assert _field(reader, "tokenizer.ggml.pre") == ("qwen2" if arch == "qwen2" else "gpt-2")
    # ... and llama.cpp reads them back the same way
    rt = LlamaCppRuntime(res.path)
    try:
        assert rt.metadata["tokenizer.chat_template"] == tok.chat_template
        assert int(rt.metadata["tokenizer.ggml.eos_token_id"]) == tok.eos_token_id
        assert rt.n_vocab == len(tok)
        chat = tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False)
        assert rt.tokenize(chat, add_special=False) == tok.encode(chat, add_special_tokens=False)
    finally:
        rt.close()


def test_greedy_generate_matches_torch(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = cached_model("llama", "bpe")
    ids = load_tokenizer(model_dir).encode("The for statement")
    res = export_gguf(model_dir, tmp_path / "m.gguf")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    rt = LlamaCppRuntime(res.path)
    try:
        assert rt.generate(ids, 8) == ref
        assert rt.generate(ids, 8, stop_ids=[ref[2]]) == ref[: ref.index(ref[2]) + 1]
        assert rt.generate(ids, 1) == ref[:1]
    finally:
        rt.close()


# --- failures --------------------------------------------------------------------------------------------


def _copy(model_dir: Path, dst: Path) -> Path:
    shutil.copytree(model_dir, dst)
    return dst


def test_unknown_pre_tokenizer(tmp_path: Path) -> None:
    d = _copy(cached_model("llama", "bpe"), tmp_path / "m")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{L}+|\S"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    (d / "tokenizer.json").write_text(json.dumps(tj))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EdgeftError) as e:
        export_gguf(d, out / "m.gguf")
    msg = str(e.value)
    assert r"\\p{L}+|\\S" in msg and "Split" in msg  # names what was found
    assert "gpt-2" in msg and "llama-bpe" in msg and "qwen2" in msg  # lists the known ones
    assert "\n" not in msg
    assert list(out.iterdir()) == []  # no partial or temp file left behind


def test_unsupported_architecture(tmp_path: Path) -> None:
    d = _copy(cached_model("llama", "bpe"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeftError, match="GPT2LMHeadModel") as e:
        export_gguf(d, tmp_path / "m.gguf")
    assert "LlamaForCausalLM" in str(e.value) and "Qwen2ForCausalLM" in str(e.value)


def test_missing_dir_config_and_pickle(tmp_path: Path) -> None:
    with pytest.raises(EdgeftError, match="does not exist"):
        export_gguf(tmp_path / "nope", tmp_path / "m.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeftError, match="config.json"):
        export_gguf(tmp_path / "empty", tmp_path / "m.gguf")
    d = _copy(cached_model("llama", "bpe"), tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(EdgeftError, match="pickle"):
        export_gguf(d, tmp_path / "m.gguf")
    with pytest.raises(EdgeftError, match="q4_k_m"):
        export_gguf(d, tmp_path / "m.gguf", "q3_k")
    assert not (tmp_path / "m.gguf").exists()


def test_long_sequence_and_open_runtime(tmp_path: Path) -> None:
    """~400 positions in one eval call (rope at long range); open_runtime picks llama.cpp for .gguf."""
    from edgeft.formats import open_runtime

    model_dir = cached_model("qwen2", "bpe")
    ids = load_tokenizer(model_dir).encode(TEXT * 6)[:400]
    assert len(ids) == 400
    res = export_gguf(model_dir, tmp_path / "m.gguf")
    rt = open_runtime(res.path, threads=2, n_ctx=512)
    try:
        assert isinstance(rt, LlamaCppRuntime)
        got = rt.logits(ids)
        assert got.dtype == np.float32 and got.shape == (400, rt.n_vocab)
        assert kld(torch_logits(model_dir, ids), got) < 1e-6
        with pytest.raises(EdgeftError, match="n_ctx"):
            rt.logits(ids * 2)
    finally:
        rt.close()
