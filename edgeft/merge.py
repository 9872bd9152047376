"""Merge a LoRA adapter into its base model and prove the merged checkpoint computes the same logits.

Why: exporters (GGUF, ONNX) want one plain checkpoint. Merging is done in float32, the result is cast to
the base checkpoint's own dtype and saved with the tokenizer, chat template and generation config; then
the saved model is reloaded and its logits on probe sequences are compared with the adapter model's.
Any difference over the dtype's tolerance, or a NaN/inf anywhere, is an EdgeftError: a silently broken
merge would otherwise only show up as a bad score on the device.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import EdgeftError
from .files import atomic_dir
from .finetune import ADAPTER_FILES, RECORD, load_model, load_tokenizer, resolve_model

# Max |logit difference| allowed, relative to max(1, max |reference logit|): float32 only sees summation
# order changes; half types see the rounding of every weight and activation.
REL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 8e-2, torch.float16: 2e-2}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
PROBE_TEXTS = (
    "turn on the kitchen lights",
    "The quick brown fox jumps over the lazy dog. 0123456789",
)
PROBE_RANDOM_LEN = 24


@dataclass(frozen=True)
class MergeResult:
    """The merged model directory, its dtype, and how close its logits came to the adapter model's."""

    out_dir: Path
    dtype: str  # "float32" | "bfloat16" | "float16"
    max_abs_diff: float  # saved model vs adapter model, over all probe positions and vocab
    tolerance: float


def checkpoint_dtype(model: str | Path) -> torch.dtype:
    """The floating dtype the base checkpoint stores its weights in (safetensors header, else config)."""
    name = resolve_model(model)
    path = Path(name)
    if path.is_dir():
        from safetensors import safe_open

        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    dt = SAFETENSORS_DTYPES.get(st.get_slice(key).get_dtype())
                    if dt is not None:
                        return dt
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(name)
    dt = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if dt in REL_TOLERANCE else torch.float32


def _probe_ids(tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """A few probe sequences: fixed texts through the tokenizer, plus seeded random ids."""
    probes = [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in PROBE_TEXTS]
    gen = torch.Generator().manual_seed(0)
    probes.append(torch.randint(0, vocab_size, (PROBE_RANDOM_LEN,), generator=gen).tolist())
    return [p for p in probes if p]


@torch.no_grad()
def _logits(model: Any, probes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=torch.tensor([list(p)])).logits[0].float() for p in probes]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _check_adapter_dir(adapter: Path) -> None:
    if not adapter.is_dir():
        raise EdgeftError(f"{adapter}: adapter directory not found")
    missing = [f for f in ADAPTER_FILES if not (adapter / f).is_file()]
    if missing:
        raise EdgeftError(f"{adapter}: not a PEFT adapter directory (missing {', '.join(missing)})")


def merge(
    model: str | Path,
    adapter: Path,
    out: Path,
    *,
    check_ids: list[list[int]] | None = None,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Merge `adapter` into `model`, save to `out` atomically in the base dtype, verified by logits."""
    from peft import PeftModel

    adapter, out = Path(adapter), Path(out)
    _check_adapter_dir(adapter)
    dtype = checkpoint_dtype(model)
    tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else model
    tokenizer = load_tokenizer(tok_src, trust_remote_code=trust_remote_code)
    base = load_model(model, dtype=torch.float32, trust_remote_code=trust_remote_code)
    try:
        peft_model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise EdgeftError(f"{adapter}: cannot apply the adapter to {model} ({str(e).splitlines()[0]})") from e
    vocab = int(peft_model.get_input_embeddings().weight.shape[0])
    probes = check_ids if check_ids is not None else _probe_ids(tokenizer, vocab)
    if not probes or any(not p or min(p) < 0 or max(p) >= vocab for p in probes):
        raise EdgeftError(f"check_ids must be non-empty sequences of ids in [0, {vocab})")

    ref = _logits(peft_model, probes)
    if not all(bool(torch.isfinite(x).all()) for x in ref):
        raise EdgeftError(f"{adapter}: the adapter model produces NaN/inf logits; the adapter is broken")
    merged = peft_model.merge_and_unload()
    bad = [n for n, p in merged.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise EdgeftError(f"{adapter}: merged weights contain NaN/inf (e.g. {bad[0]})")
    f32_diff = _max_diff(ref, _logits(merged, probes))
    scale = max(1.0, max(float(x.abs().max()) for x in ref))
    if f32_diff > REL_TOLERANCE[torch.float32] * scale:
        raise EdgeftError(f"merge changed float32 logits by {f32_diff:.3g} (max |logit| {scale:.3g})")

    tolerance = REL_TOLERANCE[dtype] * scale
    with atomic_dir(out) as partial:
        merged = merged.to(dtype)
        merged.config.dtype = dtype
        merged.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        if (adapter / RECORD).is_file():
            shutil.copy2(adapter / RECORD, partial / RECORD)
        del merged, peft_model, base
        saved = load_model(partial, dtype=dtype)
        got = _logits(saved, probes)
        if not all(bool(torch.isfinite(x).all()) for x in got):
            raise EdgeftError(f"{out}: the merged {dtype} model produces NaN/inf logits")
        diff = _max_diff(ref, got)
        if diff > tolerance:
            raise EdgeftError(
                f"{out}: merged {str(dtype).removeprefix('torch.')} model's logits differ from the adapter "
                f"model's by {diff:.3g} > tolerance {tolerance:.3g}"
            )
        (partial / "edgeft_merge.json").write_text(
            json.dumps(
                {
                    "base_model": str(model),
                    "adapter": str(adapter),
                    "dtype": str(dtype).removeprefix("torch."),
                    "max_abs_diff": diff,
                    "tolerance": tolerance,
                    "float32_merge_diff": f32_diff,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    return MergeResult(
        out_dir=out, dtype=str(dtype).removeprefix("torch."), max_abs_diff=diff, tolerance=tolerance
    )
