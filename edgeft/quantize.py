"""GGUF → quantized GGUF through llama.cpp's own quantizer (llama-cpp-python bindings).

llama.cpp picks per-tensor types for mixes like q4_k_m (e.g. q6_k for some ffn_down/attn_v rows), so
edgeft never reimplements that; it only calls `llama_model_quantize` and writes atomically.
"""

from __future__ import annotations

from pathlib import Path

from .constants import GGUF_FTYPES, GGUF_QUANTS
from .errors import EdgeftError
from .files import QUANTIZING_TAG, ensure_replaceable_file, publish_file, unique_sibling
from .guard import check_gguf


def quantize_gguf(src: Path, dst: Path, quant: str, *, threads: int | None = None) -> Path:
    """Quantize the GGUF `src` into `dst` as `quant` (one of GGUF_QUANTS); returns `dst`."""
    if quant not in GGUF_QUANTS:
        raise EdgeftError(f"unknown GGUF quant {quant!r}; choose one of: {', '.join(GGUF_QUANTS)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise EdgeftError(f"{src}: GGUF file to quantize does not exist")
    check_gguf(src)  # llama.cpp's quantizer only ever sees a header edgeft has checked
    import llama_cpp

    from .runtime.llamacpp import silence_llama_logs

    silence_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(GGUF_FTYPES[quant])
    params.nthread = int(threads or 0)  # 0 → llama.cpp uses hardware concurrency
    ensure_replaceable_file(dst)  # only a GGUF edgeft wrote is ever overwritten
    tmp = unique_sibling(dst, QUANTIZING_TAG, directory=False)  # swept by the next export if we are killed
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise EdgeftError(f"{src}: llama.cpp quantization to {quant} failed (return code {rc})")
        publish_file(tmp, dst)  # mkstemp made it 0600: publish with a new file's usual mode, atomically
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst
