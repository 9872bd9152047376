"""Footprint: what an artifact costs a device — bytes streamed per decoded token, KV cache, resident RAM.

Decode of a batch-1 model is memory-bound: every token streams each weight matrix once, so decode tok/s ≈
effective bandwidth ÷ bytes read per token (Pi 5 fit 10.7 GB/s, R² 0.98; ref: llama-roofline,
learn.arm.com/learning-paths/cross-platform/llm-decode-roofline). Those bytes are the artifact's tensors
minus what is only gathered one row per token (the token embedding table) — never the file size. The KV
cache is sized per runtime, in the dtype that runtime keeps it in. `estimate_need` predicts weights + KV
from a Hugging Face checkpoint before anything is exported (the build's RAM preflight); `measure` gives the
same figures from the exported artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeft.constants import (
    FORMAT_GGUF,
    FORMAT_ONNX,
    GGUF_KEY_STEERED,
    GGUF_LLAMA_QUANTS,
    ONNX_GENAI_CONFIG,
    ONNX_MODEL_FILE,
)
from edgeft.errors import EdgeftError

if TYPE_CHECKING:
    from edgeft.guard import GGUFHeader

# --- bytes per decode token ------------------------------------------------------------------------------

# The token embedding table is read with get_rows (one row per token) by every llama.cpp graph builder
# (ref: llama.cpp src/llama-graph.cpp build_inp_embd: ggml_get_rows(ctx0, tok_embd, inp->tokens)). When a
# model has no output.weight, llama.cpp loads token_embd.weight as the output head too (ref:
# src/llama-model.cpp load_tensors: "if output is NULL, use tok_embd" with TENSOR_DUPLICATED), and then the
# whole table is streamed by the lm_head matmul every token.
GGUF_TOKEN_EMBD = "token_embd.weight"
GGUF_OUTPUT = "output.weight"

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

HF_EMBED_SUFFIX = "embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"


def decode_bytes_per_token(path: Path) -> int:
    """Weight bytes streamed per decoded token: a GGUF file, an onnxruntime-genai folder or an HF folder.

    Every tensor counts except the token embedding, which decode only gathers one row of — unless the head
    is tied to it, in which case it is the output matmul's weight and streamed whole."""
    return _tensors(Path(path)).decode_bytes


def weights_bytes(path: Path) -> int:
    """Bytes of every weight tensor the runtime keeps resident (the embedding table included)."""
    return _tensors(Path(path)).total_bytes


@dataclass(frozen=True)
class _TensorSums:
    total_bytes: int
    decode_bytes: int


def _tensors(path: Path) -> _TensorSums:
    from edgeft.runtime import artifact_format

    fmt = artifact_format(path)
    if fmt == FORMAT_GGUF:
        return _gguf_tensors(path)
    if fmt == FORMAT_ONNX:
        return _onnx_tensors(path)
    return _hf_tensors(path)


def _gguf_header(path: Path) -> GGUFHeader:
    from edgeft.guard import check_gguf

    return check_gguf(path)  # the bounded header reader: tensor infos and metadata, no tensor data


def _gguf_tensors(path: Path) -> _TensorSums:
    sizes = {t.name: t.n_bytes for t in _gguf_header(path).tensors}
    total = sum(sizes.values())
    gathered = sizes.get(GGUF_TOKEN_EMBD, 0) if GGUF_OUTPUT in sizes else 0
    return _TensorSums(total, total - gathered)


def onnx_decoder_file(folder: Path) -> Path:
    """The decoder graph of an onnxruntime-genai folder (genai_config.json model.decoder.filename)."""
    from edgeft.files import read_json
    from edgeft.guard import check_onnx_folder, inside

    check_onnx_folder(folder, allow_native_libs=True)  # only read here, nothing is loaded or run
    cfg = read_json(folder / ONNX_GENAI_CONFIG)
    decoder = cfg["model"].get("decoder")
    name = decoder.get("filename", ONNX_MODEL_FILE) if isinstance(decoder, dict) else ONNX_MODEL_FILE
    return inside(folder, name, what="model.decoder.filename")


def _onnx_graph(folder: Path) -> Any:
    import onnx

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


def _onnx_tensors(folder: Path) -> _TensorSums:
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
    return _TensorSums(total, sum(sizes[n] for n in streamed))


def safetensors_shapes(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name → (dtype, shape) of every tensor in a folder's *.safetensors, read from the headers only."""
    from edgeft.guard import safetensors_header

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise EdgeftError(f"{folder}: no .safetensors weights found")
    for f in files:
        _n, header = safetensors_header(f)
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            shape = info.get("shape")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise EdgeftError(f"{f}: tensor '{name}' has no valid shape")
            out[name] = (str(info.get("dtype")), tuple(shape))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# The float reference (runtime/torch.py TorchRuntime) runs in float32 whatever dtype the checkpoint is stored
# in: a bf16 folder streams 4 bytes a weight per token there, not 2.
REFERENCE_WEIGHT_BYTES = 4


def _hf_tensors(folder: Path) -> _TensorSums:
    shapes = safetensors_shapes(folder)
    sizes = {k: _numel(s) * REFERENCE_WEIGHT_BYTES for k, (_dt, s) in shapes.items()}
    total = sum(sizes.values())
    tied = not any(k.endswith(HF_LM_HEAD) for k in sizes)
    gathered = 0 if tied else sum(v for k, v in sizes.items() if k.endswith(HF_EMBED_SUFFIX))
    return _TensorSums(total, total - gathered)


# --- KV cache ------------------------------------------------------------------------------------------------

# llama.cpp keeps K and V in f16 unless told otherwise (ref: src/llama-context.cpp
# llama_context_default_params: type_k = type_v = GGML_TYPE_F16), at full context for every layer (swa_full
# defaults to true there, so sliding-window layers get a full-size cache too).
GGUF_KV_BYTES = 2
GGUF_KV_DTYPE = "f16"
# onnxruntime-genai's past_key_values inputs take the graph's io dtype: the builder's CPU models are fp32
# (ref: onnxruntime_genai/models/builder.py: io_dtype float32 for the cpu execution provider); the artifact's
# own graph input type is read where possible.
ONNX_KV_DTYPE = "fp32"
ONNX_KV_BYTES = 4
# onnx TensorProto.DataType → KV element bytes and name (FLOAT, FLOAT16, BFLOAT16, INT8, UINT8).
ONNX_KV_TYPES: dict[int, tuple[int, str]] = {1: (4, "fp32"), 10: (2, "fp16"), 16: (2, "bf16"), 3: (1, "int8"), 2: (1, "uint8")}  # fmt: skip


@dataclass(frozen=True)
class KvShape:
    """What sizes a KV cache: layers, K/V widths per token (kv heads × head dim), element bytes and dtype."""

    layers: int
    k_width: int
    v_width: int
    elem_bytes: int
    dtype: str
    head_dim: int = 0  # known when read from a config

    def bytes(self, context_length: int) -> int:
        return self.layers * (self.k_width + self.v_width) * context_length * self.elem_bytes


def _field(header: GGUFHeader, key: str) -> Any:
    return header.value(key)


def _positive(value: Any, where: str, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 20:
        raise EdgeftError(f"{where}: {key} = {str(value)[:40]} should be an integer from 1 to {1 << 20}")
    return value


def _per_layer(value: Any, layers: int, where: str, key: str) -> list[int]:
    """A head count given once or per layer, as `layers` integers (0 allowed per layer: no attention)."""
    if value is None:
        raise EdgeftError(f"{where}: no {key}; not a model GGUF llama.cpp can run")
    values = value if isinstance(value, list) else [value] * layers
    if len(values) != layers:
        raise EdgeftError(f"{where}: {key} has {len(values)} entries for {layers} layers")
    return [0 if v == 0 and type(v) is int else _positive(v, where, key) for v in values]


def _gguf_kv(path: Path) -> KvShape:
    import gguf

    reader = _gguf_header(path)
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise EdgeftError(f"{path}: no {gguf.Keys.General.ARCHITECTURE} key; not a model GGUF")

    def key(template: str) -> str:
        return template.format(arch=arch)

    layers = _positive(_field(reader, key(gguf.Keys.LLM.BLOCK_COUNT)), str(path), "block_count")
    n_embd = _positive(_field(reader, key(gguf.Keys.LLM.EMBEDDING_LENGTH)), str(path), "embedding_length")
    heads = _field(reader, key(gguf.Keys.Attention.HEAD_COUNT))
    kv_heads = _field(reader, key(gguf.Keys.Attention.HEAD_COUNT_KV))
    kv_heads = heads if kv_heads is None else kv_heads
    # head_count(_kv) may be one number or one per layer (ref: llama.cpp src/llama-model.cpp load_hparams
    # get_key_or_arr(LLM_KV_ATTENTION_HEAD_COUNT_KV, hparams.n_head_kv_arr, ...)).
    # An array must have one entry per layer: llama.cpp refuses others (ref: src/llama-model-loader.cpp
    # get_key_or_arr, "has wrong array length").
    per_layer = _per_layer(kv_heads, layers, str(path), "attention.head_count_kv")
    head_list = _per_layer(heads, layers, str(path), "attention.head_count")
    # ref: src/llama-model.cpp load_hparams: n_embd_head_k/v default to n_embd / n_head(), layer 0's count.
    k_len, v_len = (
        _positive(n_embd // head_list[0] if v is None and head_list[0] else v, str(path), name)
        for v, name in (
            (_field(reader, key(gguf.Keys.Attention.KEY_LENGTH)), "attention.key_length"),
            (_field(reader, key(gguf.Keys.Attention.VALUE_LENGTH)), "attention.value_length"),
        )
    )
    # A layer with 0 kv heads has no cache (recurrent layers of hybrid models); widths are summed over
    # layers, so the shape is one "layer" as wide as all of them.
    kv_total = sum(h for h in per_layer if h)
    return KvShape(1, kv_total * k_len, kv_total * v_len, GGUF_KV_BYTES, GGUF_KV_DTYPE)


def _onnx_kv(folder: Path) -> KvShape:
    from edgeft.files import read_json

    cfg_path = folder / ONNX_GENAI_CONFIG
    decoder = read_json(cfg_path).get("model", {}).get("decoder", {})
    if not isinstance(decoder, dict):
        raise EdgeftError(f"{cfg_path}: model.decoder is not an object")
    where = str(cfg_path)
    layers = _positive(decoder.get("num_hidden_layers"), where, "model.decoder.num_hidden_layers")
    kv_heads = _positive(decoder.get("num_key_value_heads"), where, "model.decoder.num_key_value_heads")
    head = _positive(decoder.get("head_size"), where, "model.decoder.head_size")
    elem, dtype = ONNX_KV_BYTES, ONNX_KV_DTYPE
    names = decoder.get("inputs", {}) if isinstance(decoder.get("inputs"), dict) else {}
    pattern = names.get("past_key_names", "past_key_values.%d.key")
    first = pattern % 0 if isinstance(pattern, str) and "%d" in pattern else None
    for inp in _onnx_graph(folder).input:
        if inp.name == first:
            elem, dtype = ONNX_KV_TYPES.get(inp.type.tensor_type.elem_type, (elem, dtype))
    return KvShape(layers, kv_heads * head, kv_heads * head, elem, dtype)


def kv_shape(path: Path) -> KvShape:
    """The KV cache shape of an artifact as its runtime allocates it, read from the artifact itself."""
    from edgeft.runtime import artifact_format

    path = Path(path)
    fmt = artifact_format(path)
    if fmt == FORMAT_GGUF:
        return _gguf_kv(path)
    if fmt == FORMAT_ONNX:
        return _onnx_kv(path)
    cfg = config_kv(path)  # PyTorch: DynamicCache in the checkpoint's dtype
    return KvShape(cfg.layers, cfg.k_width, cfg.v_width, 4, "fp32")


def kv_cache_bytes(artifact_path: Path, context_length: int) -> int:
    """Bytes of the KV cache an artifact's runtime holds at `context_length` tokens (its own KV dtype)."""
    return kv_shape(artifact_path).bytes(context_length)


def config_kv(model_dir: Path, elem_bytes: int = GGUF_KV_BYTES, dtype: str = GGUF_KV_DTYPE) -> KvShape:
    """A KV shape from a Hugging Face config.json (layers, kv heads, head dim), each field range-checked so a
    missing, zero or absurd value is one line naming it."""
    from edgeft.files import read_json

    where = Path(model_dir) / "config.json"
    cfg = read_json(where)
    if not isinstance(cfg, dict):
        raise EdgeftError(f"{where}: not a JSON object; not a Hugging Face config.json")

    def bounded(key: str, hi: int, default: int | None = None) -> int:
        value = cfg.get(key)
        value = default if value is None else value
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
            shown = f"= {repr(value)[:40]}" if key in cfg else "is missing and"
            raise EdgeftError(f"{where}: {key} {shown} should be an integer from 1 to {hi}")
        return value

    heads = bounded("num_attention_heads", 4096)
    kv_heads = bounded("num_key_value_heads", 4096, heads)
    layers = bounded("num_hidden_layers", 4096)
    if cfg.get("head_dim") is not None:
        head_dim = bounded("head_dim", 1 << 14)
    else:
        hidden = bounded("hidden_size", 1 << 17)
        if hidden % heads:
            raise EdgeftError(
                f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            )
        head_dim = hidden // heads
    return KvShape(layers, kv_heads * head_dim, kv_heads * head_dim, elem_bytes, dtype, head_dim)


def max_positions(model_dir: Path) -> int:
    """The longest sequence the model was built for (config max_position_embeddings; 2048 when absent)."""
    from edgeft.files import read_json

    value = read_json(Path(model_dir) / "config.json").get("max_position_embeddings")
    return value if isinstance(value, int) and 0 < value <= 1 << 24 else 2048


# --- the whole footprint, and the estimate before export ---------------------------------------------------


@dataclass(frozen=True)
class Footprint:
    """An artifact's figures for a device: what decode streams, what stays resident, the KV cache."""

    weights_bytes: int  # every tensor, resident while the model is loaded
    decode_bytes_per_token: int  # streamed per decoded token (gathered rows excluded)
    kv_cache_bytes: int  # at context_length, in kv_dtype
    kv_dtype: str
    context_length: int

    @property
    def need_bytes(self) -> int:
        """RAM the artifact needs on the device: resident weights + its own KV cache."""
        return self.weights_bytes + self.kv_cache_bytes

    @property
    def kv_cache_mb(self) -> float:
        return self.kv_cache_bytes / 1e6

    def decode_bound_tok_s(self, bandwidth_gb_s: float) -> float:
        """The memory-bandwidth ceiling of decode: bandwidth ÷ bytes per token."""
        return bandwidth_gb_s * 1e9 / max(self.decode_bytes_per_token, 1)


def measure(path: Path, context_length: int) -> Footprint:
    """The footprint of an exported artifact, from its own tensors and KV metadata."""
    sums = _tensors(Path(path))
    kv = kv_shape(path)
    return Footprint(sums.total_bytes, sums.decode_bytes, kv.bytes(context_length), kv.dtype, context_length)


# Bytes per weight of a 2-D matrix in each artifact kind, before export (the exported tensors are the truth;
# these only have to be close and err high). ggml blocks (ref: ggml/src/ggml-common.h): block_q8_0 = f16
# scale + 32 int8 = 34 bytes / 32 weights; block_q4_0 = f16 scale + 16 bytes = 18 / 32; Q4_K 144 / 256 with
# some Q6_K (210 / 256) tensors, and Q5_0 (22 / 32) or Q8_0 where a row is not a multiple of 256 — 0.75
# covers the mix. The other mixes likewise take the larger of their main type and its fallback for rows not a
# multiple of 256 (ref: src/llama-quant.cpp tensor_type_fallback, for Q4_K's Q5_0 too):
# q6_k Q6_K 210/256 → Q8_0 34/32; q5_k_m Q5_K 176/256 with Q6_K tensors → Q5_1 24/32; iq4_nl 18/32 with
# Q5_K attn_v on GQA models; iq4_xs 136/256 → IQ4_NL 18/32; q3_k_m Q3_K 110/256 and q2_k Q2_K 84/256 with
# Q4_K/Q5_K tensors → Q4_0 18/32 (so 0.6 for all four). MatMulNBits (onnxruntime
# docs/ContribOperators.md, builder block_size 32, fp32 scales): bits/8 + 4/32 scale bytes + a zero point
# per block.
GGUF_RATE: dict[str, float] = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q6_k": 34 / 32, "q5_k_m": 0.78,
    "q4_k_m": 0.75, "q4_0": 18 / 32, "iq4_nl": 0.6, "iq4_xs": 0.6, "q3_k_m": 0.6, "q2_k": 0.6,
}  # fmt: skip
ONNX_RATE: dict[str, float] = {"fp32": 4.0, "int8": 1 + 5 / 32, "int4": 0.5 + 5 / 32}
# llama.cpp's quantizer gives the output head (or a tied token_embd) Q6_K, or Q8_0 where rows do not fit
# 256-blocks (ref: src/llama-quant.cpp llama_tensor_get_type, the LLM_TENSOR_OUTPUT branch).
GGUF_HEAD_RATE = 34 / 32


def estimate_need(model_dir: Path, fmt: str, quant: str, context_length: int) -> Footprint:
    """The footprint an artifact of `fmt`/`quant` will have, estimated from a Hugging Face checkpoint
    (parameter counts from the safetensors headers, bytes per weight of the quant, KV in the runtime's
    dtype) — before anything is exported."""
    shapes = safetensors_shapes(model_dir)
    embed = sum(_numel(s) for k, (_, s) in shapes.items() if k.endswith(HF_EMBED_SUFFIX))
    head = sum(_numel(s) for k, (_, s) in shapes.items() if k.endswith(HF_LM_HEAD))
    vectors = sum(_numel(s) for _, s in shapes.values() if len(s) < 2)  # norms and biases stay 32-bit
    matrices = sum(_numel(s) for _, s in shapes.values() if len(s) >= 2) - embed - head
    tied = head == 0
    if fmt == FORMAT_GGUF:
        rate = GGUF_RATE[quant]
        head_rate = max(rate, GGUF_HEAD_RATE) if quant in GGUF_LLAMA_QUANTS else rate
        if tied:  # one token_embd serves as both: quantized like the head, streamed whole
            weights = matrices * rate + embed * head_rate + vectors * 4
            decode = weights
        else:
            weights = matrices * rate + embed * rate + head * head_rate + vectors * 4
            decode = weights - embed * rate
        kv = config_kv(model_dir, GGUF_KV_BYTES, GGUF_KV_DTYPE)
    elif fmt == FORMAT_ONNX:
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
    else:
        raise EdgeftError(f"unknown artifact format {fmt!r}")
    return Footprint(int(weights), int(decode), kv.bytes(context_length), kv.dtype, context_length)


# --- what was actually written ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorTypes:
    """The tensor types an artifact really holds, as shares of its weight bytes: a "q4_k_m" file is not all
    Q4_K (rows that are not a multiple of 256 fall back to other types; ref: llama.cpp src/llama-quant.cpp
    tensor_type_fallback)."""

    shares: dict[str, float]  # type → fraction of the weight bytes, largest first
    head_type: str | None  # the output head's type (a tied head: the token embedding's)
    head_share: float  # the head's fraction of the weight bytes
    matrices: dict[str, int] = field(default_factory=dict)  # type → how many weight matrices hold it
    steered: str | None = None  # GGUF: tensors edgeft wrote in another type than llama.cpp chose, and why


def tensor_types(path: Path) -> TensorTypes:
    """Tensor types of a GGUF file (ggml types) or an onnxruntime-genai folder (initializer data types, with
    MatMulNBits weights named by their bit width)."""
    from edgeft.runtime import artifact_format

    path = Path(path)
    if artifact_format(path) == FORMAT_GGUF:
        header = _gguf_header(path)
        items = [(t.name, t.type, t.n_bytes) for t in header.tensors]
        matrix = {t.name for t in header.tensors if len(t.shape) >= 2}
        steered_value = header.value(GGUF_KEY_STEERED)
        steered = str(steered_value) if steered_value is not None else None
        names = {n for n, _, _ in items}
        head = GGUF_OUTPUT if GGUF_OUTPUT in names else GGUF_TOKEN_EMBD
    else:
        import onnx

        graph = _onnx_graph(path)
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
        steered = None
    total = sum(b for _, _, b in items) or 1
    by_type: dict[str, int] = {}
    for _, kind, nbytes in items:
        by_type[kind] = by_type.get(kind, 0) + nbytes
    shares = {k: v / total for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])}
    head_items = [(kind, b) for n, kind, b in items if head is not None and n.startswith(head)]
    head_type = max(head_items, key=lambda kb: kb[1])[0] if head_items else None
    counts: dict[str, int] = {}
    for name, kind, _ in items:
        if name in matrix:
            counts[kind] = counts.get(kind, 0) + 1
    return TensorTypes(shares, head_type, sum(b for _, b in head_items) / total, counts, steered)
