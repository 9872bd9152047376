"""GGUF export per architecture: llama.cpp's logits match PyTorch's for every arch and checkpoint trait
(untied head, bf16 weights, sharded safetensors, vocab padded past the tokenizer, rope scalings), q8_0 stays
close, and configs llama.cpp cannot run as transformers does are refused in one line before any file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from tinymodels import ARCHS, kld, load_tokenizer, make_model, quiet_transformers

from edgeft.errors import EdgeftError
from edgeft.formats.gguf.export import export_gguf
from edgeft.formats.gguf.runtime import LlamaCppRuntime

TEXT = (
    "The quick brown fox jumps over the lazy dog. In Python, a function is defined with def; "
    "for example:\n\ndef square(x):\n\treturn x ** 2  # 1234567890\n\n"
    "Names are bound to objects, and the for statement iterates over the items of any sequence."
)
N_IDS = 60  # longer than the Gemma sliding window (16 in tinymodels) and Phi-3.5's short context below
N_CTX = 128

# Tokenizer per arch, as the real checkpoints ship them (SentencePiece for Mistral/Gemma/Phi-3).
KIND = {
    "llama": "bpe-llama3",
    "mistral": "spm",
    "qwen2": "bpe",
    "qwen3": "bpe",
    "gemma2": "spm",
    "gemma3": "spm",
    "phi3": "spm",
}
# Gemma 3: 5 local layers then a global one, the layout llama.cpp hard-codes (src/models/gemma3.cpp).
BASE: dict[str, dict[str, Any]] = {a: {"layers": 6} if a == "gemma3" else {} for a in ARCHS}
TRAITS: dict[str, dict[str, Any]] = {
    "tied": {},
    "untied": {"tie_embeddings": False},
    "bf16": {"dtype": torch.bfloat16},
    "sharded": {"max_shard_size": "40KB"},
    "vocab_pad": {"vocab_pad": 45},
}


def _rope(config: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """make_model kwargs for a flat transformers 5 rope_parameters (+ other config fields)."""
    return {"config_overrides": {**(config or {}), "rope_parameters": {"rope_theta": 1000.0, **kw}}}


def _factors(n: int, base: float) -> list[float]:
    return [round(base + 0.25 * i, 3) for i in range(n)]


# Rope scalings, layer layouts and optional features per arch (hidden 64, 4 heads: head_dim 16, or 32 for
# Qwen3/Gemma).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-llama3": (
        "llama",
        _rope(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "llama-linear": ("llama", _rope(rope_type="linear", factor=4.0)),
    # Mistral-Nemo: head_dim 128 != 5120 / 32 heads (Q/K permuted per head of head_dim rows)
    "mistral-head-dim": ("mistral", {"config_overrides": {"head_dim": 32}}),
    "llama-yarn": ("llama", _rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=128)),
    "qwen3-yarn": ("qwen3", _rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=128)),
    "qwen3-yarn-attn": (
        "qwen3",
        _rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=128, attention_factor=1.3),
    ),
    "gemma2-linear": ("gemma2", _rope(rope_type="linear", factor=2.0)),
    # Gemma 3 4B+: linear scaling on global layers only, local layers unscaled on their own base
    "gemma3-linear-global": (
        "gemma3",
        {
            "layers": 6,
            "config_overrides": {
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                }
            },
        },
    ),
    # A layer layout other than llama.cpp's built-in one: written as a per-layer pattern array
    "gemma3-layout": (
        "gemma3",
        {
            "layers": 4,
            "config_overrides": {
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
            },
        },
    ),
    "gemma3-all-global": (
        "gemma3",
        {"layers": 2, "config_overrides": {"layer_types": ["full_attention", "full_attention"]}},
    ),
    "gemma3-final-softcap": ("gemma3", {"layers": 2, "config_overrides": {"final_logit_softcapping": 3.0}}),
    # Phi-4-mini: rotary on 3/4 of each head
    "phi3-partial": ("phi3", _rope(rope_type="default", partial_rotary_factor=0.75)),
    # Phi-3.5-mini: LongRoPE; short factors while the context fits the original one (256 > N_CTX) ...
    "phi3-longrope-short": (
        "phi3",
        _rope(rope_type="longrope", short_factor=_factors(8, 1.0), long_factor=_factors(8, 2.0)),
    ),
    # ... long factors past it (32 < N_IDS: transformers picks by sequence length, llama.cpp by n_ctx)
    "phi3-longrope-long": (
        "phi3",
        _rope(
            {"original_max_position_embeddings": 32},
            rope_type="longrope",
            partial_rotary_factor=0.75,
            short_factor=_factors(6, 1.0),
            long_factor=_factors(6, 2.0),
        ),
    ),
}


@dataclass
class Case:
    model_dir: Path
    ids: list[int]
    ref: np.ndarray
    got: np.ndarray
    gguf: Path


_CASES: dict[str, Case] = {}


def torch_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def gguf_logits(path: Path, ids: list[int]) -> np.ndarray:
    rt = LlamaCppRuntime(path, threads=2, n_ctx=N_CTX)
    try:
        return rt.logits(ids)
    finally:
        rt.close()


def _case(key: str, arch: str, kw: dict[str, Any], out: Path) -> Case:
    """Build (once per module) the tiny model, export it, and score it in both runtimes."""
    if key not in _CASES:
        # Neutral directory names: the GGUF's general.name is the directory's, and llama.cpp gives names
        # containing "phi3" Phi-3 token attributes that need <|endoftext|>, which the tiny SPM vocab lacks
        # (src/llama-vocab.cpp, `_contains_any(model_name, {"phi-3", "phi3"})`).
        model_dir = make_model(arch, KIND[arch], out / f"model{len(_CASES)}", **kw)
        ids = load_tokenizer(model_dir).encode(TEXT)[:N_IDS]
        assert len(ids) == N_IDS
        res = export_gguf(model_dir, out / f"model{len(_CASES)}.gguf", "f32")
        _CASES[key] = Case(model_dir, ids, torch_logits(model_dir, ids), gguf_logits(res.path, ids), res.path)
    return _CASES[key]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-archs")


TIE = 1e-3  # reference logits closer than this are a tie: f32 summation order and llama.cpp's f16 KV decide


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """Share of positions where llama.cpp's top-1 is PyTorch's top-1, or ties with it within TIE."""
    pick = got.argmax(-1)
    rows = np.arange(len(ref))
    return float((ref[rows, pick] >= ref.max(-1) - TIE).mean())


def _assert_exact(c: Case) -> None:
    """The noise floor is llama.cpp's, not the converter's: its KV cache is f16 and Gemma's GELU is an f16
    lookup table (ggml-cpu vec.h GGML_GELU_FP16), ~1e-8..5e-7 KLD here. With an f32 KV cache the other
    archs match PyTorch to ~1e-13, and Gemma to ~1e-9 against a PyTorch GELU rounded the same way."""
    assert c.got.shape == c.ref.shape
    assert kld(c.ref, c.got) < 1e-6
    assert top1_agreement(c.ref, c.got) == 1.0


# llama.cpp's gemma2 has no output.weight: an untied Gemma 2 is refused (test_refusals), not compared.
ARCH_TRAITS = [(a, t) for a in ARCHS for t in TRAITS if (a, t) != ("gemma2", "untied")]


@pytest.mark.parametrize(("arch", "trait"), ARCH_TRAITS)
def test_f32_matches_torch(arch: str, trait: str, out_dir: Path) -> None:
    c = _case(f"{arch}-{trait}", arch, {**BASE[arch], **TRAITS[trait]}, out_dir)
    _assert_exact(c)
    names = {t.name for t in gguf.GGUFReader(c.gguf).tensors}
    assert ("output.weight" in names) == (trait == "untied")
    if trait == "vocab_pad":
        assert c.ref.shape[1] == len(load_tokenizer(c.model_dir)) + TRAITS["vocab_pad"]["vocab_pad"]
    if trait == "sharded":
        assert (c.model_dir / "model.safetensors.index.json").is_file()
        assert len(list(c.model_dir.glob("*.safetensors"))) > 1


@pytest.mark.parametrize("key", list(VARIANTS))
def test_variants_match_torch(key: str, out_dir: Path) -> None:
    arch, kw = VARIANTS[key]
    c = _case(key, arch, kw, out_dir)
    _assert_exact(c)
    fields = gguf.GGUFReader(c.gguf).fields
    name = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3]
    pattern = gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=name)
    window = gguf.Keys.Attention.SLIDING_WINDOW.format(arch=name)
    # the per-layer SWA array only when the layout is not llama.cpp's built-in one (src/models/gemma3.cpp)
    assert (pattern in fields) == (key == "gemma3-layout")
    assert (window in fields) == (arch == "gemma3" and key != "gemma3-all-global")


def test_gemma_attention_scale_follows_llama_cpp(tmp_path: Path) -> None:
    """llama.cpp scales Q by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B layer counts
    (src/models/gemma2.cpp); query_pre_attn_scalar is folded into Q only where the two differ."""
    from edgeft.formats.gguf.arch import _gemma_q_scale, parse_model

    def scale(arch: str, layers: int, hidden: int, heads: int, head_dim: int, qpas: int) -> float:
        cfg = {
            "architectures": [arch],
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "intermediate_size": 4 * hidden,
            "vocab_size": 256000,
            "head_dim": head_dim,
            "query_pre_attn_scalar": qpas,
        }
        d = tmp_path / f"{arch}{layers}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        return _gemma_q_scale(parse_model(d))

    assert scale("Gemma2ForCausalLM", 26, 2304, 8, 256, 256) == 1.0  # Gemma 2 2B
    assert scale("Gemma2ForCausalLM", 46, 4608, 32, 128, 144) == 1.0  # Gemma 2 27B: hidden / heads
    assert scale("Gemma3ForCausalLM", 62, 5376, 32, 128, 168) == 1.0  # Gemma 3 27B
    assert scale("Gemma3ForCausalLM", 26, 1152, 4, 256, 256) == 1.0  # Gemma 3 1B
    assert scale("Gemma2ForCausalLM", 2, 64, 4, 32, 8) == 2.0  # tiny: sqrt(32 / 8)


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_loads_and_stays_close(arch: str, out_dir: Path) -> None:
    base = _case(f"{arch}-tied", arch, {**BASE[arch]}, out_dir)
    res = export_gguf(base.model_dir, base.gguf.with_suffix(".q8_0.gguf"), "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(res.path).tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    got = gguf_logits(res.path, base.ids)
    assert kld(base.ref, got) < 0.01


# --- transformers 4 spellings of the same configs (what most hub checkpoints still carry) ---------------


def _legacy_gemma3(cfg: dict[str, Any]) -> None:
    """rope_theta + rope_local_base_freq + rope_scaling (global layers only) + sliding_window_pattern."""
    rope = cfg.pop("rope_parameters")
    full, local = rope["full_attention"], rope["sliding_attention"]
    cfg["rope_theta"], cfg["rope_local_base_freq"] = full.pop("rope_theta"), local["rope_theta"]
    cfg["rope_scaling"] = full
    cfg["sliding_window_pattern"] = 6
    del cfg["layer_types"]


def _legacy_flat(cfg: dict[str, Any]) -> None:
    """rope_theta (+ partial_rotary_factor) beside rope_scaling {"type": ...}, as Llama 3.x and Phi-3.5 ship."""
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope


LEGACY = {
    "gemma3-linear-global": _legacy_gemma3,
    "llama-llama3": _legacy_flat,
    "phi3-longrope-long": _legacy_flat,
}


@pytest.mark.parametrize("key", list(LEGACY))
def test_transformers4_configs_match_torch(key: str, out_dir: Path) -> None:
    arch, kw = VARIANTS[key]
    base = _case(key, arch, kw, out_dir)
    d = shutil.copytree(base.model_dir, out_dir / f"legacy{list(LEGACY).index(key)}")  # no "phi3" in names
    cfg = json.loads((d / "config.json").read_text())
    LEGACY[key](cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    ref = torch_logits(d, base.ids)
    assert kld(base.ref, ref) < 1e-12  # transformers reads the old spelling as the same model
    res = export_gguf(d, d.with_suffix(".gguf"))
    got = gguf_logits(res.path, base.ids)
    assert kld(ref, got) < 1e-6 and top1_agreement(ref, got) == 1.0


# --- refusals: one line naming config.json, the field and the value; no file written -------------------

_GEMMA3_LOCAL_SCALED = {
    "full_attention": {"rope_type": "default", "rope_theta": 1000.0},
    "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0},
}
REFUSALS: dict[str, tuple[str, dict[str, Any], str]] = {
    "rope-type": (
        "llama",
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
        "rope_parameters.rope_type 'dynamic'",
    ),
    "qwen-llama3": (
        "qwen2",
        {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
        "rope_parameters.rope_type 'llama3'",
    ),
    "yarn-beta": (
        "qwen3",
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16}},
        "rope_parameters.beta_fast 16",
    ),
    "partial-rotary": (
        "qwen3",
        {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
        "rope_parameters.partial_rotary_factor 0.5",
    ),
    "activation": ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    "phi3-head-dim": ("phi3", {"head_dim": 32}, "head_dim 32"),
    "phi3-longrope-length": (
        "phi3",
        {"rope_parameters": {"rope_type": "longrope", "long_factor": [1.0] * 3, "short_factor": [1.0] * 8}},
        "rope_parameters.long_factor of length 3",
    ),
    "qwen3-attention-bias": ("qwen3", {"attention_bias": True}, "attention_bias true"),
    "gemma2-untied": ("gemma2", {"tie_word_embeddings": False}, "tie_word_embeddings false"),
    "gemma2-no-softcap": ("gemma2", {"attn_logit_softcapping": None}, "attn_logit_softcapping null"),
    "gemma3-attn-softcap": ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0"),
    "gemma3-bidirectional": (
        "gemma3",
        {"use_bidirectional_attention": True},
        "use_bidirectional_attention true",
    ),
    "gemma3-local-scaling": (
        "gemma3",
        {"rope_parameters": _GEMMA3_LOCAL_SCALED},
        "rope_parameters.sliding_attention.rope_type 'linear'",
    ),
    "gemma3-layer-types": (
        "gemma3",
        {"layer_types": ["chunked_attention"] * 6},
        "layer_types 'chunked_attention'",
    ),
}


# Architectures llama.cpp runs with full attention although the config has a window (Mistral-7B-v0.1: 4096
# of 32768; Phi-3-mini-4k: 2047 of 4096): exported with context_length = the window, exact up to it.
WINDOWS = {
    "mistral": {"sliding_window": 64},
    "qwen3": {"use_sliding_window": True, "sliding_window": 64},
    "phi3": {"sliding_window": 64},
}


@pytest.mark.parametrize("arch", list(WINDOWS))
def test_ignored_window_caps_the_context(arch: str, out_dir: Path) -> None:
    c = _case(f"{arch}-window", arch, {**BASE[arch], "config_overrides": WINDOWS[arch]}, out_dir)
    assert N_IDS < 64
    _assert_exact(c)  # within the window llama.cpp's full attention is transformers' windowed attention
    reader = gguf.GGUFReader(c.gguf)
    field = reader.fields[f"{gguf.MODEL_ARCH_NAMES[reader_arch(reader)]}.context_length"]
    assert int(field.parts[field.data[0]][0]) == 64


def reader_arch(reader: gguf.GGUFReader) -> gguf.MODEL_ARCH:
    field = reader.fields["general.architecture"]
    name = bytes(field.parts[field.data[0]]).decode()
    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


@pytest.mark.parametrize("key", list(REFUSALS))
def test_refusals(key: str, out_dir: Path, tmp_path: Path) -> None:
    arch, edits, expected = REFUSALS[key]
    base = _case(f"{arch}-tied", arch, {**BASE[arch]}, out_dir)
    d = shutil.copytree(base.model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    if "rope_parameters" in edits and "full_attention" not in edits["rope_parameters"]:
        edits = {**edits, "rope_parameters": {"rope_theta": 1000.0, **edits["rope_parameters"]}}
    cfg.update(edits)
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EdgeftError) as e:
        export_gguf(d, out / "m.gguf")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{d / 'config.json'}: ") and expected in msg, msg
    assert list(out.iterdir()) == []
