"""Choose, per artifact slot of a target, the candidate that decodes fastest on the device within budget.

A slot with a `search` list (targets/*.toml) competes several concrete artifacts: quants, with and
without the importance matrix of the fine-tuning data, with the output head kept at a higher type. Decode
of an on-device model is memory-bound (../shared/REFERENCE.md "Edge devices"), so "fastest on the device"
is "fewest bytes read per decoded token", measured from each exported artifact's own tensors. The order
of work keeps the search cheap:

1. every candidate is judged on shared token ids against the one reference run (KL divergence, top-1,
   perplexity: one forward pass per held-out sequence), which gives every candidate its point on the
   report's size/drift plot, and drops those already over a budget;
2. the rest, fewest bytes per token first (then lowest KLD), go down the app path (their own template,
   tokenizer and greedy answers), which stops as soon as the misses exceed what a budget allows;
3. the first that meets every budget wins; a later one could only read more bytes per token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import verify
from .constants import BUDGET_KINDS
from .footprint import Footprint
from .runtime import Runtime
from .targets import ArtifactSpec, DriftBudget, TargetProfile


@dataclass
class Candidate:
    """One concrete artifact competing for a slot, and what is known about it so far."""

    spec: ArtifactSpec
    slot: ArtifactSpec
    path: Path
    footprint: Footprint
    size_bytes: int
    weights: verify.WeightsDrift | None = None
    drift: verify.DriftReport | None = None
    violations: tuple[str, ...] = ()
    verdict: str = ""
    chosen: bool = False

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1e6

    def metrics(self) -> dict[str, float | None]:
        """What has been measured: the full drift, or the shared-id part alone."""
        if self.drift is not None:
            return self.drift.metrics()
        return self.weights.metrics() if self.weights is not None else {}

    def record(self, target: TargetProfile, latency: dict[str, Any] | None = None) -> dict[str, Any]:
        """The manifest's `candidates` entry (values never measured are null)."""
        keys = ("kld_mean", "kld_p99", "top1", "ppl_ratio", "task_accuracy", "prompt_ids_match")
        measured = self.metrics()
        bpt = self.footprint.decode_bytes_per_token
        return {
            "label": self.spec.label,
            "slot": self.slot.slot,
            "format": self.spec.format,
            "quant": self.spec.quant,
            "options": {
                "imatrix": self.spec.imatrix,
                "head_type": self.spec.head_type,
                "accuracy_level": self.spec.accuracy_level,
            },
            "bytes": self.size_bytes,
            "decode_bytes_per_token": bpt,
            "est_decode_tok_s": round(target.bandwidth_gb_s * 1e9 / bpt, 3) if bpt else None,
            "drift": {k: measured.get(k) for k in (*keys, "answers_match")},
            "conversations_checked": self.drift.n_examples if self.drift is not None else 0,
            "latency": latency,
            "fits_ram": self.footprint.need_bytes <= target.ram_budget_mb * 1e6,
            "violations": list(self.violations),
            "verdict": self.verdict,
            "chosen": self.chosen,
        }


def expand(slot: ArtifactSpec, *, search: bool) -> list[ArtifactSpec]:
    """The concrete artifacts a slot builds: its search list, or itself alone."""
    return list(slot.search) if search and slot.search else [dataclasses.replace(slot, search=())]


def min_accuracy(budget: DriftBudget, reference_accuracy: float | None) -> float | None:
    """The lowest task accuracy the budget accepts (absolute floor and allowed drop, whichever is higher)."""
    floors = [budget.min_task_accuracy]
    if budget.task_accuracy_drop is not None and reference_accuracy is not None:
        floors.append(reference_accuracy - budget.task_accuracy_drop)
    known = [f for f in floors if f is not None]
    return max(known) if known else None


def stop_rule(
    budget: DriftBudget, n: int, reference_accuracy: float | None, *, scored: bool = True
) -> verify.StopRule:
    """A rule that says "failed" once more of the `n` conversations missed than a budget allows (task
    accuracy counts only when the conversations are task data: `scored`)."""

    def allowed(share: float | None) -> float:
        return math.inf if share is None else n - math.ceil(share * n - 1e-9)

    prompt, answers = allowed(budget.prompt_ids_match), allowed(budget.answers_match)
    task = allowed(min_accuracy(budget, reference_accuracy)) if scored else math.inf

    def stop(done: int, prompt_misses: int, answer_misses: int, task_misses: int) -> bool:
        return prompt_misses > prompt or answer_misses > answers or task_misses > task

    return stop


def _upper_bounds(d: verify.DriftReport, n: int) -> verify.DriftReport:
    """A report stopped after d.n_examples of n conversations, its shares raised to the most the rest could
    reach: the failure it proves holds whatever the remaining conversations would have done."""
    rest = n - d.n_examples

    def best(share: float | None) -> float | None:
        return None if share is None else (share * d.n_examples + rest) / n

    return dataclasses.replace(
        d,
        task_accuracy=best(d.task_accuracy),
        prompt_ids_match=best(d.prompt_ids_match) or 0.0,
        answers_match=best(d.answers_match) or 0.0,
    )


def _excess(c: Candidate, reference_accuracy: float | None) -> float:
    """How far a candidate is from its budget: the worst ratio of value to limit over the budgeted metrics
    (1 = on the limit); for "closest candidate" when none passes."""
    values = dict(c.metrics())
    values["min_task_accuracy"] = values.get("task_accuracy")
    acc = values.get("task_accuracy")
    values["task_accuracy_drop"] = (
        None if acc is None or reference_accuracy is None else reference_accuracy - acc
    )
    values["max_size_mb"] = c.size_mb
    worst = 0.0
    for name, kind in BUDGET_KINDS.items():
        limit, value = getattr(c.spec.budget, name, None), values.get(name)
        if limit is None or value is None:
            continue
        if kind == "max":
            ratio = (value + 1e-12) / (limit + 1e-12)
        else:
            ratio = (1 - value + 1e-12) / (1 - limit + 1e-12)  # misses against allowed misses
        worst = max(worst, ratio)
    return worst


def closest(cands: list[Candidate], reference_accuracy: float | None) -> Candidate:
    """The candidate nearest to meeting its budget: the smallest worst excess over a limit."""
    return min(cands, key=lambda c: _excess(c, reference_accuracy))


Opener = Callable[[Path], Runtime]


@contextmanager
def opened(open_rt: Opener, path: Path) -> Iterator[Runtime]:
    """An artifact's runtime, closed when the block ends: one model besides the reference at a time."""
    rt = open_rt(path)
    try:
        yield rt
    finally:
        rt.close()


def choose(
    cands: list[Candidate],
    ref: verify.ReferenceRun,
    es: verify.EvalSet,
    open_rt: Opener,
    *,
    task: Callable[[str, int], Any],
) -> Candidate | None:
    """Judge a slot's candidates (see the module docstring); marks and returns the winner, or None when no
    candidate meets every budget. A slot with one candidate (no search) is measured in full and chosen
    whatever its drift: the build's --fail-on-drift decides about it, as for any fixed artifact."""
    ref_acc = ref.task_accuracy
    n = len(es.examples)
    if len(cands) == 1:
        c = cands[0]
        with opened(open_rt, c.path) as rt, task(f"verify {c.spec.label}", es.n_steps) as update:
            c.drift = verify.compare(ref, rt, es, update)
        c.violations = tuple(c.drift.explain(v) for v in _violations(c, ref_acc))
        c.chosen, c.verdict = True, "the slot's only artifact (no search)"
        return c

    alive = []
    for c in cands:
        if c.verdict:  # decided before verify (it cannot fit the device's RAM)
            continue
        with opened(open_rt, c.path) as rt, task(f"drift {c.spec.label}", len(es.sequences)) as update:
            c.weights = verify.weights_drift(ref, rt, es, update)
        c.violations = tuple(_violations(c, ref_acc))
        if c.violations:
            c.verdict = "fails on shared ids: " + "; ".join(c.violations)
        else:
            alive.append(c)

    winner = None
    for c in sorted(alive, key=lambda c: (c.footprint.decode_bytes_per_token, c.weights.kld_mean)):
        if winner is not None:
            mine, best = (
                c.footprint.decode_bytes_per_token / 1e6,
                winner.footprint.decode_bytes_per_token / 1e6,
            )
            c.verdict = "not verified on the app path: " + (
                f"reads {mine:.2f} MB per token, more than {winner.spec.label} ({best:.2f} MB)"
                if c.footprint.decode_bytes_per_token > winner.footprint.decode_bytes_per_token
                else f"reads as many bytes per token as {winner.spec.label} with more drift on shared ids"
            )
            continue
        rule = stop_rule(c.spec.budget, n, ref_acc, scored=es.scored)
        with opened(open_rt, c.path) as rt, task(f"verify {c.spec.label}", es.n_steps) as update:
            d = verify.compare(ref, rt, es, update, weights=c.weights, stop=rule)
        stopped = d.n_examples < n
        c.drift = _upper_bounds(d, n) if stopped else d
        c.violations = tuple(c.drift.explain(v) for v in _violations(c, ref_acc))
        if c.violations:
            c.verdict = "fails on the app path: " + "; ".join(c.violations)
            if stopped:
                c.verdict += f" (stopped after {d.n_examples} of {n} conversations; shares are upper bounds)"
            continue
        winner = c
        c.chosen = True
        c.verdict = (
            f"chosen: the fewest bytes read per decoded token ({c.footprint.decode_bytes_per_token / 1e6:.2f} MB) "
            "among the candidates that meet every budget"
        )
    return winner


def _violations(c: Candidate, reference_accuracy: float | None) -> list[str]:
    return c.spec.budget.violations(c.metrics(), reference_accuracy, c.size_mb)
