"""A peft LoRA adapter as llama.cpp's LoRA GGUF, to run on top of a (quantized) GGUF of its base model: one
base in RAM can serve several fine-tunes (llama.cpp computes W x + s * B (A x) since PR #8332).

Format facts, ref: llama.cpp convert_lora_to_gguf.py (LoraModel.set_type / set_gguf_parameters /
modify_tensors) and src/llama-adapter.cpp (llama_adapter_lora_init_impl):
- general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (float32), and the base's
  general.architecture (llama.cpp refuses an adapter whose architecture differs from the model's);
- per adapted weight `<name>`: `<name>.lora_a` with the shape of peft's lora_A ([rank, in]) and
  `<name>.lora_b` with lora_B's ([out, rank]); llama.cpp checks a.ne[0] == in, b.ne[1] == out and
  a.ne[1] == b.ne[0], and scales by alpha / rank (peft's scaling; rsLoRA's alpha / sqrt(rank) is written as
  alpha * sqrt(rank) so llama.cpp's alpha / rank gives it);
- the layout changes the model converter makes to a weight's rows (Llama's Q/K rope permutation, Gemma's
  query scale) apply to lora_b's rows, the same way convert_lora_to_gguf.py's LoraTorchTensor does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgeft.errors import EdgeftError
from edgeft.files import publish_file, read_json, unique_sibling
from edgeft.formats.gguf.arch import _mul, permute, prepare
from edgeft.formats.gguf.header import GGUF_MARKER_KEY, check_gguf, ensure_replaceable_file
from edgeft.guard import inside, require_regular

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Row-wise layout changes of the model converter that carry over to lora_b (see the module docstring).
ROW_TRANSFORMS = (permute, _mul)


@dataclass(frozen=True)
class AdapterResult:
    path: Path
    n_pairs: int  # adapted weights
    rank: int
    alpha: float  # as written (llama.cpp scales by alpha / rank)


def _adapter_settings(adapter_dir: Path) -> tuple[int, float]:
    """(rank, the alpha llama.cpp needs) from adapter_config.json; one line for what llama.cpp cannot run."""
    where = adapter_dir / ADAPTER_CONFIG
    cfg = read_json(inside(adapter_dir, ADAPTER_CONFIG, what="file"))
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise EdgeftError(f"{where}: not a peft LoRA adapter config")
    for key, why in (
        ("use_dora", "DoRA's magnitude vector"),
        ("modules_to_save", "fully trained modules"),
        ("rank_pattern", "per-module ranks"),
        ("alpha_pattern", "per-module alphas"),
    ):
        if cfg.get(key):
            raise EdgeftError(
                f"{where}: {key} is set; llama.cpp's LoRA adapters have no {why}; merge instead"
            )
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise EdgeftError(f"{where}: r = {str(rank)[:40]} should be a positive integer")
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise EdgeftError(f"{where}: lora_alpha = {str(alpha)[:40]} should be a positive number")
    scale_alpha = float(alpha) * math.sqrt(rank) if cfg.get("use_rslora") else float(alpha)
    return rank, scale_alpha


def _row_transform(transform: object, where: str) -> object:
    """The model converter's transform of a weight, if it only reorders or scales rows (else one line)."""
    if transform is None:
        return None
    if isinstance(transform, functools.partial) and transform.func in ROW_TRANSFORMS:
        return transform
    raise EdgeftError(
        f"{where}: the GGUF converter changes this weight in a way a LoRA adapter cannot follow"
    )


def export_lora_gguf(base_dir: Path, adapter_dir: Path, out: Path, *, f16: bool = False) -> AdapterResult:
    """Write the peft adapter in `adapter_dir` (trained on the HF model `base_dir`) as llama.cpp's LoRA GGUF
    `out` (float32, or float16 with `f16`), written whole under a temporary name and moved into place."""
    from safetensors import safe_open  # lazy: safetensors' torch-free reader is only needed here

    base_dir, adapter_dir, out = Path(base_dir), Path(adapter_dir), Path(out)
    rank, alpha = _adapter_settings(adapter_dir)
    weights = require_regular(inside(adapter_dir, ADAPTER_WEIGHTS, what="weights file"))
    prepared = prepare(base_dir)
    plans = {p.hf_name: p for p in prepared.plans}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(weights), framework="numpy") as sf:
        for key in sf.keys():  # noqa: SIM118 - safe_open handles are not iterable
            for part, tag in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
                if key.startswith(PEFT_PREFIX) and key.endswith(part):
                    hf = key[len(PEFT_PREFIX) : -len(part)] + ".weight"
                    pairs.setdefault(hf, {})[tag] = sf.get_tensor(key).astype(np.float32)
                    break
            else:
                raise EdgeftError(
                    f"{weights}: tensor {key[:120]!r} is not a LoRA A or B weight; merge instead"
                )
    if not pairs:
        raise EdgeftError(f"{weights}: no LoRA weights")
    ensure_replaceable_file(out)
    tmp = unique_sibling(out, "partial", directory=False)
    try:
        w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[prepared.gguf_arch])
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_string(GGUF_MARKER_KEY, _version())
        for hf, ab in sorted(pairs.items()):
            plan = plans.get(hf)
            if plan is None or set(ab) != {"a", "b"}:
                raise EdgeftError(f"{weights}: {hf} is not a weight of {base_dir}'s GGUF (or lacks A or B)")
            a, b = ab["a"], ab["b"]
            if a.shape != (rank, plan.shape[-1]) or b.shape != (plan.shape[0], rank):
                raise EdgeftError(
                    f"{weights}: {hf} has A {a.shape} and B {b.shape}; the base weight is {plan.shape} at rank {rank}"
                )
            transform = _row_transform(plan.transform, f"{weights}: {hf}")
            b = transform(b) if transform is not None else b  # type: ignore[operator]
            dtype = np.float16 if f16 else np.float32
            w.add_tensor(f"{plan.gguf_name}.lora_a", np.ascontiguousarray(a, dtype=dtype))
            w.add_tensor(f"{plan.gguf_name}.lora_b", np.ascontiguousarray(b, dtype=dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        publish_file(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return AdapterResult(out, len(pairs), rank, alpha)


def _version() -> str:
    from edgeft import __version__

    return __version__


def check_pair(base: Path, adapter: Path) -> None:
    """Refuse, in one line and before llama.cpp loads either, an adapter whose architecture or tensor shapes
    do not fit the base GGUF (another model's file), from both headers alone."""
    b, a = check_gguf(base), check_gguf(adapter)
    if a.value("general.type") != "adapter" or a.value(gguf.Keys.Adapter.TYPE) != "lora":
        raise EdgeftError(f"{adapter}: not a LoRA adapter GGUF (general.type = {a.value('general.type')!r})")
    arch_a, arch_b = a.value("general.architecture"), b.value("general.architecture")
    if arch_a != arch_b:
        raise EdgeftError(f"{adapter}: an adapter for {arch_a!r}, but {base} is a {arch_b!r} model")
    shapes = {t.name: tuple(t.shape) for t in b.tensors}
    by_name = {t.name: tuple(t.shape) for t in a.tensors}
    for name, shape in by_name.items():
        if not name.endswith(".lora_a"):
            continue
        target = name.removesuffix(".lora_a")
        other = by_name.get(target + ".lora_b")
        # ggml order (ne): base [in, out], lora_a [in, rank], lora_b [rank, out]
        fits = other is not None and target in shapes and shape[1] == other[0]
        if not fits or shapes[target][0] != shape[0] or shapes[target][1] != other[1]:  # type: ignore[index]
            raise EdgeftError(
                f"{adapter}: {target} does not fit {base} (adapter {shape} / {other}, base {shapes.get(target)}); "
                "it was trained on another model"
            )
