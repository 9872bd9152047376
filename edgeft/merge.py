"""Merge a LoRA adapter into its base model and prove the merged checkpoint computes the same logits.

Why: exporters (GGUF, ONNX) want one plain checkpoint. Merging is done in float32, the result is cast to
the base checkpoint's own dtype and saved with the base's own tokenizer and chat-template files (byte for byte) and generation config; then
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

from edgeft.constants import FINETUNE_RECORD
from edgeft.errors import EdgeftError
from edgeft.files import atomic_dir
from edgeft.finetune import ADAPTER_FILES
from edgeft.loading import checkpoint_dtype, copy_tokenizer_files, load_model, load_tokenizer

# Max |logit difference| allowed, relative to max(1, max |reference logit|): float32 only sees summation
# order changes; half types see the rounding of every weight and activation.
REL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 8e-2, torch.float16: 2e-2}
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
    if missing and (adapter / "config.json").is_file() and any(adapter.glob("*.safetensors")):
        raise EdgeftError(
            f"{adapter}: a whole fine-tuned model (--method full), not an adapter: nothing to merge; export "
            "or verify it directly"
        )
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
    dtype = getattr(torch, checkpoint_dtype(model))
    tok_src = model  # the merged model carries the base's own tokenizer files, as the adapter does
    tokenizer = load_tokenizer(tok_src, trust_remote_code=trust_remote_code, notify=False)  # finetune said it
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
        copy_tokenizer_files(tok_src, partial)
        if (adapter / FINETUNE_RECORD).is_file():
            shutil.copy2(adapter / FINETUNE_RECORD, partial / FINETUNE_RECORD)
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
