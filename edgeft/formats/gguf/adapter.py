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
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgeft import __version__
from edgeft.errors import EdgeftError
from edgeft.files import MARKER, atomic_dir, publish_file, read_json, sha256_file, unique_sibling
from edgeft.formats.gguf.arch import _mul, permute, prepare
from edgeft.formats.gguf.header import GGUF_MARKER_KEY, GGUFHeader, check_gguf, ensure_replaceable_file
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
        raise EdgeftError(f"{where}: r = {rank!r:.40} should be a positive integer")
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise EdgeftError(f"{where}: lora_alpha = {str(alpha)[:40]} should be a positive number")
    scale_alpha = float(alpha) * math.sqrt(rank) if cfg.get("use_rslora") else float(alpha)
    return rank, scale_alpha


def _pair_key(key: str, weights: Path) -> tuple[str, str]:
    """A peft tensor name → (the base weight's HF name, "a" or "b"); one line for any other tensor."""
    for part, tag in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
        if key.startswith(PEFT_PREFIX) and key.endswith(part):
            return key[len(PEFT_PREFIX) : -len(part)] + ".weight", tag
    raise EdgeftError(f"{weights}: tensor {key[:120]!r} is not a LoRA A or B weight; merge instead")


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
    from safetensors import SafetensorError, safe_open  # lazy: with torch, only needed here

    base_dir, adapter_dir, out = Path(base_dir), Path(adapter_dir), Path(out)
    rank, alpha = _adapter_settings(adapter_dir)
    weights = require_regular(inside(adapter_dir, ADAPTER_WEIGHTS, what="weights file"))
    prepared = prepare(base_dir)
    plans = {p.hf_name: p for p in prepared.plans}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    try:
        with safe_open(str(weights), framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 - safe_open handles are not iterable
                hf, tag = _pair_key(key, weights)
                plan = plans.get(hf)
                if plan is None:
                    raise EdgeftError(
                        f"{weights}: {hf[:120]} is not a weight of {base_dir}'s GGUF; merge instead"
                    )
                # the shape and type from the header, checked before the tensor is read
                info = sf.get_slice(key)
                want = (rank, plan.shape[-1]) if tag == "a" else (plan.shape[0], rank)
                if info.get_dtype() not in ("F32", "F16", "BF16") or tuple(info.get_shape()) != want:
                    raise EdgeftError(
                        f"{weights}: {key[:120]} is {info.get_dtype()} {tuple(info.get_shape())}; expected a float "
                        f"tensor of {want} (rank {rank} on the base weight {plan.shape})"
                    )
                values = sf.get_tensor(key).float().numpy()
                if not np.isfinite(values).all():
                    raise EdgeftError(f"{weights}: {key[:120]} holds NaN or infinite values")
                pairs.setdefault(hf, {})[tag] = values
    except (OSError, SafetensorError) as e:
        raise EdgeftError(f"{weights}: not a readable safetensors file ({str(e)[:80]})") from None
    if not pairs:
        raise EdgeftError(f"{weights}: no LoRA weights")
    ensure_replaceable_file(out)
    tmp = unique_sibling(out, "partial", directory=False)
    try:
        w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[prepared.gguf_arch])
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_string(GGUF_MARKER_KEY, __version__)
        for hf, ab in sorted(pairs.items()):
            plan = plans.get(hf)
            if plan is None or set(ab) != {"a", "b"}:
                raise EdgeftError(f"{weights}: {hf} is not a weight of {base_dir}'s GGUF (or lacks A or B)")
            a, b = ab["a"], ab["b"]
            transform = _row_transform(plan.transform, f"{weights}: {hf}")
            b = transform(b) if transform is not None else b  # type: ignore[operator]
            dtype = np.float16 if f16 else np.float32
            if f16 and not (np.isfinite(a.astype(dtype)).all() and np.isfinite(b.astype(dtype)).all()):
                raise EdgeftError(f"{weights}: {hf} has values beyond float16's range; write it as float32")
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


# Tensor types llama.cpp's LoRA matmuls take from an adapter file (what its converter writes: f32, f16, bf16,
# q8_0); anything else is refused before loading (an int32 lora_a crashed llama.cpp outright).
ADAPTER_TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0")


def check_pair(base: Path, adapter: Path, base_header: GGUFHeader | None = None) -> None:
    """Refuse, in one line and before llama.cpp loads either, an adapter it would abort on or that does not
    fit the base GGUF (another model's file), from both headers alone: general.type and adapter.type,
    alpha a finite float32 > 0 (llama.cpp asserts the type), the same architecture, only complete
    2-D lora_a/lora_b pairs of known float types, each fitting a 2-D base weight."""
    b, a = base_header or check_gguf(base), check_gguf(adapter)
    if b.value("general.type") == "adapter":
        raise EdgeftError(
            f"{base}: an adapter GGUF, not a model; a base + adapter needs the model as its base"
        )
    if a.value("general.type") != "adapter" or a.value(gguf.Keys.Adapter.TYPE) != "lora":
        raise EdgeftError(
            f"{adapter}: not a LoRA adapter GGUF (general.type = {str(a.value('general.type'))[:40]!r})"
        )
    alpha = a.value(gguf.Keys.Adapter.LORA_ALPHA)
    if a.types.get(gguf.Keys.Adapter.LORA_ALPHA) != gguf.GGUFValueType.FLOAT32 or not (
        isinstance(alpha, float) and math.isfinite(alpha) and alpha > 0
    ):
        raise EdgeftError(f"{adapter}: {gguf.Keys.Adapter.LORA_ALPHA} should be one float32 above 0")
    arch_a, arch_b = a.value("general.architecture"), b.value("general.architecture")
    if arch_a != arch_b:
        raise EdgeftError(
            f"{adapter}: an adapter for {str(arch_a)[:40]!r}, but {base} is a {str(arch_b)[:40]!r} model"
        )
    shapes = {t.name: t.shape for t in b.tensors}
    parts = {t.name: t for t in a.tensors}
    for name, t in parts.items():
        target, dot, part = name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise EdgeftError(f"{adapter}: tensor {name[:80]!r} is not a lora_a or lora_b weight")
        if t.type not in ADAPTER_TENSOR_TYPES or len(t.shape) != 2:
            raise EdgeftError(
                f"{adapter}: {name[:80]} is a {len(t.shape)}-D {t.type} tensor, not a 2-D float one"
            )
        la, lb = parts.get(f"{target}.lora_a"), parts.get(f"{target}.lora_b")
        w = shapes.get(target)
        # ggml order (ne): base [in, out], lora_a [in, rank], lora_b [rank, out] (ref: llama-adapter.cpp)
        fits = la is not None and lb is not None and w is not None and len(w) == 2
        if not fits or la.shape[0] != w[0] or lb.shape[1] != w[1] or la.shape[1] != lb.shape[0]:  # type: ignore[union-attr,index]
            raise EdgeftError(
                f"{adapter}: {target[:80]} does not fit {base} (base {w}, adapter "
                f"{getattr(la, 'shape', None)} / {getattr(lb, 'shape', None)}); it was trained on another model"
            )


# --- a base + adapter artifact --------------------------------------------------------------------------------
# A folder holding the base model's GGUF ("base-<quant>.gguf") and one LoRA GGUF per task
# ("adapter-<task>.gguf"), nothing else: one base file in RAM serves every adapter beside it.
PAIR_BASE = "base-"
PAIR_ADAPTER = "adapter-"
# At most this many adapters beside one base: each is checked against the base before anything loads.
MAX_PAIR_ADAPTERS = 64


@dataclass(frozen=True)
class Pair:
    """A base + adapter folder's files: the base GGUF and each task's adapter GGUF, by task name."""

    base: Path
    adapters: dict[str, Path]

    def adapter(self, task: str | None = None) -> Path:
        """The adapter of `task`; without a name, the first by name."""
        if task is None:
            return self.adapters[min(self.adapters)]
        if task not in self.adapters:
            raise EdgeftError(
                f"{self.base.parent}: no adapter {str(task)[:40]!r}; it holds {', '.join(sorted(self.adapters))}"
            )
        return self.adapters[task]  # type: ignore[index]


def is_pair(folder: Path) -> bool:
    """Whether `folder` looks like a base + adapter artifact (its files are checked by pair_files)."""
    folder = Path(folder)
    return folder.is_dir() and not folder.is_symlink() and any(folder.glob(f"{PAIR_ADAPTER}*.gguf"))


def pair_files(folder: Path) -> Pair:
    """The files of a base + adapter folder, each a regular file (no links, no subfolders, nothing else), one
    base and at least one adapter; any other content is one line. Headers are checked by check_pair."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise EdgeftError(f"{folder}: not a base + adapter folder")
    base, adapters = [], {}
    entries = []
    for i, f in enumerate(folder.iterdir()):
        if i > MAX_PAIR_ADAPTERS + 2:
            raise EdgeftError(
                f"{folder}: more than {MAX_PAIR_ADAPTERS} adapters; a base + adapter holds fewer"
            )
        entries.append(f)
    for f in sorted(entries):
        if f.name == MARKER and f.is_file() and not f.is_symlink():
            continue  # the folder's "written by edgeft" marker (edgeft.files.atomic_dir)
        if f.is_symlink() or not f.is_file() or f.suffix != ".gguf":
            raise EdgeftError(
                f"{f}: a base + adapter folder holds only its {PAIR_BASE}*.gguf and {PAIR_ADAPTER}*.gguf files"
            )
        if f.name.startswith(PAIR_ADAPTER):
            adapters[f.name[len(PAIR_ADAPTER) : -len(".gguf")]] = f
        elif f.name.startswith(PAIR_BASE):
            base.append(f)
        else:
            raise EdgeftError(f"{f}: neither {PAIR_BASE}*.gguf nor {PAIR_ADAPTER}*.gguf")
    if len(base) != 1 or not adapters:
        raise EdgeftError(
            f"{folder}: a base + adapter folder holds one {PAIR_BASE}*.gguf and at least one "
            f"{PAIR_ADAPTER}*.gguf (found {len(base)} and {len(adapters)})"
        )
    return Pair(base[0], adapters)


def check_pair_folder(folder: Path) -> Pair:
    """pair_files, and every adapter checked against the base from both headers (check_pair)."""
    pair = pair_files(folder)
    header = check_gguf(pair.base)  # read once for every adapter
    for adapter in pair.adapters.values():
        check_pair(pair.base, adapter, header)
    return pair


def combine_pairs(paths: Sequence[Path], out: Path) -> Path:
    """Base + adapter folders of several tasks as one folder `out` holding the base once and every adapter,
    written whole and moved into place. Refused in one line unless every base is the same bytes (the same
    model quantized the same way) and no task name repeats."""
    pairs = [check_pair_folder(p) for p in paths]
    digest = sha256_file(pairs[0].base)
    for p in pairs[1:]:
        if p.base.name != pairs[0].base.name or sha256_file(p.base) != digest:
            raise EdgeftError(
                f"{p.base}: not the same base as {pairs[0].base}; adapters share a base only when it is the "
                "same model quantized the same way"
            )
    seen: dict[str, Path] = {}
    for p in pairs:
        for task, f in p.adapters.items():
            if task in seen:
                raise EdgeftError(f"{f}: task {task!r} is also in {seen[task]}; give each task its own name")
            seen[task] = f
    with atomic_dir(out, what="base + adapter artifact") as tmp:
        shutil.copy2(pairs[0].base, tmp / pairs[0].base.name)
        for f in seen.values():
            shutil.copy2(f, tmp / f.name)
        check_pair_folder(tmp)
    return Path(out)
