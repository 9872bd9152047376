"""What a GGUF costs a device, read from its header: bytes per decoded token, the KV cache llama.cpp
allocates, the tensor types written, and the estimate of each quant before export."""

from __future__ import annotations

from pathlib import Path

import gguf

from edgeft.errors import EdgeftError
from edgeft.footprint import (
    CheckpointCounts,
    Footprint,
    KvShape,
    TensorSums,
    TensorTypes,
    config_kv,
    per_layer,
    positive,
    share_types,
)
from edgeft.formats.gguf.adapter import pair_files
from edgeft.formats.gguf.constants import GGUF_KEY_STEERED, GGUF_LLAMA_QUANTS
from edgeft.formats.gguf.header import check_gguf

# The token embedding table is read with get_rows (one row per token) by every llama.cpp graph builder
# (ref: llama.cpp src/llama-graph.cpp build_inp_embd: ggml_get_rows(ctx0, tok_embd, inp->tokens)). When a
# model has no output.weight, llama.cpp loads token_embd.weight as the output head too (ref:
# src/llama-model.cpp load_tensors: "if output is NULL, use tok_embd" with TENSOR_DUPLICATED), and then the
# whole table is streamed by the lm_head matmul every token.
GGUF_TOKEN_EMBD = "token_embd.weight"
GGUF_OUTPUT = "output.weight"


def _model_file(path: Path) -> Path:
    """The model GGUF of an artifact: the file, or a base + adapter folder's base."""
    return pair_files(path).base if Path(path).is_dir() else Path(path)


def tensor_sums(path: Path) -> TensorSums:
    """Every tensor's bytes; the token embedding is gathered per token unless it is also the output head.
    A base + adapter adds its adapters: all of them resident (an app may load every task's), the largest read
    every token (llama.cpp computes B (A x) beside each adapted weight, for the active adapter). Read with the
    bounded header reader: tensor infos and metadata, no data."""
    pair = pair_files(path) if Path(path).is_dir() else None
    sizes = {t.name: t.n_bytes for t in check_gguf(pair.base if pair else path).tensors}
    total = sum(sizes.values())
    gathered = sizes.get(GGUF_TOKEN_EMBD, 0) if GGUF_OUTPUT in sizes else 0
    if pair is None:
        return TensorSums(total, total - gathered)
    adapters = [sum(t.n_bytes for t in check_gguf(f).tensors) for f in pair.adapters.values()]
    return TensorSums(total + sum(adapters), total - gathered + max(adapters))


# llama.cpp keeps K and V in f16 unless told otherwise (ref: src/llama-context.cpp
# llama_context_default_params: type_k = type_v = GGML_TYPE_F16), at full context for every layer (swa_full
# defaults to true there, so sliding-window layers get a full-size cache too).
GGUF_KV_BYTES = 2
GGUF_KV_DTYPE = "f16"


def kv_shape(path: Path) -> KvShape:
    """The KV cache llama.cpp allocates for this GGUF (f16, every layer at full context)."""
    reader = check_gguf(_model_file(path))
    arch = reader.value(gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise EdgeftError(f"{path}: no {gguf.Keys.General.ARCHITECTURE} key; not a model GGUF")

    def key(template: str) -> str:
        return template.format(arch=arch)

    layers = positive(reader.value(key(gguf.Keys.LLM.BLOCK_COUNT)), str(path), "block_count")
    n_embd = positive(reader.value(key(gguf.Keys.LLM.EMBEDDING_LENGTH)), str(path), "embedding_length")
    heads = reader.value(key(gguf.Keys.Attention.HEAD_COUNT))
    kv_heads = reader.value(key(gguf.Keys.Attention.HEAD_COUNT_KV))
    kv_heads = heads if kv_heads is None else kv_heads
    # head_count(_kv) may be one number or one per layer (ref: llama.cpp src/llama-model.cpp load_hparams
    # get_key_or_arr(LLM_KV_ATTENTION_HEAD_COUNT_KV, hparams.n_head_kv_arr, ...)).
    # An array must have one entry per layer: llama.cpp refuses others (ref: src/llama-model-loader.cpp
    # get_key_or_arr, "has wrong array length").
    kv_list = per_layer(kv_heads, layers, str(path), "attention.head_count_kv")
    head_list = per_layer(heads, layers, str(path), "attention.head_count")
    # ref: src/llama-model.cpp load_hparams: n_embd_head_k/v default to n_embd / n_head(), layer 0's count.
    k_len, v_len = (
        positive(n_embd // head_list[0] if v is None and head_list[0] else v, str(path), name)
        for v, name in (
            (reader.value(key(gguf.Keys.Attention.KEY_LENGTH)), "attention.key_length"),
            (reader.value(key(gguf.Keys.Attention.VALUE_LENGTH)), "attention.value_length"),
        )
    )
    # A layer with 0 kv heads has no cache (recurrent layers of hybrid models); widths are summed over
    # layers, so the shape is one "layer" as wide as all of them.
    kv_total = sum(h for h in kv_list if h)
    return KvShape(1, kv_total * k_len, kv_total * v_len, GGUF_KV_BYTES, GGUF_KV_DTYPE)


# Bytes per weight of a 2-D matrix in each artifact kind, before export (the exported tensors are the truth;
# these only have to be close and err high). ggml blocks (ref: ggml/src/ggml-common.h): block_q8_0 = f16
# scale + 32 int8 = 34 bytes / 32 weights; block_q4_0 = f16 scale + 16 bytes = 18 / 32; Q4_K 144 / 256 with
# some Q6_K (210 / 256) tensors, and Q5_0 (22 / 32) or Q8_0 where a row is not a multiple of 256 — 0.75
# covers the mix. The other mixes likewise take the larger of their main type and its fallback for rows not a
# multiple of 256 (ref: src/llama-quant.cpp tensor_type_fallback, for Q4_K's Q5_0 too):
# q6_k Q6_K 210/256 → Q8_0 34/32; q5_k_m Q5_K 176/256 with Q6_K tensors → Q5_1 24/32; iq4_nl 18/32 with
# Q5_K attn_v on GQA models; iq4_xs 136/256 → IQ4_NL 18/32; q3_k_m Q3_K 110/256 and q2_k Q2_K 84/256 with
# Q4_K/Q5_K tensors → Q4_0 18/32 (so 0.6 for all four).
GGUF_RATE: dict[str, float] = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q6_k": 34 / 32, "q5_k_m": 0.78,
    "q4_k_m": 0.75, "q4_0": 18 / 32, "iq4_nl": 0.6, "iq4_xs": 0.6, "q3_k_m": 0.6, "q2_k": 0.6,
}  # fmt: skip
# llama.cpp's quantizer gives the output head (or a tied token_embd) Q6_K, or Q8_0 where rows do not fit
# 256-blocks (ref: src/llama-quant.cpp llama_tensor_get_type, the LLM_TENSOR_OUTPUT branch).
GGUF_HEAD_RATE = 34 / 32


def estimate(model_dir: Path, counts: CheckpointCounts, quant: str, context_length: int) -> Footprint:
    """The footprint a GGUF of `quant` will have, from the checkpoint's parameter counts (bytes per weight
    of the quant, the head at llama.cpp's head type, KV in f16) — before anything is exported."""
    matrices, embed, head, vectors, tied = (
        counts.matrices,
        counts.embed,
        counts.head,
        counts.vectors,
        counts.tied,
    )
    rate = GGUF_RATE[quant]
    head_rate = max(rate, GGUF_HEAD_RATE) if quant in GGUF_LLAMA_QUANTS else rate
    if tied:  # one token_embd serves as both: quantized like the head, streamed whole
        weights = matrices * rate + embed * head_rate + vectors * 4
        decode = weights
    else:
        weights = matrices * rate + embed * rate + head * head_rate + vectors * 4
        decode = weights - embed * rate
    kv = config_kv(model_dir, GGUF_KV_BYTES, GGUF_KV_DTYPE)
    return Footprint(int(weights), int(decode), kv.bytes(context_length), kv.dtype, context_length)


def tensor_types(path: Path) -> TensorTypes:
    """The ggml types a GGUF holds (a base + adapter: its base's), and the tensors edgeft steered to another
    type than llama.cpp chose."""
    header = check_gguf(_model_file(path))
    items = [(t.name, t.type, t.n_bytes) for t in header.tensors]
    matrix = {t.name for t in header.tensors if len(t.shape) >= 2}
    steered_value = header.value(GGUF_KEY_STEERED)
    steered = str(steered_value) if steered_value is not None else None
    names = {n for n, _, _ in items}
    head = GGUF_OUTPUT if GGUF_OUTPUT in names else GGUF_TOKEN_EMBD
    return share_types(items, matrix, head, steered)
