"""GGUF → quantized GGUF through llama.cpp's own quantizer (llama-cpp-python bindings).

llama.cpp picks per-tensor types for mixes like q4_k_m (e.g. q6_k for some ffn_down/attn_v rows), so
edgeft never reimplements that; it only calls `llama_model_quantize` and writes atomically. An importance
matrix (edgeft.imatrix) and a type for the output head / token embedding go in through the same parameters
llama.cpp's quantize tool fills (../shared/REFERENCE.md "llama.cpp's quantizer from Python").
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf

from .constants import (
    GGUF_FLOAT_QUANTS,
    GGUF_FTYPES,
    GGUF_HEAD_TYPES,
    GGUF_IMATRIX_DATASET_PREFIX,
    GGUF_IMATRIX_QUANTS,
    GGUF_KEY_IMATRIX_CHUNKS,
    GGUF_KEY_IMATRIX_DATASET,
    GGUF_KEY_IMATRIX_ENTRIES,
    GGUF_QUANTS,
)
from .errors import EdgeftError
from .files import QUANTIZING_TAG, ensure_replaceable_file, publish_file, unique_sibling
from .guard import check_gguf

if TYPE_CHECKING:
    from .imatrix import Imatrix

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
    try:
        reader = gguf.GGUFReader(src)
    except (ValueError, OSError) as exc:
        raise EdgeftError(f"{src}: cannot read GGUF tensor infos ({exc})") from None
    return {t.name: int(t.shape[0]) for t in reader.tensors}


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


def _kv_overrides(llama_cpp: Any, imatrix: Imatrix) -> Any:
    """The empty-key-terminated llama_model_kv_override array with the keys llama.cpp's quantize tool writes
    for an importance matrix (ref: tools/quantize/quantize.cpp; an INT lands as UINT32, src/llama-quant.cpp)."""
    items: list[tuple[str, int, str | int]] = [
        (GGUF_KEY_IMATRIX_DATASET, llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, imatrix_dataset_name(imatrix)),
        (GGUF_KEY_IMATRIX_ENTRIES, llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, len(imatrix.values)),
        (GGUF_KEY_IMATRIX_CHUNKS, llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, imatrix.examples),
    ]
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


def quantize_gguf(
    src: Path,
    dst: Path,
    quant: str,
    *,
    threads: int | None = None,
    imatrix: Imatrix | None = None,
    head_type: str | None = None,
) -> Path:
    """Quantize the GGUF `src` into `dst` as `quant` (one of GGUF_QUANTS); returns `dst`.

    `imatrix` (one of GGUF_IMATRIX_QUANTS only) weighs each tensor's columns by the calibration data's
    activations and records quantize.imatrix.* keys; `head_type` (a GGUF_HEAD_TYPES name, e.g. "q8_0") keeps
    output.weight and token_embd.weight at that type whatever the mix would pick.
    """
    src, dst = Path(src), Path(dst)
    check_quant_options(quant, imatrix is not None, head_type, str(dst))
    if not src.is_file():
        raise EdgeftError(f"{src}: GGUF file to quantize does not exist")
    check_gguf(src)  # llama.cpp's quantizer only ever sees a header edgeft has checked
    if imatrix is not None or head_type is not None:
        check_columns(_tensor_columns(src), imatrix, head_type, str(src))
    import llama_cpp

    from .runtime.llamacpp import silence_llama_logs

    silence_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(GGUF_FTYPES[quant])
    params.nthread = int(threads or 0)  # 0 → llama.cpp uses hardware concurrency
    keep: list[Any] = []  # everything params points into, alive until the call returns
    if imatrix is not None:
        arr, buffers = _imatrix_array(llama_cpp, imatrix)
        kvs = _kv_overrides(llama_cpp, imatrix)
        keep += [arr, buffers, kvs]
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
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
