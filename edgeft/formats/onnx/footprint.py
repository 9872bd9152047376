"""What an onnxruntime-genai folder costs a device, read from its graph without loading tensor data: bytes
per decoded token, the KV cache, the tensor types written, and the estimate of each quant before export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.files import read_json
from edgeft.footprint import (
    CheckpointCounts,
    Footprint,
    KvShape,
    TensorSums,
    TensorTypes,
    config_kv,
    max_positions,
    positive,
    share_types,
)
from edgeft.formats.onnx.constants import ONNX_GENAI_CONFIG, ONNX_MODEL_FILE
from edgeft.formats.onnx.folder import check_onnx_folder
from edgeft.guard import inside

# ONNX ops whose weight input is only indexed (rows gathered), never streamed whole per token.
# ref: onnx docs/Operators.md Gather (input 0 = data); onnxruntime docs/ContribOperators.md
# GatherBlockQuantized (input 0 = data, 2 = scales, 3 = zero_points), and GroupQueryAttention (inputs 7, 8 =
# cos_cache, sin_cache) / RotaryEmbedding (inputs 2, 3): the rotary tables are read one row per position.
ONNX_INDEXED_INPUTS: dict[str, frozenset[int]] = {
    "Gather": frozenset({0}),
    "GatherBlockQuantized": frozenset({0, 2, 3}),
    "GroupQueryAttention": frozenset({7, 8}),
    "RotaryEmbedding": frozenset({2, 3}),
}

# Bits per element of each onnx TensorProto.DataType (ref: onnx/onnx.proto enum DataType: FLOAT=1,
# UINT8=2, INT8=3, UINT16=4, INT16=5, INT32=6, INT64=7, STRING=8, BOOL=9, FLOAT16=10, DOUBLE=11, UINT32=12,
# UINT64=13, COMPLEX64=14, COMPLEX128=15, BFLOAT16=16, FLOAT8E4M3FN..FLOAT8E5M2FNUZ=17..20, UINT4=21,
# INT4=22, FLOAT4E2M1=23).
ONNX_DTYPE_BITS: dict[int, int] = {
    1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64,
    15: 128, 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4,
}  # fmt: skip


def onnx_decoder_file(folder: Path) -> Path:
    """The decoder graph of an onnxruntime-genai folder (genai_config.json model.decoder.filename)."""
    check_onnx_folder(folder, allow_native_libs=True)  # only read here, nothing is loaded or run
    cfg = read_json(folder / ONNX_GENAI_CONFIG)
    decoder = cfg["model"].get("decoder")
    name = decoder.get("filename", ONNX_MODEL_FILE) if isinstance(decoder, dict) else ONNX_MODEL_FILE
    return inside(folder, name, what="model.decoder.filename")


def _onnx_graph(folder: Path) -> Any:
    import onnx  # lazy: onnx is only needed when an ONNX artifact is read

    model_file = onnx_decoder_file(folder)
    try:
        return onnx.load(str(model_file), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - protobuf/onnx raise assorted types for a bad file
        raise EdgeftError(f"{model_file}: not a readable ONNX model ({str(exc).splitlines()[0]})") from None


def onnx_initializer_bytes(tensor: Any) -> int:
    """Bytes of one initializer from its dims and data type (its data may be external: never read here)."""
    bits = ONNX_DTYPE_BITS.get(int(tensor.data_type))
    if bits is None:
        raise EdgeftError(f"initializer '{tensor.name}' has data type {tensor.data_type} of no fixed size")
    n = 1
    for d in tensor.dims:
        n *= int(d)
    return (n * bits + 7) // 8


def tensor_sums(folder: Path) -> TensorSums:
    """Every initializer's bytes; those only ever indexed (gathered rows, rotary tables) are not streamed."""
    graph = _onnx_graph(folder)
    sizes = {t.name: onnx_initializer_bytes(t) for t in graph.initializer}
    streamed: set[str] = set()
    used: set[str] = set()
    for node in graph.node:
        indexed = ONNX_INDEXED_INPUTS.get(node.op_type, frozenset())
        for i, name in enumerate(node.input):
            if name in sizes:
                used.add(name)
                if i not in indexed:
                    streamed.add(name)
    total = sum(sizes.values())
    # Initializers only ever indexed are not streamed; unused ones (none in the builder's graphs) neither.
    return TensorSums(total, sum(sizes[n] for n in streamed))


# onnxruntime-genai's past_key_values inputs take the graph's io dtype: the builder's CPU models are fp32
# (ref: onnxruntime_genai/models/builder.py: io_dtype float32 for the cpu execution provider); the artifact's
# own graph input type is read where possible.
ONNX_KV_DTYPE = "fp32"
ONNX_KV_BYTES = 4
# onnx TensorProto.DataType → KV element bytes and name (FLOAT, FLOAT16, BFLOAT16, INT8, UINT8).
ONNX_KV_TYPES: dict[int, tuple[int, str]] = {1: (4, "fp32"), 10: (2, "fp16"), 16: (2, "bf16"), 3: (1, "int8"), 2: (1, "uint8")}  # fmt: skip


def kv_shape(folder: Path) -> KvShape:
    """The KV cache onnxruntime-genai allocates: from genai_config.json, in the graph's past_key dtype."""
    cfg_path = folder / ONNX_GENAI_CONFIG
    decoder = read_json(cfg_path).get("model", {}).get("decoder", {})
    if not isinstance(decoder, dict):
        raise EdgeftError(f"{cfg_path}: model.decoder is not an object")
    where = str(cfg_path)
    layers = positive(decoder.get("num_hidden_layers"), where, "model.decoder.num_hidden_layers")
    kv_heads = positive(decoder.get("num_key_value_heads"), where, "model.decoder.num_key_value_heads")
    head = positive(decoder.get("head_size"), where, "model.decoder.head_size")
    elem, dtype = ONNX_KV_BYTES, ONNX_KV_DTYPE
    names = decoder.get("inputs", {}) if isinstance(decoder.get("inputs"), dict) else {}
    pattern = names.get("past_key_names", "past_key_values.%d.key")
    first = pattern % 0 if isinstance(pattern, str) and "%d" in pattern else None
    for inp in _onnx_graph(folder).input:
        if inp.name == first:
            elem, dtype = ONNX_KV_TYPES.get(inp.type.tensor_type.elem_type, (elem, dtype))
    return KvShape(layers, kv_heads * head, kv_heads * head, elem, dtype)


# Bytes per weight of a 2-D matrix before export (close, erring high): MatMulNBits (onnxruntime
# docs/ContribOperators.md, builder block_size 32, fp32 scales) is bits/8 + 4/32 scale bytes + a zero point
# per block.
ONNX_RATE: dict[str, float] = {"fp32": 4.0, "int8": 1 + 5 / 32, "int4": 0.5 + 5 / 32}


def estimate(model_dir: Path, counts: CheckpointCounts, quant: str, context_length: int) -> Footprint:
    """The footprint an ONNX artifact of `quant` will have, from the checkpoint's parameter counts — before
    anything is exported."""
    matrices, embed, head, vectors, tied = (
        counts.matrices,
        counts.embed,
        counts.head,
        counts.vectors,
        counts.tied,
    )
    rate = ONNX_RATE[quant]
    # GroupQueryAttention's cos/sin tables: max positions × rotary dim / 2, fp32 each, gathered per
    # position (ref: builder.py make_rotary_embedding_caches).
    kv = config_kv(model_dir, ONNX_KV_BYTES, ONNX_KV_DTYPE)
    tables = 2 * max_positions(model_dir) * (kv.head_dim // 2) * 4
    if tied:
        # One matrix for both: the lm_head at `rate`, which the embedding gathers rows of
        # (GatherBlockQuantized for int4 (builder) and int8 (edgeft.formats.onnx.export), Transpose + Gather
        # for fp32; ref: builders/base.py make_embedding_lookup); the head streams it whole.
        weights = matrices * rate + embed * rate + vectors * 4 + tables
        decode = weights - tables
    else:
        # The embedding stays a table in the io dtype (fp32 on CPU) for Gather, one row read per token.
        weights = matrices * rate + head * rate + embed * 4 + vectors * 4 + tables
        decode = weights - embed * 4 - tables
    return Footprint(int(weights), int(decode), kv.bytes(context_length), kv.dtype, context_length)


def tensor_types(folder: Path) -> TensorTypes:
    """Initializer data types of an onnxruntime-genai folder, MatMulNBits weights named by their bit width."""
    import onnx  # lazy: onnx is only needed when an ONNX artifact is read

    graph = _onnx_graph(folder)
    nbits = {
        node.input[1]: next((a.i for a in node.attribute if a.name == "bits"), 4)
        for node in graph.node
        if node.op_type == "MatMulNBits" and len(node.input) > 1
    }
    items = [
        (
            t.name,
            f"int{nbits[t.name]} (MatMulNBits)"
            if t.name in nbits
            else onnx.TensorProto.DataType.Name(t.data_type).lower(),
            onnx_initializer_bytes(t),
        )
        for t in graph.initializer
    ]
    head = next((n for n, _, _ in items if n.startswith("lm_head")), None)
    matrix = {t.name for t in graph.initializer if len(t.dims) >= 2}
    return share_types(items, matrix, head)
