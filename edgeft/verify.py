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

An answer that parts from the float model's at a near-tie still matches: where the float model itself
hardly preferred its token over the artifact's (its log-probability margin below `near_tie`, NEAR_TIE by
default), greedy decoding of prose parts ways on noise, not on a fault. Only there: a different prompt, an
answer that starts with a token the float model did not consider (a space after a special token), or a
missing end-of-turn id where the float model was sure still fail from the first token.

The float model runs once per eval set (edgeft.reference); every artifact is compared with what it stored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeft import data as data_mod
from edgeft import metrics, probes
from edgeft.constants import FINETUNE_RECORD
from edgeft.errors import EdgeftError
from edgeft.evalset import (  # noqa: F401 - the eval set's names, as verify's callers know them
    AppAnswer,
    EvalSet,
    app_answer,
    could_match,
    greedy,
    make_eval_set,
    probe_examples,
    task_accuracy,
    vet_app_path,
)
from edgeft.files import cache_root
from edgeft.formats import open_runtime
from edgeft.reference import KEEP_CACHED, Choices, ReferenceRun, run_reference, stored_reference  # noqa: F401 - as above
from edgeft.runtime import Runtime
from edgeft.ui import Progress

_END = -2  # marks "the answer ended here" in difference reports
# The default near-tie margin in nats: a flip where the float model's log-probabilities of its token and the
# artifact's differ by less than this does not count against answers_match (see near_tie_margin).
NEAR_TIE = 0.4


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
    near_ties: int = 0  # answers that parted from the float model's at a near-tie (counted as matching)
    near_tie_diff: str | None = None  # the first of them, as tokens, with the float model's margin
    # the float model's margin (nats) where each parted answer parted; None: not among its alternatives
    flip_margins: tuple[float | None, ...] = ()

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
    """Drift on shared token ids only (the weights): cheap, one forward pass per sequence. When scoring
    stopped early (`n_sequences` < `of_sequences`), the values are those of the sequences scored."""

    kld_mean: float
    kld_p99: float
    top1: float
    ppl_ratio: float
    n_positions: int
    n_sequences: int = 0
    of_sequences: int = 0
    kld_se: float = 0.0  # standard error of kld_mean over the sequences scored
    top1_se: float = 0.0

    @property
    def partial(self) -> bool:
        return self.n_sequences < self.of_sequences

    def metrics(self) -> dict[str, float | None]:
        return {
            "kld_mean": self.kld_mean,
            "kld_p99": self.kld_p99,
            "top1": self.top1,
            "ppl_ratio": self.ppl_ratio,
        }


# give_up(drift so far) -> True once the artifact has clearly failed (edgeft.search)
GiveUp = Callable[[WeightsDrift], bool]


def weights_drift(
    ref: ReferenceRun,
    rt: Runtime,
    es: EvalSet,
    progress: Progress | None = None,
    *,
    limit: int | None = None,
    give_up: GiveUp | None = None,
) -> WeightsDrift:
    """KL divergence, top-1 agreement and perplexity ratio against the float model on the same ids: over
    the first `limit` sequences (all by default), or until `give_up` says the artifact clearly failed."""
    if not es.examples or not es.sequences:
        raise EdgeftError("nothing to verify: the eval set has no conversations or no sequences")
    klds, agree, nll, ref_nll = [], [], [], []
    seqs = es.sequences[:limit] if limit else es.sequences
    drift = None
    for i, ids in enumerate(seqs):
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
        ref_nll.append(stats.ref_nll)
        if progress:
            progress(i + 1, es.n_steps)
        if give_up is not None and i + 1 < len(seqs):
            drift = _weights(klds, agree, nll, ref_nll, len(es.sequences))
            if give_up(drift):
                return drift
    return _weights(klds, agree, nll, ref_nll, len(es.sequences))


def _weights(klds: list, agree: list, nll: list, ref_nll: list, of: int) -> WeightsDrift:
    kld = np.concatenate(klds)
    per_kld = np.array([k.mean() for k in klds])
    per_top1 = np.array([a.mean() for a in agree])
    n = len(klds)
    return WeightsDrift(
        kld_mean=float(kld.mean()),
        kld_p99=float(np.percentile(kld, 99)),
        top1=float(np.concatenate(agree).mean()),
        ppl_ratio=float(np.exp(np.concatenate(nll).mean() - np.concatenate(ref_nll).mean())),
        n_positions=int(kld.size),
        n_sequences=n,
        of_sequences=of,
        kld_se=float(per_kld.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf,
        top1_se=float(per_top1.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf,
    )


def near_tie_margin(choices: Choices, want: AppAnswer, got: AppAnswer) -> float | None:
    """At the first id where the artifact's answer parts from the float model's, how much more likely the
    float model found its own id than the artifact's (log-probability difference, in nats); None when the
    answers do not part, or the artifact's id was not among the float model's top alternatives there."""
    a = want.answer + [_END] * want.ended
    b = got.answer + [_END] * got.ended
    k = probes.first_difference(a, b)
    if k is None or k >= len(b) or k >= len(choices):
        return None
    ids, lps = choices[k]
    mine = got.end_id if b[k] == _END else b[k]
    if mine is None or mine not in ids:
        return None
    return lps[0] - lps[ids.index(mine)]


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
    near_tie: float = NEAR_TIE,
) -> DriftReport:
    """Drift of a runtime's model against the reference run: shared ids (unless `weights` already has
    them), then the app path. With `stop`, the app path ends as soon as the rule says the artifact failed;
    the report then covers the conversations done (`n_examples`). An answer that parts from the float
    model's where its margin was below `near_tie` nats counts as matching (near_tie_margin)."""
    if weights is None:
        weights = weights_drift(ref, rt, es, progress)
    elif not es.examples:
        raise EdgeftError("nothing to verify: the eval set has no conversations or no sequences")

    # Ids are compared in the shared vocabulary; show them as the float model's tokenizer spells them.
    piece = ref.piece

    def spelled(i: int) -> str:
        return "<end of turn>" if i == _END else piece(i)

    vet_app_path(rt, es)  # its own template renders every conversation within bounds first
    prompt_hits = answer_hits = task_hits = near_ties = 0
    prompt_diff = answer_diff = near_tie_diff = None
    margins: list[float | None] = []
    done = 0
    for i, ex in enumerate(es.examples):
        want = ref.answers[i]
        full = want.answer + ([-1] if want.ended else [])

        def keep_going(out: list[int], ex: data_mod.Example = ex, full: list[int] = full) -> bool:
            return out == full[: len(out)] or (es.scored and could_match(rt, out, ex))

        got = app_answer(rt, es, i, keep_going)
        label = f"conversation {i + 1} ({_short_source(ex.source)})"
        if got.error is not None:
            prompt_diff = prompt_diff or f"{label}: {got.error}"
            answer_diff = answer_diff or f"{label}: {got.error}"
        else:
            same_prompt = got.prompt == want.prompt
            if same_prompt:
                prompt_hits += 1
            elif prompt_diff is None:
                prompt_diff = first_difference(f"{label} prompt", want.prompt, got.prompt, piece)
            a, b = want.answer + [_END] * want.ended, got.answer + [_END] * got.ended
            margin = near_tie_margin(ref.choices[i], want, got) if same_prompt else None
            if not got.same_answer(want):
                margins.append(None if margin is None else round(margin, 4))
            if got.same_answer(want):
                answer_hits += 1
            elif margin is not None and margin < near_tie:
                answer_hits += 1
                near_ties += 1
                if near_tie_diff is None:
                    near_tie_diff = (
                        first_difference(f"{label} answer", a, b, spelled)
                        + f" (float margin {margin:.3f} nats < {near_tie:g})"
                    )
            elif answer_diff is None:
                answer_diff = first_difference(f"{label} answer", a, b, spelled)
                if margin is not None:
                    answer_diff += f" (float margin {margin:.2f} nats)"
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
        near_ties=near_ties,
        near_tie_diff=near_tie_diff,
        flip_margins=tuple(margins),
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
    task: Callable[..., Any],
    allow_native_libs: bool = False,
) -> tuple[DriftReport, float | None, str]:
    """Drift of `artifact` against the float model in `reference`; also the reference's task accuracy and
    where the eval conversations came from. The float model's run is kept in edgeft's cache
    (edgeft.reference, the newest few): verifying another artifact against the same model and data reuses
    it. `task(description, total)` shows each long step's progress."""
    from edgeft.loading import load_tokenizer

    examples, source = eval_examples(Path(reference), data)
    es = make_eval_set(load_tokenizer(reference), examples, source=source)
    # The artifact opens (and a hostile one is refused) before minutes go into the reference run; it is closed
    # while the float model runs, so the two never share the memory.
    open_runtime(artifact, threads=threads, n_ctx=es.n_ctx, allow_native_libs=allow_native_libs).close()
    ref, _ = stored_reference(
        Path(reference), es, cache_root() / "references", threads=threads, progress=task, keep=KEEP_CACHED
    )
    rt = open_runtime(artifact, threads=threads, n_ctx=es.n_ctx, allow_native_libs=allow_native_libs)
    try:
        with task(f"verify {Path(artifact).name}", es.n_steps) as update:
            return compare(ref, rt, es, update), ref.task_accuracy, es.source
    finally:
        rt.close()
