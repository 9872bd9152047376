"""ONNX export per architecture and checkpoint trait: fp32 logits and onnxruntime-genai greedy output match
PyTorch float32, int8 stays close, and what the builder cannot export correctly is refused in one line.

Each case is a tiny random model with the traits of a real checkpoint family (see CASES); every model is
built and exported once per module. Sequences are longer than the sliding windows (16), so windowed layers,
their window-sized KV caches and the long-RoPE switch are all exercised.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from tinymodels import corpus_lines, kld, leftovers, load_tokenizer, make_model, quiet_transformers

from edgeft.errors import EdgeftError
from edgeft.formats.onnx.constants import ONNX_ARCHS, ONNX_SUPPORTED_ARCHS
from edgeft.formats.onnx.export import export_onnx
from edgeft.formats.onnx.runtime import OrtRuntime

N_IDS = 60  # scored ids: past every sliding window (16) and the long-RoPE switch (48)
PROMPT_IDS = 24  # generation prompt: longer than the window, so genai's prefill fills a full window cache
N_NEW = 20
WINDOW = 16
KLD_FP32 = 1e-6
# Phi-3.5 / Phi-4-mini: longrope with partial rotary (0.75 of head_dim 64 = 48 rotary dims, 24 factors).
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 1000.0,
    "partial_rotary_factor": 0.75,
    "short_factor": [1.0 + 0.05 * i for i in range(24)],
    "long_factor": [1.5 + 0.25 * i for i in range(24)],
}
# Gemma 3: one sliding and one global layer, each with its own (non-default) RoPE theta.
GEMMA3_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 1000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
}


@dataclass(frozen=True)
class Case:
    """A tiny model: make_model arguments, config.json edits after saving, and how to store the weights."""

    arch: str
    kw: dict = field(default_factory=dict)
    config_edits: dict = field(default_factory=dict)  # for fields _arch_config sets itself
    shards: bool = False  # re-save as several safetensors shards (+ a pickle decoy the export must skip)
    short_ids: int = 0  # also score this many ids (long-RoPE: below original_max_position_embeddings)


CASES: dict[str, Case] = {
    "llama": Case("llama"),
    # Mistral 7B v0.1: sliding window in every layer
    "mistral-window": Case("mistral", config_edits={"sliding_window": WINDOW}),
    "qwen2-untied-padded": Case("qwen2", {"tie_embeddings": False, "vocab_pad": 48}),
    # Qwen3: head_dim 32 != hidden 64 / 4 heads, q/k norms; bf16 shards
    "qwen3-bf16-shards": Case("qwen3", {"dtype": torch.bfloat16}, shards=True),
    # Gemma 2: soft-capping, alternating sliding layers, query_pre_attn_scalar, sqrt(64) = 8 embedding scale
    "gemma2": Case("gemma2"),
    # sqrt(96) embedding scale (the builder rounds it to 2 decimals), norm offsets on bf16 weights
    "gemma2-bf16-h96": Case("gemma2", {"dtype": torch.bfloat16, "hidden": 96, "heads": 6}),
    "gemma3": Case(
        "gemma3",
        {
            "config_overrides": {
                "layer_types": ["sliding_attention", "full_attention"],
                "rope_parameters": GEMMA3_ROPE,
            }
        },
        shards=True,
    ),
    # Phi-3-mini-4k: fused qkv/gate_up, sliding window, untied head, embedding padded past the tokenizer
    "phi3-window-untied-padded": Case(
        "phi3", {"tie_embeddings": False, "vocab_pad": 64}, config_edits={"sliding_window": WINDOW}
    ),
    # Phi-3.5-mini / Phi-4-mini: longrope, partial rotary, tied, padded, bf16 shards
    "phi3-longrope": Case(
        "phi3",
        {
            "hidden": 128,
            "heads": 2,
            "kv_heads": 1,
            "vocab_pad": 64,
            "dtype": torch.bfloat16,
            "config_overrides": {"rope_parameters": LONGROPE, "original_max_position_embeddings": 48},
        },
        shards=True,
        short_ids=40,
    ),
}
# One plain case per architecture for the int8 export.
INT8_CASES = (
    "llama",
    "mistral-window",
    "qwen2-untied-padded",
    "qwen3-bf16-shards",
    "gemma2",
    "gemma3",
    "phi3-window-untied-padded",
)


def _reshard(model_dir: Path) -> None:
    """Re-save the weights as several safetensors shards, in their own dtype, plus pickle files to ignore."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    (model_dir / "model.safetensors").unlink()
    model.save_pretrained(model_dir, max_shard_size="150KB")
    assert len(list(model_dir.glob("model-*.safetensors"))) > 1
    # If anything loaded these, unpickling would fail (or run code): the export must never read them.
    (model_dir / "pytorch_model.bin").write_bytes(b"not a pickle")
    (model_dir / "training_args.bin").write_bytes(b"not a pickle")


def _build(case: Case, out_dir: Path) -> Path:
    make_model(case.arch, "bpe", out_dir, **case.kw)
    if case.config_edits:
        cfg_path = out_dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(case.config_edits)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    if case.shards:
        _reshard(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-archs")


@pytest.fixture(scope="module")
def hf(root: Path) -> Callable[[str], Path]:
    """case name → its HF model dir, built once."""
    dirs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in dirs:
            dirs[name] = _build(CASES[name], root / "hf" / name)
        return dirs[name]

    return get


@pytest.fixture(scope="module")
def onnx(root: Path, hf: Callable[[str], Path]) -> Callable[[str, str], Path]:
    """(case name, quant) → its ONNX export, built once, with torch.load poisoned while the builder runs."""
    outs: dict[tuple[str, str], Path] = {}

    def no_pickle(*a: object, **k: object) -> None:
        raise AssertionError("the ONNX export loaded a pickle file")

    def get(name: str, quant: str) -> Path:
        if (name, quant) not in outs:
            out = root / "onnx" / f"{name}-{quant}"
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch, "load", no_pickle)
                export_onnx(hf(name), out, quant)
            outs[(name, quant)] = out
        return outs[(name, quant)]

    return get


def ids_of(model_dir: Path, n: int = N_IDS) -> list[int]:
    ids = load_tokenizer(model_dir).encode(" ".join(corpus_lines()[:40]))[:n]
    assert len(ids) == n
    return ids


def torch_model(model_dir: Path, **overrides: object):  # noqa: ANN201 - transformers model
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **overrides).eval()


@torch.no_grad()
def torch_logits(model_dir: Path, ids: list[int], **overrides: object) -> np.ndarray:
    return torch_model(model_dir, **overrides)(torch.tensor([ids])).logits[0].numpy()


@torch.no_grad()
def torch_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by full recompute each step: independent of any KV-cache code."""
    model, seq = torch_model(model_dir), list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


# --- fp32: the export is the model ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_logits_match_torch(
    name: str, hf: Callable[[str], Path], onnx: Callable[[str, str], Path]
) -> None:
    model_dir, out = hf(name), onnx(name, "fp32")
    counts = [N_IDS] + ([CASES[name].short_ids] if CASES[name].short_ids else [])
    with OrtRuntime(out, threads=1) as rt:
        cfg = json.loads((model_dir / "config.json").read_text())
        assert rt.n_vocab == cfg["vocab_size"]  # padded rows included
        for n in counts:
            ids = ids_of(model_dir, n)
            ref, got = torch_logits(model_dir, ids), rt.logits(ids)
            assert got.shape == ref.shape == (n, cfg["vocab_size"])
            drift = kld(ref, got)
            print(f"{name} fp32 n={n}: KLD {drift:.2e}")
            assert drift < KLD_FP32
            assert (ref.argmax(-1) == got.argmax(-1)).all()


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_genai_greedy_matches_torch(
    name: str, hf: Callable[[str], Path], onnx: Callable[[str, str], Path]
) -> None:
    model_dir = hf(name)
    ids = ids_of(model_dir, PROMPT_IDS)
    with OrtRuntime(onnx(name, "fp32"), threads=1) as rt:
        got = rt.generate(ids, N_NEW)
    assert got == torch_greedy(model_dir, ids, N_NEW)


# The traits the parity tests rely on really change PyTorch's logits (so a builder that dropped one fails).
TRAITS = [
    ("mistral-window", {"sliding_window": None}),
    ("phi3-window-untied-padded", {"sliding_window": None}),
    ("gemma2", {"sliding_window": 4096}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"query_pre_attn_scalar": 16}),
    ("gemma3", {"sliding_window": 4096}),
    ("gemma3", {"rope_parameters": {**GEMMA3_ROPE, "sliding_attention": GEMMA3_ROPE["full_attention"]}}),
    ("gemma3", {"rope_parameters": {**GEMMA3_ROPE, "full_attention": GEMMA3_ROPE["sliding_attention"]}}),
    ("phi3-longrope", {"rope_parameters": {**LONGROPE, "long_factor": LONGROPE["short_factor"]}}),
    (
        "phi3-longrope",
        {
            "rope_parameters": {
                **LONGROPE,
                "partial_rotary_factor": 1.0,
                "short_factor": [1.0] * 32,
                "long_factor": [1.0] * 32,
            }
        },
    ),
]


@pytest.mark.parametrize(("name", "without"), TRAITS, ids=[f"{n}-{next(iter(w))}" for n, w in TRAITS])
def test_traits_matter(name: str, without: dict, hf: Callable[[str], Path]) -> None:
    model_dir = hf(name)
    ids = ids_of(model_dir)
    assert kld(torch_logits(model_dir, ids), torch_logits(model_dir, ids, **without)) > 1e-3


# --- int8 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", INT8_CASES)
def test_int8_close(name: str, hf: Callable[[str], Path], onnx: Callable[[str, str], Path]) -> None:
    model_dir = hf(name)
    ids = ids_of(model_dir)
    with OrtRuntime(onnx(name, "int8"), threads=1) as rt:
        got = rt.logits(ids)
        assert len(rt.generate(ids[:PROMPT_IDS], 4)) == 4
    ref = torch_logits(model_dir, ids)
    drift, top1 = kld(ref, got), float((ref.argmax(-1) == got.argmax(-1)).mean())
    print(f"{name} int8: KLD {drift:.2e} top1 {top1:.3f}")
    assert np.isfinite(got).all()
    assert drift < 1e-2 and top1 >= 0.9


# --- refusals: one line, before any work -------------------------------------------------------------------


def _variant(src: Path, dst: Path, **edits: object) -> Path:
    """A copy of `src` with config.json fields replaced (only config matters: refusals come first)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(edits)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _refusal(model_dir: Path, out: Path) -> str:
    with pytest.raises(EdgeftError) as e:
        export_onnx(model_dir, out, "fp32")
    msg = str(e.value)
    assert "\n" not in msg and str(model_dir) in msg
    assert not out.exists() and leftovers(out.parent, out.name) == []
    assert not list(out.parent.glob(".edgeft-onnx-*"))  # no work dir left either
    return msg


@pytest.mark.parametrize("arch", [a for a, why in ONNX_ARCHS.items() if why])
def test_refused_architecture(arch: str, tmp_path: Path, hf: Callable[[str], Path]) -> None:
    assert arch not in ONNX_SUPPORTED_ARCHS
    src = _variant(hf("gemma3"), tmp_path / "model", architectures=[arch])
    msg = _refusal(src, tmp_path / "out")
    assert f"{arch} is refused by edgeft's ONNX export: {ONNX_ARCHS[arch]}" in msg
    print(msg)


def test_unknown_architecture_lists_the_table(tmp_path: Path, hf: Callable[[str], Path]) -> None:
    src = _variant(hf("llama"), tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    msg = _refusal(src, tmp_path / "out")
    assert "GPT2LMHeadModel" in msg and all(a in msg for a in ONNX_ARCHS)


@pytest.mark.parametrize(
    ("name", "edits", "expected"),
    [
        # Gemma 3 4B+ style linear scaling of the global layers only: the builder scales the sliding ones too
        (
            "gemma3",
            {
                "rope_parameters": {
                    **GEMMA3_ROPE,
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000.0},
                }
            },
            "RoPE scaling {'full_attention': 'linear'}",
        ),
        ("llama", {"num_attention_heads": 8, "head_dim": 8}, "head_dim 8 is not a multiple of 16"),
        (
            "phi3-longrope",
            {"rope_parameters": {**LONGROPE, "partial_rotary_factor": 0.375}},
            "24 rotary dims (head_dim 64 x partial_rotary_factor 0.375) are not a multiple of 16",
        ),
    ],
    ids=["gemma3-linear-rope", "head-dim-8", "rotary-dims-24"],
)
def test_refused_traits(
    name: str, edits: dict, expected: str, tmp_path: Path, hf: Callable[[str], Path]
) -> None:
    src = _variant(hf(name), tmp_path / name, **edits)
    msg = _refusal(src, tmp_path / "out")
    assert expected in msg and "config.json" in msg


def test_pickle_only_checkpoint_refused(tmp_path: Path, hf: Callable[[str], Path]) -> None:
    src = tmp_path / "pickle-only"
    shutil.copytree(hf("llama"), src)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    msg = _refusal(src, tmp_path / "out")
    assert "model.safetensors" in msg and "pickle" in msg
