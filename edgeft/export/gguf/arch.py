"""Per-architecture facts for GGUF: hyperparameter keys, tensor names and layout transforms."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...errors import EdgeftError
from .weights import Plan, safetensors_files, tensor_index


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Reorder rotary halves of Q/K rows from HF's rotate_half layout to GGML's interleaved one.

    ref: llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- hyperparameters -------------------------------------------------------------------------------------


def _rope_params(config: dict[str, Any]) -> dict[str, Any]:
    """Rope settings across transformers 4 (rope_theta + rope_scaling) and 5 (rope_parameters)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    params = {**scaling, **params}
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    return params


def _llama3_rope_factors(params: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors for Llama-3.x rope scaling, stored as rope_freqs.weight.

    ref: llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors
    """
    base = float(params["rope_theta"])
    factor = float(params.get("factor", 8.0))
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_hparams(w: gguf.GGUFWriter, config: dict[str, Any], ftype: int, n_vocab: int) -> np.ndarray | None:
    """Model hyperparameters; returns the rope_freqs tensor when the rope scaling needs one."""
    n_embd = int(config["hidden_size"])
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    w.add_context_length(int(config.get("max_position_embeddings", 2048)))
    w.add_embedding_length(n_embd)
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(ftype)

    rope = _rope_params(config)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    rope_type = rope["rope_type"]
    if rope_type == "default":
        return None
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
        return None
    if rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        orig = rope.get("original_max_position_embeddings")
        if orig:
            w.add_rope_scaling_orig_ctx_len(int(orig))
        return None
    if rope_type == "llama3":
        return _llama3_rope_factors(rope, head_dim)
    raise EdgeftError(
        f"config.json: rope scaling type {rope_type!r} is not supported for GGUF export "
        "(supported: default, linear, yarn, llama3)"
    )


def plan_tensors(
    model_dir: Path, arch: gguf.MODEL_ARCH, config: dict[str, Any], extra: np.ndarray | None
) -> list[Plan]:
    from safetensors import safe_open

    files = safetensors_files(model_dir)
    index = tensor_index(files)
    n_layers = int(config["num_hidden_layers"])
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    tied = bool(config.get("tie_word_embeddings", False))
    plans: list[Plan] = []
    if extra is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plans.append(Plan(name, None, "", tuple(extra.shape), data=extra))
    for hf_name, path in index.items():
        if hf_name.endswith((".rotary_emb.inv_freq", "attention.masked_bias", "attention.bias")):
            continue
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp falls back to token_embd.weight when output.weight is absent
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EdgeftError(f"{path}: tensor {hf_name!r} has no GGUF name for arch {arch.name.lower()}")
        with safe_open(str(path), framework="pt") as sf:
            shape = tuple(sf.get_slice(hf_name).get_shape())
        transform = None
        if arch == gguf.MODEL_ARCH.LLAMA:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                transform = functools.partial(permute, n_head=n_head, n_head_kv=n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                transform = functools.partial(permute, n_head=n_head, n_head_kv=n_head_kv)
        plans.append(Plan(name, path, hf_name, shape, transform))
    return plans
