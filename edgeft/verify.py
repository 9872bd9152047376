"""Verify: how far an exported artifact drifts from the float model, judged by the artifact's own runtime.

Both models see the same token ids. Per next-token position we compare the distributions (KL divergence,
top-1 agreement), over the sequence the perplexity of the real next tokens, and on the held-out task split
the exact-match accuracy of greedy answers. llama.cpp's perplexity tool reports the same family of numbers
(mean/percentile KLD, same-top-p, PPL ratio; ref: llama.cpp tools/perplexity README) but against an f16
GGUF; here the reference is the fine-tuned float model itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import data as data_mod
from .errors import EdgeftError
from .runtime import Runtime, open_runtime

Progress = Callable[[int, int], None]


@dataclass
class EvalSet:
    """The held-out material every model is scored on: text ids for drift, prompts for the task."""

    sequences: list[list[int]]
    examples: list[data_mod.Example]
    prompts: list[list[int]]
    stop_ids: list[int]
    tokenizer: object
    max_new_tokens: int = 64

    @property
    def n_steps(self) -> int:
        return len(self.sequences) + len(self.prompts)


@dataclass(frozen=True)
class DriftReport:
    """Drift of one artifact against the float model (task_accuracy None when no task data was given)."""

    kld_mean: float
    kld_p99: float
    top1: float
    ppl_ratio: float
    task_accuracy: float | None
    n_positions: int
    n_examples: int

    def metrics(self) -> dict[str, float | None]:
        d = asdict(self)
        return {k: d[k] for k in ("kld_mean", "kld_p99", "top1", "ppl_ratio", "task_accuracy")}


@dataclass
class ReferenceRun:
    """What the float model produced on an EvalSet, computed once and compared with every artifact."""

    log_probs: list[np.ndarray]
    nll: float
    task_accuracy: float | None


def _fallback_text(n: int = 8, chars: int = 600) -> list[str]:
    """Offline English text for drift when no task data is given: Python's own docs."""
    from pydoc_data.topics import topics

    keys = sorted(topics)[:: max(1, len(topics) // n)][:n]
    return [topics[k][:chars] for k in keys]


def load_tokenizer(model_dir: Path):
    """The reference model's tokenizer (the artifact shares it: same ids in, same ids out)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise EdgeftError(f"{model_dir}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None


def make_eval_set(
    tokenizer, examples: Sequence[data_mod.Example] | None, *, max_examples: int = 256, max_len: int = 256
) -> EvalSet:
    """Token ids for drift (the full held-out conversations, or offline text) and prompts for the task."""
    examples = list(examples or [])[:max_examples]
    if examples:
        seqs = [data_mod.train_ids(tokenizer, ex, max_len)[0] for ex in examples]
        prompts = [data_mod.prompt_ids(tokenizer, ex) for ex in examples]
        longest = max(len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
        max_new = min(256, longest + 8)
    else:
        seqs = [tokenizer(t)["input_ids"][:max_len] for t in _fallback_text()]
        prompts, max_new = [], 0
    return EvalSet(seqs, examples, prompts, data_mod.stop_ids(tokenizer), tokenizer, max_new)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _nll(log_probs: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of each real next token."""
    nxt = np.asarray(ids[1:])
    return -log_probs[np.arange(len(nxt)), nxt]


def _still_possible(es: EvalSet, out: list[int], ex: data_mod.Example) -> bool:
    """Whether a greedy answer that starts with `out` can still match exactly (decoding only appends text)."""
    text = es.tokenizer.decode(out, skip_special_tokens=True).strip()
    return ex.answer.strip().startswith(text)


def greedy_answer(rt: Runtime, ids: list[int], ex: data_mod.Example, es: EvalSet) -> list[int]:
    """The greedy answer, generated in doubling chunks and cut short once it can no longer match.

    A wrong answer (every answer of an untuned base model) then costs a few tokens instead of the
    whole budget; a right one costs a few extra prompt passes.
    """
    out: list[int] = []
    chunk, stops = 4, set(es.stop_ids)
    while len(out) < es.max_new_tokens:
        n = min(chunk, es.max_new_tokens - len(out))
        new = rt.generate(ids + out, n, es.stop_ids)
        out += new
        if len(new) < n or (new and new[-1] in stops) or not _still_possible(es, out, ex):
            break
        chunk *= 2
    return out


def _task_accuracy(rt: Runtime, es: EvalSet, progress: Progress | None, done: int) -> float | None:
    if not es.prompts:
        return None
    hits = 0
    for i, (ids, ex) in enumerate(zip(es.prompts, es.examples, strict=True)):
        out = greedy_answer(rt, list(ids), ex, es)
        hits += bool(data_mod.answer_matches(es.tokenizer, out, ex))
        if progress:
            progress(done + i + 1, es.n_steps)
    return hits / len(es.prompts)


def run_reference(rt: Runtime, es: EvalSet, progress: Progress | None = None) -> ReferenceRun:
    """Score the float model once: its log-probs, perplexity and task accuracy."""
    log_probs, nll = [], []
    for i, ids in enumerate(es.sequences):
        lp = _log_softmax(rt.logits(ids)).astype(np.float32)
        log_probs.append(lp)
        nll.append(_nll(lp, ids))
        if progress:
            progress(i + 1, es.n_steps)
    acc = _task_accuracy(rt, es, progress, len(es.sequences))
    return ReferenceRun(log_probs, float(np.concatenate(nll).mean()), acc)


def compare(ref: ReferenceRun, rt: Runtime, es: EvalSet, progress: Progress | None = None) -> DriftReport:
    """Drift of a runtime's model against the reference run on the same ids."""
    klds, agree, nll = [], [], []
    for i, (ids, ref_lp) in enumerate(zip(es.sequences, ref.log_probs, strict=True)):
        lp = _log_softmax(rt.logits(ids)).astype(np.float32)  # stored like the reference's
        if lp.shape != ref_lp.shape:
            raise EdgeftError(
                f"artifact gives logits of shape {lp.shape} where the float model gives {ref_lp.shape}; "
                "vocabulary sizes differ, re-export the artifact from this model"
            )
        p = np.exp(ref_lp.astype(np.float64))
        klds.append((p * (ref_lp.astype(np.float64) - lp)).sum(axis=-1))
        agree.append(ref_lp.argmax(axis=-1) == lp.argmax(axis=-1))
        nll.append(_nll(lp, ids))
        if progress:
            progress(i + 1, es.n_steps)
    kld = np.maximum(np.concatenate(klds), 0.0)
    acc = _task_accuracy(rt, es, progress, len(es.sequences))
    return DriftReport(
        kld_mean=float(kld.mean()),
        kld_p99=float(np.percentile(kld, 99)),
        top1=float(np.concatenate(agree).mean()),
        ppl_ratio=float(np.exp(np.concatenate(nll).mean() - ref.nll)),
        task_accuracy=acc,
        n_positions=int(kld.size),
        n_examples=len(es.prompts),
    )


def verify(
    reference: Path,
    artifact: Path,
    data: Path | None = None,
    *,
    eval_fraction: float = 0.1,
    seed: int = 0,
    threads: int | None = None,
    progress: Progress | None = None,
) -> tuple[DriftReport, float | None]:
    """Drift of `artifact` against the float model in `reference` (and the reference's task accuracy).

    With `data`, the held-out split (same seed as fine-tuning) is the text and the task; without it,
    offline English text is used and task accuracy is not measured.
    """
    tok = load_tokenizer(reference)
    examples = None
    if data is not None:
        _, examples = data_mod.load_split(Path(data), eval_fraction, seed)
    es = make_eval_set(tok, examples)
    ref_rt = open_runtime(reference, threads=threads)
    ref = run_reference(ref_rt, es)
    ref_rt.close()
    rt = open_runtime(artifact, threads=threads)
    try:
        return compare(ref, rt, es, progress), ref.task_accuracy
    finally:
        rt.close()
