"""Verify: how far an exported artifact drifts from the fine-tuned float model, judged in its own runtime.

Two views, both against the float model in PyTorch:
- the weights: both models see the same token ids; per next-token position the distributions are compared
  (KL divergence, top-1 agreement) and over the sequences the perplexity of the real next tokens
  (llama.cpp's perplexity tool reports the same family of numbers against an f16 GGUF; ref: llama.cpp
  tools/perplexity README — here the reference is the fine-tuned float model itself);
- the product, the path an app takes: each eval conversation is rendered by the artifact's own chat
  template and tokenized by its own tokenizer (llama-cpp-python's `create_chat_completion` path for GGUF,
  onnxruntime-genai's `apply_chat_template` + `encode` for ONNX) and answered greedily until the runtime's
  own end-of-generation ids. `prompt_ids_match` is the fraction of conversations whose prompt ids equal
  the fine-tune's, `answers_match` the fraction whose answers equal the float model's, and the first
  difference of each is kept, as tokens, for the report.

Memory stays bounded for big vocabularies: the float model's logits are kept between artifacts only while
they fit REFERENCE_CACHE_BYTES; beyond that they are recomputed per sequence from the open float model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import data as data_mod
from . import metrics, probes
from .constants import FINETUNE_RECORD
from .errors import EdgeftError
from .probes import PROBE_CONVERSATIONS
from .runtime import Runtime, open_runtime
from .ui import Progress

REFERENCE_CACHE_BYTES = 512 << 20
_END = -2  # marks "the answer ended here" in difference reports


@dataclass
class EvalSet:
    """What every model is scored on: conversations (the task) and their ids as the fine-tune saw them."""

    examples: list[data_mod.Example]  # conversations; the last assistant turn is the expected answer
    sequences: list[list[int]]  # whole conversations, for drift on shared ids
    prompts: list[list[int]]  # the fine-tune's prompt ids of each conversation
    max_new_tokens: int
    scored: bool  # the examples are task data (exact match is meaningful), not built-in probes
    source: str = ""  # where the examples came from, for the report

    @property
    def n_steps(self) -> int:
        return len(self.sequences) + len(self.examples)

    @property
    def n_ctx(self) -> int:
        """A context that holds every sequence, and every prompt plus its answer."""
        longest = max([len(s) for s in self.sequences] + [len(p) for p in self.prompts] + [1])
        return longest + self.max_new_tokens + 16


@dataclass(frozen=True)
class AppAnswer:
    """One conversation through a runtime's app path."""

    prompt: list[int]
    answer: list[int]  # greedy ids before the first end-of-generation id
    ended: bool  # whether it ended on an end-of-generation id (not on the token limit)
    text: str
    error: str | None = None  # the runtime could not render or run this conversation

    def same_answer(self, other: AppAnswer) -> bool:
        return self.error is None and self.answer == other.answer and self.ended == other.ended


@dataclass(frozen=True)
class DriftReport:
    """Drift of one artifact against the float model (task_accuracy None when no task data was given)."""

    kld_mean: float
    kld_p99: float
    top1: float
    ppl_ratio: float
    task_accuracy: float | None
    prompt_ids_match: float
    answers_match: float
    n_positions: int
    n_examples: int
    prompt_diff: str | None = None  # the first conversation whose prompt ids differ, as tokens
    answer_diff: str | None = None  # the first conversation whose answer differs, as tokens

    def explain(self, violation: str) -> str:
        """A budget violation line, with the first differing token when it is about the app path."""
        if violation.startswith("prompt_ids_match") and self.prompt_diff:
            return f"{violation} ({self.prompt_diff})"
        if violation.startswith("answers_match") and self.answer_diff:
            return f"{violation} ({self.answer_diff})"
        return violation

    def metrics(self) -> dict[str, float | None]:
        keys = (
            "kld_mean",
            "kld_p99",
            "top1",
            "ppl_ratio",
            "task_accuracy",
            "prompt_ids_match",
            "answers_match",
        )
        return {k: getattr(self, k) for k in keys}


@dataclass
class ReferenceRun:
    """What the float model produced on an EvalSet, computed once and compared with every artifact."""

    runtime: Runtime  # kept open while logits are recomputed (see REFERENCE_CACHE_BYTES)
    nll: float
    task_accuracy: float | None
    answers: list[AppAnswer]
    cached: list[np.ndarray] | None = field(default=None, repr=False)

    def logits(self, i: int, ids: list[int]) -> np.ndarray:
        return self.cached[i] if self.cached is not None else self.runtime.logits(ids)


# --- the eval set --------------------------------------------------------------------------------------


def _fallback_text(n: int = 8, chars: int = 600) -> list[str]:
    """Offline English text for drift when no task data is given: Python's own docs."""
    from pydoc_data.topics import topics

    keys = sorted(topics)[:: max(1, len(topics) // n)][:n]
    return [topics[k][:chars] for k in keys]


def probe_examples() -> list[data_mod.Example]:
    """The built-in conversations as examples (answers unknown: they are compared, never scored)."""
    return [
        data_mod.Example((*msgs, {"role": "assistant", "content": "-"}), f"probe:{i + 1}")
        for i, msgs in enumerate(PROBE_CONVERSATIONS)
    ]


def _renders(tokenizer: Any, ex: data_mod.Example) -> bool:
    try:
        data_mod.prompt_ids(tokenizer, ex)
    except EdgeftError:
        return False
    return True


def make_eval_set(
    tokenizer: Any,
    examples: Sequence[data_mod.Example] | None,
    *,
    max_examples: int = 256,
    max_len: int = 256,
    source: str = "",
) -> EvalSet:
    """Ids for drift (the whole held-out conversations, or offline text) and the conversations to answer."""
    examples = list(examples or [])[:max_examples]
    if examples:
        seqs = [data_mod.train_ids(tokenizer, ex, max_len)[0] for ex in examples]
        longest = max(len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
        max_new, scored = min(256, longest + 8), True
    else:
        # the probes this template can render (some refuse a system turn: Gemma, Mistral-Instruct)
        examples = [ex for ex in probe_examples() if _renders(tokenizer, ex)]
        if not examples:
            raise EdgeftError(
                "the model's chat template cannot render any of the built-in probe conversations"
            )
        seqs = [tokenizer(t)["input_ids"][:max_len] for t in _fallback_text()]
        max_new, scored, source = 24, False, "built-in probe conversations"
    prompts = [data_mod.prompt_ids(tokenizer, ex) for ex in examples]
    return EvalSet(examples, seqs, prompts, max_new, scored, source)


# --- greedy answers ------------------------------------------------------------------------------------


def _visible_prefix(text: str) -> str:
    """Decoded text of a partial answer without a trailing incomplete UTF-8 character (shown as U+FFFD)."""
    return text.strip().rstrip("\ufffd")


def _could_match(rt: Runtime, out: list[int], ex: data_mod.Example) -> bool:
    """Whether a greedy answer that starts with `out` can still match the expected answer exactly."""
    return ex.answer.strip().startswith(_visible_prefix(rt.decode(out)))


def greedy(
    rt: Runtime, prompt: list[int], limit: int, keep_going: Callable[[list[int]], bool] | None = None
) -> list[int]:
    """Greedy ids after `prompt` until an end id or `limit`. With `keep_going`, in doubling chunks cut once
    it is false — a wrong answer (every answer of an untuned base model) costs a few tokens, not the budget."""
    if keep_going is None:
        return rt.generate(prompt, limit, rt.end_ids)
    out: list[int] = []
    chunk, ends = 4, set(rt.end_ids)
    while len(out) < limit:
        n = min(chunk, limit - len(out))
        new = rt.generate(prompt + out, n, rt.end_ids)
        out += new
        if len(new) < n or (new and new[-1] in ends) or not keep_going(out):
            break
        chunk *= 2
    return out


def app_answer(
    rt: Runtime, es: EvalSet, i: int, keep_going: Callable[[list[int]], bool] | None = None
) -> AppAnswer:
    """Conversation `i` through the runtime's own chat template, tokenizer and end ids."""
    ex = es.examples[i]
    try:
        prompt = rt.chat_prompt_ids(ex.prompt_messages)
    except EdgeftError as e:
        return AppAnswer([], [], False, "", error=str(e))
    if len(prompt) + es.max_new_tokens > es.n_ctx:
        return AppAnswer(prompt, [], False, "", error=f"prompt of {len(prompt)} tokens exceeds the context")
    out = greedy(rt, prompt, es.max_new_tokens, keep_going)
    ends = set(rt.end_ids)
    cut = next((k for k, t in enumerate(out) if t in ends), len(out))
    return AppAnswer(prompt, out[:cut], cut < len(out), rt.decode(out[:cut]))


def task_accuracy(rt: Runtime, es: EvalSet, progress: Progress | None = None) -> float | None:
    """Exact-match accuracy of greedy answers on the task (None without task data); answers cut early."""
    if not es.scored:
        return None
    hits = 0
    for i, ex in enumerate(es.examples):
        a = app_answer(rt, es, i, lambda out, ex=ex: _could_match(rt, out, ex))
        hits += a.ended and data_mod.answer_text_matches(a.text, ex)
        if progress:
            progress(i + 1, len(es.examples))
    return hits / len(es.examples)


# --- reference and comparison ------------------------------------------------------------------------------


def run_reference(rt: Runtime, es: EvalSet, progress: Progress | None = None) -> ReferenceRun:
    """Score the float model once: next-token NLL, its own app-path answers, task accuracy.

    `rt` stays in use afterwards when the logits do not fit REFERENCE_CACHE_BYTES; close it after the last
    compare().
    """
    size = sum(len(s) for s in es.sequences) * int(rt.n_vocab) * 4
    cached: list[np.ndarray] | None = [] if size <= REFERENCE_CACHE_BYTES else None
    nll = []
    for i, ids in enumerate(es.sequences):
        logits = rt.logits(ids)
        nll.append(metrics.compare_logits(logits, logits, ids).ref_nll)
        if cached is not None:
            cached.append(np.asarray(logits, dtype=np.float32))
        if progress:
            progress(i + 1, es.n_steps)
    answers, hits = [], 0
    for i, ex in enumerate(es.examples):
        a = app_answer(rt, es, i)
        if a.error:
            raise EdgeftError(f"{ex.source}: the float model cannot answer this conversation ({a.error})")
        answers.append(a)
        hits += a.ended and data_mod.answer_text_matches(a.text, ex)
        if progress:
            progress(len(es.sequences) + i + 1, es.n_steps)
    acc = hits / len(es.examples) if es.scored else None
    return ReferenceRun(rt, float(np.concatenate(nll).mean()), acc, answers, cached)


def _short_source(source: str) -> str:
    """'file.jsonl:12' for '/home/me/data/file.jsonl:12': reports and manifests never carry home paths."""
    file, sep, line = source.rpartition(":")
    return f"{Path(file).name}:{line}" if sep and line.isdigit() else source


def first_difference(label: str, ref: list[int], got: list[int], piece: Callable[[int], str]) -> str:
    """'LABEL: first difference at token K: float '▁[' (518) vs artifact '[' (29961)'."""
    k = probes.first_difference(ref, got) or 0
    return (
        f"{label}: first difference at token {k}: float {probes.show_token(ref, k, piece)} "
        f"vs artifact {probes.show_token(got, k, piece)}"
    )


@dataclass(frozen=True)
class WeightsDrift:
    """Drift on shared token ids only (the weights): cheap, one forward pass per sequence."""

    kld_mean: float
    kld_p99: float
    top1: float
    ppl_ratio: float
    n_positions: int

    def metrics(self) -> dict[str, float | None]:
        return {
            "kld_mean": self.kld_mean,
            "kld_p99": self.kld_p99,
            "top1": self.top1,
            "ppl_ratio": self.ppl_ratio,
        }


def weights_drift(
    ref: ReferenceRun, rt: Runtime, es: EvalSet, progress: Progress | None = None
) -> WeightsDrift:
    """KL divergence, top-1 agreement and perplexity ratio against the float model on the same ids."""
    if not es.examples or not es.sequences:
        raise EdgeftError("nothing to verify: the eval set has no conversations or no sequences")
    klds, agree, nll = [], [], []
    for i, ids in enumerate(es.sequences):
        ref_logits = ref.logits(i, ids)
        got = rt.logits(ids)
        if got.shape != ref_logits.shape:
            raise EdgeftError(
                f"artifact gives logits of shape {got.shape} where the float model gives {ref_logits.shape}; "
                "vocabulary sizes differ, re-export the artifact from this model"
            )
        stats = metrics.compare_logits(ref_logits, got, ids)
        klds.append(stats.kld)
        agree.append(stats.same_top1)
        nll.append(stats.test_nll)
        if progress:
            progress(i + 1, es.n_steps)
    kld = np.concatenate(klds)
    return WeightsDrift(
        kld_mean=float(kld.mean()),
        kld_p99=float(np.percentile(kld, 99)),
        top1=float(np.concatenate(agree).mean()),
        ppl_ratio=float(np.exp(np.concatenate(nll).mean() - ref.nll)),
        n_positions=int(kld.size),
    )


# stop(conversations done, prompt misses, answer misses, task misses) -> True once the artifact has failed
StopRule = Callable[[int, int, int, int], bool]


def compare(
    ref: ReferenceRun,
    rt: Runtime,
    es: EvalSet,
    progress: Progress | None = None,
    *,
    weights: WeightsDrift | None = None,
    stop: StopRule | None = None,
) -> DriftReport:
    """Drift of a runtime's model against the reference run: shared ids (unless `weights` already has
    them), then the app path. With `stop`, the app path ends as soon as the rule says the artifact failed;
    the report then covers the conversations done (`n_examples`)."""
    if weights is None:
        weights = weights_drift(ref, rt, es, progress)
    elif not es.examples:
        raise EdgeftError("nothing to verify: the eval set has no conversations or no sequences")

    # Ids are compared in the shared vocabulary; show them as the float model's tokenizer spells them.
    piece = getattr(ref.runtime, "piece", None) or (lambda i: ref.runtime.decode([i]))

    def spelled(i: int) -> str:
        return "<end of turn>" if i == _END else piece(i)

    prompt_hits = answer_hits = task_hits = 0
    prompt_diff = answer_diff = None
    done = 0
    for i, ex in enumerate(es.examples):
        want = ref.answers[i]
        full = want.answer + ([-1] if want.ended else [])

        def keep_going(out: list[int], ex: data_mod.Example = ex, full: list[int] = full) -> bool:
            return out == full[: len(out)] or (es.scored and _could_match(rt, out, ex))

        got = app_answer(rt, es, i, keep_going)
        label = f"conversation {i + 1} ({_short_source(ex.source)})"
        if got.error is not None:
            prompt_diff = prompt_diff or f"{label}: {got.error}"
            answer_diff = answer_diff or f"{label}: {got.error}"
        else:
            if got.prompt == want.prompt:
                prompt_hits += 1
            elif prompt_diff is None:
                prompt_diff = first_difference(f"{label} prompt", want.prompt, got.prompt, piece)
            if got.same_answer(want):
                answer_hits += 1
            elif answer_diff is None:
                a, b = want.answer + [_END] * want.ended, got.answer + [_END] * got.ended
                answer_diff = first_difference(f"{label} answer", a, b, spelled)
            task_hits += got.ended and data_mod.answer_text_matches(got.text, ex)
        done = i + 1
        if progress:
            progress(len(es.sequences) + done, es.n_steps)
        if stop is not None and stop(done, done - prompt_hits, done - answer_hits, done - task_hits):
            break
    return DriftReport(
        kld_mean=weights.kld_mean,
        kld_p99=weights.kld_p99,
        top1=weights.top1,
        ppl_ratio=weights.ppl_ratio,
        task_accuracy=task_hits / done if es.scored else None,
        prompt_ids_match=prompt_hits / done,
        answers_match=answer_hits / done,
        n_positions=weights.n_positions,
        n_examples=done,
        prompt_diff=prompt_diff,
        answer_diff=answer_diff,
    )


# --- the command ---------------------------------------------------------------------------------------


def eval_examples(reference: Path, data: Path | None) -> tuple[list[data_mod.Example] | None, str]:
    """The conversations to verify on, and where they came from.

    The fine-tune's own held-out split when the reference records one (edgeft finetune writes it, and merge
    carries it) and `data` is that data or absent; otherwise every example of `data`; with neither, None
    (built-in probe conversations and offline text).
    """
    record_path = Path(reference) / FINETUNE_RECORD
    record = None
    data_sha = None
    if record_path.is_file():
        try:
            full = json.loads(record_path.read_text(encoding="utf-8"))
            record, data_sha = full.get("eval_split"), full.get("data_sha256")
        except (OSError, json.JSONDecodeError, AttributeError):
            raise EdgeftError(f"{record_path}: not a readable fine-tune record") from None
    if record:
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            raise EdgeftError(f"{record_path}: eval_split record is malformed; re-run finetune")
        known = {*record["files"].values(), data_sha if isinstance(data_sha, str) else None}
        same = data is None or data_mod.dataset_sha256(Path(data)) in known
        if same:
            examples = data_mod.load_recorded_split(record, str(record_path))
            return examples, f"the fine-tune's held-out split ({len(examples)} examples)"
    if data is not None:
        examples = data_mod.load_jsonl(Path(data))
        return examples, f"every example of {data} (not the fine-tune's data)"
    return None, "built-in probe conversations"


def verify(
    reference: Path,
    artifact: Path,
    data: Path | None = None,
    *,
    threads: int | None = None,
    progress: Progress | None = None,
    allow_native_libs: bool = False,
) -> tuple[DriftReport, float | None, str]:
    """Drift of `artifact` against the float model in `reference`; also the reference's task accuracy and
    where the eval conversations came from."""
    from .loading import load_tokenizer

    examples, source = eval_examples(Path(reference), data)
    es = make_eval_set(load_tokenizer(reference), examples, source=source)
    # The artifact opens (and a hostile one is refused) before minutes go into the reference run.
    rt = open_runtime(artifact, threads=threads, n_ctx=es.n_ctx, allow_native_libs=allow_native_libs)
    try:
        ref_rt = open_runtime(reference, threads=threads)
        try:
            ref = run_reference(ref_rt, es)
            return compare(ref, rt, es, progress), ref.task_accuracy, es.source
        finally:
            ref_rt.close()
    finally:
        rt.close()
