"""HF causal LM directory → GGUF file, built on gguf-py, loading weights lazily tensor by tensor.

One module per concern: `arch` (hyperparameters and tensor layout per architecture), `vocab` (tokenizer),
`weights` (reading and casting tensors). Float types (f32/f16/bf16) are written here; integer quants are
written as a 16-bit intermediate first and then handed to llama.cpp's own quantizer (edgeft.quantize),
which knows the per-tensor type mixes (e.g. q4_k_m).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...constants import GGUF_ARCHS, GGUF_FLOAT_QUANTS, GGUF_FTYPES, GGUF_QUANTS
from ...errors import EdgeftError
from ...files import read_json
from .arch import plan_tensors, write_hparams
from .vocab import pre_tokenizer_signature, write_tokenizer
from .weights import fit_f16, intermediate_type, materialize, out_type

__all__ = ["GGUFExportResult", "export_gguf", "pre_tokenizer_signature"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class GGUFExportResult:
    """What export_gguf wrote."""

    path: Path
    quant: str
    arch: str
    n_tensors: int
    bytes: int


def _load_config(model_dir: Path) -> tuple[dict[str, Any], gguf.MODEL_ARCH]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EdgeftError(f"{model_dir}: model directory does not exist")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise EdgeftError(f"{cfg_path}: missing; not a Hugging Face model directory")
    config = read_json(cfg_path)
    archs = config.get("architectures") or []
    for a in archs:
        if a in GGUF_ARCHS:
            return config, GGUF_ARCHS[a]
    raise EdgeftError(
        f"{cfg_path}: architecture {', '.join(archs) or '(none)'} is not supported for GGUF export; "
        f"supported: {', '.join(GGUF_ARCHS)}"
    )


def _write_float_gguf(model_dir: Path, dst: Path, quant: str, progress: Progress | None) -> tuple[str, int]:
    """Write a float GGUF to `dst` (not atomic; the caller owns the temp name). Returns (arch, n_tensors)."""
    config, arch = _load_config(model_dir)
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    n_vocab = int(config.get("vocab_size") or 0)
    w = gguf.GGUFWriter(str(dst), arch_name)
    try:
        w.add_name(model_dir.name)
        extra = write_hparams(w, config, int(GGUF_FTYPES[quant]), n_vocab)
        write_tokenizer(w, model_dir, config, n_vocab)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        plans = plan_tensors(model_dir, arch, config, extra)
        if quant == "f16":
            plans = [fit_f16(p) for p in plans]
        for p in plans:
            qtype = out_type(quant, p)
            if qtype == gguf.GGMLQuantizationType.BF16:
                byte_shape = gguf.quant_shape_to_byte_shape(p.shape, qtype)
                w.add_tensor_info(
                    p.gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype
                )
            else:
                dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
                w.add_tensor_info(p.gguf_name, p.shape, dtype, int(np.prod(p.shape)) * dtype.itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, p in enumerate(plans):
            w.write_tensor_data(materialize(p, out_type(quant, p)))
            if progress is not None:
                progress(i + 1, len(plans))
        w.flush()
    finally:
        w.close()
    return arch_name, len(plans)


def _temp_path(out: Path, tag: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".{tag}.tmp", dir=out.parent)
    os.close(fd)
    return Path(name)


def export_gguf(
    model_dir: Path, out: Path, quant: str = "f32", *, progress: Progress | None = None
) -> GGUFExportResult:
    """Convert an HF model directory (safetensors + tokenizer) into one GGUF file at `out`, atomically."""
    if quant not in GGUF_QUANTS:
        raise EdgeftError(f"unknown GGUF quant {quant!r}; choose one of: {', '.join(GGUF_QUANTS)}")
    model_dir, out = Path(model_dir), Path(out)
    _load_config(model_dir)  # fail on bad input before creating any file
    out.parent.mkdir(parents=True, exist_ok=True)
    # Integer quants go through a 16-bit intermediate (2 bytes a parameter of temporary disk, not 4): bf16
    # for bf16 checkpoints (lossless), f16 otherwise, as llama.cpp's own convert-then-quantize flow does.
    float_quant = quant if quant in GGUF_FLOAT_QUANTS else intermediate_type(model_dir)
    tmp = _temp_path(out, float_quant)
    tmp_q: Path | None = None
    try:
        arch, n_tensors = _write_float_gguf(model_dir, tmp, float_quant, progress)
        if quant in GGUF_FLOAT_QUANTS:
            os.replace(tmp, out)
        else:
            from ...quantize import quantize_gguf

            tmp_q = _temp_path(out, quant)
            quantize_gguf(tmp, tmp_q, quant)
            os.replace(tmp_q, out)
    finally:
        for t in (tmp, tmp_q):
            if t is not None and t.exists():
                t.unlink()
    return GGUFExportResult(path=out, quant=quant, arch=arch, n_tensors=n_tensors, bytes=out.stat().st_size)
