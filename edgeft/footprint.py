"""Footprint: what an artifact costs a device — bytes streamed per decoded token, KV cache, resident RAM.

Decode of a batch-1 model is memory-bound: every token streams each weight matrix once, so decode tok/s ≈
effective bandwidth ÷ bytes read per token (Pi 5 fit 10.7 GB/s, R² 0.98; ref: llama-roofline,
learn.arm.com/learning-paths/cross-platform/llm-decode-roofline). Those bytes are the artifact's tensors
minus what is only gathered one row per token (the token embedding table) — never the file size. The KV
cache is sized per runtime, in the dtype that runtime keeps it in. This module holds the shared figures and
the Hugging Face checkpoint readers; each format computes them from its own files (edgeft.formats).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.files import read_json
from edgeft.guard import safetensors_header

# Each format computes these from its own files (edgeft/formats/<name>/footprint.py); the registry
# (edgeft.formats: measure, estimate_need, tensor_types) picks the format of a path.


@dataclass(frozen=True)
class TensorSums:
    """Bytes of every weight tensor an artifact holds, and of those a decoded token streams."""

    total_bytes: int
    decode_bytes: int


# --- a Hugging Face checkpoint, read from its headers only ------------------------------------------------

HF_EMBED_SUFFIX = "embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"


def safetensors_shapes(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name → (dtype, shape) of every tensor in a folder's *.safetensors, read from the headers only."""
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


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class CheckpointCounts:
    """A checkpoint's parameters by role, what a format's estimate before export is computed from."""

    embed: int  # token embedding
    head: int  # a separate output head (0 when tied to the embedding)
    vectors: int  # norms and biases (kept 32-bit)
    matrices: int  # every other weight matrix

    @property
    def tied(self) -> bool:
        return self.head == 0


def checkpoint_counts(model_dir: Path) -> CheckpointCounts:
    """Parameter counts by role from the safetensors headers of `model_dir`."""
    shapes = safetensors_shapes(model_dir)
    embed = sum(numel(s) for k, (_, s) in shapes.items() if k.endswith(HF_EMBED_SUFFIX))
    head = sum(numel(s) for k, (_, s) in shapes.items() if k.endswith(HF_LM_HEAD))
    vectors = sum(numel(s) for _, s in shapes.values() if len(s) < 2)
    matrices = sum(numel(s) for _, s in shapes.values() if len(s) >= 2) - embed - head
    return CheckpointCounts(embed, head, vectors, matrices)


# The float reference (edgeft.formats.torch.runtime.TorchRuntime) runs in float32 whatever dtype the checkpoint is stored
# in: a bf16 folder streams 4 bytes a weight per token there, not 2.
REFERENCE_WEIGHT_BYTES = 4


def hf_tensor_sums(folder: Path) -> TensorSums:
    """The float reference's weight bytes (float32) and those streamed per token."""
    shapes = safetensors_shapes(folder)
    sizes = {k: numel(s) * REFERENCE_WEIGHT_BYTES for k, (_dt, s) in shapes.items()}
    total = sum(sizes.values())
    tied = not any(k.endswith(HF_LM_HEAD) for k in sizes)
    gathered = 0 if tied else sum(v for k, v in sizes.items() if k.endswith(HF_EMBED_SUFFIX))
    return TensorSums(total, total - gathered)


# --- KV cache ------------------------------------------------------------------------------------------------


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


def positive(value: Any, where: str, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 20:
        raise EdgeftError(f"{where}: {key} = {str(value)[:40]} should be an integer from 1 to {1 << 20}")
    return value


def per_layer(value: Any, layers: int, where: str, key: str) -> list[int]:
    """A head count given once or per layer, as `layers` integers (0 allowed per layer: no attention)."""
    if value is None:
        raise EdgeftError(f"{where}: no {key}; not a model GGUF llama.cpp can run")
    values = value if isinstance(value, list) else [value] * layers
    if len(values) != layers:
        raise EdgeftError(f"{where}: {key} has {len(values)} entries for {layers} layers")
    return [0 if v == 0 and type(v) is int else positive(v, where, key) for v in values]


def config_kv(model_dir: Path, elem_bytes: int, dtype: str) -> KvShape:
    """A KV shape from a Hugging Face config.json (layers, kv heads, head dim) for a runtime keeping it in
    `dtype`, each field range-checked so a missing, zero or absurd value is one line naming it."""
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
    value = read_json(Path(model_dir) / "config.json").get("max_position_embeddings")
    return value if isinstance(value, int) and 0 < value <= 1 << 24 else 2048


# --- the whole footprint ---------------------------------------------------


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


def share_types(
    items: Iterable[tuple[str, str, int]], matrices: set[str], head: str | None, steered: str | None = None
) -> TensorTypes:
    """TensorTypes from (tensor name, type, bytes) items, the names of the weight matrices and the head's
    name prefix."""
    items = list(items)
    total = sum(b for _, _, b in items) or 1
    by_type: dict[str, int] = {}
    for _, kind, nbytes in items:
        by_type[kind] = by_type.get(kind, 0) + nbytes
    shares = {k: v / total for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])}
    head_items = [(kind, b) for n, kind, b in items if head is not None and n.startswith(head)]
    head_type = max(head_items, key=lambda kb: kb[1])[0] if head_items else None
    counts: dict[str, int] = {}
    for name, kind, _ in items:
        if name in matrices:
            counts[kind] = counts.get(kind, 0) + 1
    return TensorTypes(shares, head_type, sum(b for _, b in head_items) / total, counts, steered)
