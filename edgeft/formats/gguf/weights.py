"""Weights of an HF checkpoint, read lazily tensor by tensor from safetensors, and cast to GGUF storage types."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from edgeft.constants import PICKLE_SUFFIXES
from edgeft.errors import EdgeftError
from edgeft.files import read_json
from edgeft.guard import safetensors_header


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a model dir; refuses pickle-only checkpoints (arbitrary code on load)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [model_dir / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise EdgeftError(f"{index}: lists shards that do not exist: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise EdgeftError(
            f"{model_dir}: only pickle checkpoints ({', '.join(pickles)}) and no *.safetensors; "
            "re-save the model in safetensors, or pass --allow-pickle to have edgeft convert it"
        )
    raise EdgeftError(f"{model_dir}: no *.safetensors weights found")


def tensor_index(files: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for f in files:
        # a damaged or hostile header: one line naming the file, before safetensors reads it
        safetensors_header(f)
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    index[k] = f
        except Exception as e:  # noqa: BLE001 - SafetensorError for offsets past the data, and the like
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise EdgeftError(f"{f}: not a readable safetensors file ({first[:120]})") from None
    return index


def load_tensor(path: Path, name: str) -> np.ndarray:
    """One tensor as float32 numpy (bf16/f16 upcast via torch, since numpy has no bf16)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as sf:
        t = sf.get_tensor(name)
    return t.to(torch.float32).numpy()


@dataclass(frozen=True)
class Plan:
    """One output tensor: where it comes from and how it is transformed."""

    gguf_name: str
    src: Path | None
    hf_name: str
    shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] | None = None  # layout change applied on load
    data: np.ndarray | None = None  # generated tensors (rope_freqs)
    keep_f32: bool = False  # values beyond f16's range: stored as f32 in an f16 file


def out_type(quant: str, plan: Plan) -> gguf.GGMLQuantizationType:
    """Storage type of one tensor: 1-D tensors (norms, biases) stay f32, as llama.cpp's converter does."""
    if quant == "f32" or len(plan.shape) <= 1 or plan.keep_f32:
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType.F16 if quant == "f16" else gguf.GGMLQuantizationType.BF16


def materialize(plan: Plan, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if plan.data is not None:
        data = plan.data
    else:
        assert plan.src is not None
        data = load_tensor(plan.src, plan.hf_name)
        if plan.transform is not None:
            data = plan.transform(data)
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


F16_MAX = float(np.finfo(np.float16).max)


def source_dtype(plan: Plan) -> str:
    """The safetensors dtype of a planned tensor's source ("F32", "BF16", ...; "F32" for generated ones)."""
    if plan.src is None:
        return "F32"
    from safetensors import safe_open

    with safe_open(str(plan.src), framework="pt") as sf:
        return sf.get_slice(plan.hf_name).get_dtype()


def intermediate_type(model_dir: Path) -> str:
    """The 16-bit GGUF type integer quants start from: bf16 for a bf16 checkpoint, else f16."""
    from safetensors import safe_open

    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if sf.get_slice(k).get_dtype() == "BF16":
                    return "bf16"
    return "f16"


def fit_f16(plan: Plan) -> Plan:
    """The plan, kept in f32 if its values do not fit f16 (only f32/bf16 sources can overflow)."""

    if len(plan.shape) <= 1 or source_dtype(plan) == "F16":
        return plan
    data = plan.data if plan.data is not None else load_tensor(plan.src, plan.hf_name)  # type: ignore[arg-type]
    if plan.transform is None and float(np.abs(data).max(initial=0.0)) <= F16_MAX:
        return plan
    if plan.transform is not None and float(np.abs(plan.transform(data)).max(initial=0.0)) <= F16_MAX:
        return plan
    return dataclasses.replace(plan, keep_f32=True)
