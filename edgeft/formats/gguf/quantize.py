"""GGUF → quantized GGUF through llama.cpp's own quantizer (llama-cpp-python bindings).

llama.cpp picks per-tensor types for mixes like q4_k_m (e.g. q6_k for some ffn_down/attn_v rows), so
edgeft never reimplements that; it only calls `llama_model_quantize` and writes atomically. An importance
matrix (edgeft.formats.gguf.imatrix) and a type for the output head / token embedding go in through the same parameters
llama.cpp's quantize tool fills (ref: llama.cpp include/llama.h llama_model_quantize_params).
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf

from edgeft.errors import EdgeftError
from edgeft.files import QUANTIZING_TAG, publish_file, unique_sibling
from edgeft.formats.gguf.constants import (
    GGUF_FLOAT_QUANTS,
    GGUF_FTYPES,
    GGUF_HEAD_TYPES,
    GGUF_IMATRIX_DATASET_PREFIX,
    GGUF_IMATRIX_QUANTS,
    GGUF_KEY_IMATRIX_CHUNKS,
    GGUF_KEY_IMATRIX_DATASET,
    GGUF_KEY_IMATRIX_ENTRIES,
    GGUF_KEY_STEERED,
    GGUF_QUANTS,
)
from edgeft.formats.gguf.header import check_gguf, ensure_replaceable_file

if TYPE_CHECKING:
    from edgeft.formats.gguf.imatrix import Imatrix

# The tensors `head_type` sets. ref: src/llama-quant.cpp (tensor_category OUTPUT / TOKEN_EMBD; a tied model
# has no output.weight and its token_embd is the head)
HEAD_TENSORS = ("output.weight", "token_embd.weight")


def check_quant_options(quant: str, with_imatrix: bool, head_type: str | None, where: str) -> None:
    """Refuse, in one line naming `where`, an importance matrix or head type the quant cannot use (before
    one is computed: `with_imatrix` says whether there will be one)."""
    if quant not in GGUF_QUANTS:
        raise EdgeftError(f"{where}: unknown GGUF quant {quant!r}; choose one of: {', '.join(GGUF_QUANTS)}")
    if with_imatrix and quant not in GGUF_IMATRIX_QUANTS:
        why = "is written without llama.cpp's quantizer" if quant in GGUF_FLOAT_QUANTS else "ignores it"
        raise EdgeftError(
            f"{where}: an importance matrix does not change {quant} files ({quant} {why}); "
            f"use it with one of: {', '.join(GGUF_IMATRIX_QUANTS)}"
        )
    if head_type is not None:
        if quant in GGUF_FLOAT_QUANTS:
            raise EdgeftError(
                f"{where}: head type {head_type!r} applies to quantized GGUF files, not {quant}; "
                "drop it or choose a quant such as q4_k_m"
            )
        if head_type not in GGUF_HEAD_TYPES:
            raise EdgeftError(
                f"{where}: unknown head type {head_type!r}; choose one of: {', '.join(GGUF_HEAD_TYPES)}"
            )


def _tensor_columns(src: Path) -> dict[str, int]:
    """GGUF tensor name → ne[0] (the input columns a row spans), read from the checked header."""
    return {t.name: t.shape[0] for t in check_gguf(src).tensors if t.shape}


def check_columns(cols: dict[str, int], imatrix: Imatrix | None, head_type: str | None, where: str) -> None:
    """What llama.cpp would throw or abort on, as one line naming `where` first, given each GGUF tensor's
    ne[0] (`cols`): an imatrix entry whose size is not the tensor's ne[0] (ref: src/llama-quant.cpp
    "imatrix size %d is different from tensor size"), a non-finite value ("imatrix contains non-finite
    value"), a head type whose block does not divide the row (applied without the per-tensor fallback, ref:
    llama_tensor_get_type; ggml_row_size asserts)."""
    if imatrix is not None:
        import numpy as np

        for name, values in imatrix.values.items():
            if name not in cols:
                raise EdgeftError(f"{where}: importance matrix entry {name!r} names no tensor of this model")
            if values.ndim != 1 or values.size != cols[name]:
                raise EdgeftError(
                    f"{where}: importance matrix entry {name!r} has {values.size} values for a tensor of "
                    f"{cols[name]} columns; compute it from this model"
                )
            if not np.isfinite(values).all():
                raise EdgeftError(f"{where}: importance matrix entry {name!r} holds non-finite values")
    if head_type is not None:
        block = gguf.GGML_QUANT_SIZES[GGUF_HEAD_TYPES[head_type]][0]
        for name in HEAD_TENSORS:
            if name in cols and cols[name] % block:
                raise EdgeftError(
                    f"{where}: head type {head_type} needs rows that are a multiple of {block}; {name} has "
                    f"{cols[name]} columns; choose q8_0 (blocks of 32)"
                )


def _imatrix_array(llama_cpp: Any, imatrix: Imatrix) -> tuple[Any, list[Any]]:
    """The NULL-name-terminated llama_model_imatrix_data array, and the buffers it points into (the caller
    keeps them alive for the call; llama.cpp copies the values at its start)."""
    import numpy as np

    keep: list[Any] = []
    arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix.values) + 1))()
    for i, (name, values) in enumerate(sorted(imatrix.values.items())):
        buf = np.ascontiguousarray(values, dtype=np.float32)
        cname = name.encode()
        keep += [buf, cname]
        arr[i].name = cname
        arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = buf.size
    # terminator. ref: tools/quantize/quantize.cpp (i_data.push_back({nullptr, nullptr, 0}))
    arr[len(imatrix.values)].name = None
    return arr, keep


def imatrix_dataset_name(imatrix: Imatrix) -> str:
    """The quantize.imatrix.dataset value: the calibration data's digest, never a path."""
    return f"{GGUF_IMATRIX_DATASET_PREFIX}{imatrix.dataset_sha256[:16]}"


def _imatrix_keys(llama_cpp: Any, imatrix: Imatrix) -> list[tuple[str, int, str | int]]:
    """The keys llama.cpp's quantize tool writes for an importance matrix (ref: tools/quantize/quantize.cpp;
    an INT lands as UINT32, src/llama-quant.cpp)."""
    return [
        (GGUF_KEY_IMATRIX_DATASET, llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, imatrix_dataset_name(imatrix)),
        (GGUF_KEY_IMATRIX_ENTRIES, llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, len(imatrix.values)),
        (GGUF_KEY_IMATRIX_CHUNKS, llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, imatrix.examples),
    ]


def _kv_overrides(llama_cpp: Any, items: list[tuple[str, int, str | int]]) -> Any:
    """The empty-key-terminated llama_model_kv_override array of (key, tag, value) items."""
    arr = (llama_cpp.llama_model_kv_override * (len(items) + 1))()
    for o, (key, tag, value) in zip(arr, items, strict=False):
        o.key = key.encode()
        o.tag = tag
        if isinstance(value, str):
            o.value.val_str = value.encode()[:127]
        else:
            o.value.val_i64 = value
    arr[len(items)].key = b""  # terminator: key[0] == 0
    return arr


# --- weights that already lie on a quantization grid ------------------------------------------------------
#
# A model whose weights were dequantized from a quantized file (SmolLM2-135M from a Q4_1 GGUF, or any
# checkpoint loaded with transformers' gguf_file) keeps them on that file's grid, and a fine-tune moves them
# by far less than a grid step (LoRA on SmolLM2-135M: 2.3 % of a Q4_1 step on average). Rounding to that
# grid again snaps the change back: q4_1 kept 6 % of it there; q5_1, whose levels sit half a Q4_1 step apart,
# turned it into 165 % (bench/requant_grid.py, docs/requantization.md). The 32-block types llama.cpp writes
# for K-quant fallbacks and mixes (q5_k_m → Q5_1 for rows that are not whole 256-blocks, q4_0 with an
# importance matrix → Q4_1 in the first ffn_down layers) are checked on the float GGUF before use, and one
# whose rounding does not keep a small change is steered to the type of equal bits whose grid is unrelated.

# type → the type it is steered to (same bits, symmetric vs. offset grid)
STEER = {"q4_1": "q4_0", "q5_1": "q5_0", "q4_0": "q4_1", "q5_0": "q5_1"}
GGUF_UNQUANTIZED = ("f32", "f16", "bf16")
# the share of a small change a type's rounding must keep (unbiased rounding keeps 1.0 on average)
KEEPS_CHANGE = (0.8, 1.25)
_PROBE_REL = 0.03  # the probe change: 3 % of the block's Q4_1 step, Gaussian
_PROBE_ROWS = 32  # rows sampled from each of up to _PROBE_MATRICES weight matrices
_PROBE_MATRICES = 8
_GGML = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}
_FLOAT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}  # the float GGUF types rows are sampled from, bytes an element
_GGML |= {"q5_0": gguf.GGMLQuantizationType.Q5_0, "q5_1": gguf.GGMLQuantizationType.Q5_1}
_GGML |= {"q8_0": gguf.GGMLQuantizationType.Q8_0}
_survival_cache: dict[tuple[str, int, int], dict[str, float]] = {}


def change_kept(src: Path) -> dict[str, float]:
    """Per 32-block legacy type, the share of a small change to the float GGUF's weights that the type's
    rounding keeps (gguf-py's reference quantizers, the rounding ggml's quantize_row_*_ref does), measured on
    rows sampled from its weight matrices; cached per file."""
    import numpy as np
    from gguf.quants import dequantize, quantize

    st = Path(src).stat()
    key = (str(Path(src).resolve()), st.st_size, st.st_mtime_ns)
    if key in _survival_cache:
        return _survival_cache[key]
    header = check_gguf(Path(src))
    mats = [
        t
        for t in header.tensors
        if len(t.shape) == 2
        and not t.name.startswith("token_embd")
        and t.type in _FLOAT_BYTES
        and t.shape[0] % 32 == 0
    ]
    picked = mats[:: max(1, len(mats) // _PROBE_MATRICES)][:_PROBE_MATRICES]
    rng = np.random.default_rng(0)
    num = dict.fromkeys(_GGML, 0.0)
    den = 0.0
    for t in picked:
        row_bytes = t.shape[0] * _FLOAT_BYTES[t.type]
        raw = np.memmap(
            src, np.uint8, "r", header.data_offset + t.offset, (min(_PROBE_ROWS, t.shape[1]), row_bytes)
        )
        qtype = gguf.GGMLQuantizationType[t.type.upper()]
        rows = dequantize(np.array(raw), qtype).astype(np.float32)
        del raw
        blocks = rows.reshape(-1, 32)
        step = ((blocks.max(1) - blocks.min(1)) / 15)[:, None]
        delta = (_PROBE_REL * step * rng.standard_normal(blocks.shape)).astype(np.float32).reshape(rows.shape)
        den += float((delta * delta).sum())
        for name, qt in _GGML.items():
            before = dequantize(quantize(rows, qt), qt).reshape(rows.shape)
            after = dequantize(quantize(rows + delta, qt), qt).reshape(rows.shape)
            num[name] += float(((after - before) * delta).sum())
    kept = {name: (num[name] / den if den else 1.0) for name in _GGML}
    _survival_cache[key] = kept
    return kept


def steering(kept: dict[str, float]) -> dict[str, str]:
    """Type → type to write instead, for the types whose rounding does not keep a small change (only to a
    type that keeps it)."""
    lo, hi = KEEPS_CHANGE

    def ok(t: str) -> bool:
        return lo <= kept.get(t, 1.0) <= hi

    return {t: to for t, to in STEER.items() if not ok(t) and ok(to)}


@dataclass(frozen=True)
class Steered:
    """Tensors written as another type than llama.cpp chose, and why (change_kept of each type)."""

    types: dict[str, str]  # from → to
    tensors: int
    kept: dict[str, float]

    def summary(self) -> str:
        """'166 tensors q5_1->q5_0 (a small change kept: q5_1 1.65, q5_0 0.98)', at most 127 bytes (GGUF
        string overrides hold 128, ref: include/llama.h llama_model_kv_override.val_str)."""
        moves = "; ".join(
            f"{a}->{b} (a small change kept: {a} {self.kept[a]:.2f}, {b} {self.kept[b]:.2f})"
            for a, b in self.types.items()
        )
        return f"{self.tensors} tensors {moves}"[:127]


def _matrix_types(path: Path) -> dict[str, str]:
    return {t.name: t.type for t in check_gguf(path).tensors if len(t.shape) >= 2}


def quantize_gguf(
    src: Path,
    dst: Path,
    quant: str,
    *,
    threads: int | None = None,
    imatrix: Imatrix | None = None,
    head_type: str | None = None,
    steer: bool = True,
) -> Path:
    """Quantize the GGUF `src` into `dst` as `quant` (one of GGUF_QUANTS); returns `dst`.

    `imatrix` (one of GGUF_IMATRIX_QUANTS only) weighs each tensor's columns by the calibration data's
    activations and records quantize.imatrix.* keys; `head_type` (a GGUF_HEAD_TYPES name, e.g. "q8_0") keeps
    output.weight and token_embd.weight at that type whatever the mix would pick. With `steer`, tensors
    llama.cpp wrote in a 32-block type whose rounding would not keep a fine-tune's small changes on these
    weights (`change_kept`) are written again, in one more pass, in the type of equal bits that does; the
    GGUF_KEY_STEERED key says so (Steered.summary).
    """
    _quantize(src, dst, quant, threads=threads, imatrix=imatrix, head_type=head_type, overrides={}, note=None)
    if not steer or quant in GGUF_FLOAT_QUANTS:
        return dst
    written = _matrix_types(dst)
    if not any(t in STEER for t in written.values()):
        return dst
    kept = change_kept(src)
    moves = steering(kept)
    todo = {name: moves[t] for name, t in written.items() if t in moves}
    if not todo:
        return dst
    # every matrix pinned to the type llama.cpp chose, but the steered ones: llama.cpp's mixes count layers
    # as they go, so moving some tensors alone would move others
    pinned = {name: todo.get(name, t) for name, t in written.items() if t not in GGUF_UNQUANTIZED}
    steered = Steered({written[n]: to for n, to in todo.items()}, len(todo), kept)
    _quantize(
        src,
        dst,
        quant,
        threads=threads,
        imatrix=imatrix,
        head_type=head_type,
        overrides=pinned,
        note=steered.summary(),
    )
    return dst


def _quantize(
    src: Path,
    dst: Path,
    quant: str,
    *,
    threads: int | None,
    imatrix: Imatrix | None,
    head_type: str | None,
    overrides: dict[str, str],
    note: str | None,
) -> Path:
    """One llama_model_quantize call (with `overrides`: tensor name → type, and `note` in the GGUF_KEY_STEERED
    key), written atomically."""
    src, dst = Path(src), Path(dst)
    check_quant_options(quant, imatrix is not None, head_type, str(dst))
    if not src.is_file():
        raise EdgeftError(f"{src}: GGUF file to quantize does not exist")
    check_gguf(src)  # llama.cpp's quantizer only ever sees a header edgeft has checked
    if imatrix is not None or head_type is not None:
        check_columns(_tensor_columns(src), imatrix, head_type, str(src))
    import llama_cpp

    from edgeft.formats.gguf.runtime import silence_llama_logs

    silence_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(GGUF_FTYPES[quant])
    params.nthread = int(threads or 0)  # 0 → llama.cpp uses hardware concurrency
    keep: list[Any] = []  # everything params points into, alive until the call returns
    if overrides:
        arr, buffers = _type_overrides(llama_cpp, overrides)
        keep += [arr, buffers]
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    kv_items: list[tuple[str, int, str | int]] = []
    if imatrix is not None:
        arr, buffers = _imatrix_array(llama_cpp, imatrix)
        keep += [arr, buffers]
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        kv_items += _imatrix_keys(llama_cpp, imatrix)
    if note is not None:
        kv_items.append((GGUF_KEY_STEERED, llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, note))
    if kv_items:
        kvs = _kv_overrides(llama_cpp, kv_items)
        keep.append(kvs)
        params.kv_overrides = ctypes.cast(kvs, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    if head_type is not None:
        params.output_tensor_type = int(GGUF_HEAD_TYPES[head_type])
        params.token_embedding_type = int(GGUF_HEAD_TYPES[head_type])
    ensure_replaceable_file(dst)  # only a GGUF edgeft wrote is ever overwritten
    tmp = unique_sibling(dst, QUANTIZING_TAG, directory=False)  # swept by the next export if we are killed
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise EdgeftError(f"{src}: llama.cpp quantization to {quant} failed (return code {rc})")
        publish_file(tmp, dst)  # mkstemp made it 0600: publish with a new file's usual mode, atomically
    finally:
        del keep
        if tmp.exists():
            tmp.unlink()
    return dst


def _type_overrides(llama_cpp: Any, overrides: dict[str, str]) -> tuple[Any, list[Any]]:
    """The NULL-pattern-terminated llama_model_tensor_override array: one anchored, escaped pattern per
    tensor name (ref: src/llama-quant.cpp, tensor_type_patterns are std::regex searched in the name)."""

    keep: list[Any] = []
    arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (name, kind) in enumerate(sorted(overrides.items())):
        pattern = f"^{re.escape(name)}$".encode()
        keep.append(pattern)
        arr[i].pattern = pattern
        arr[i].type = int(gguf.GGMLQuantizationType[kind.upper()])
    arr[len(overrides)].pattern = None
    return arr, keep
