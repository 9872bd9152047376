"""Choose, per artifact slot of a target, the candidate that decodes fastest on the device within budget.

A slot with a `search` list (targets/*.toml) competes several concrete artifacts: quants, with and
without the importance matrix of the fine-tuning data, with the output head kept at a higher type. Decode
of an on-device model is memory-bound (llama.cpp reads every weight once per token; see the roofline notes
in docs/benchmarks.md "Speed, size and drift"), so "fastest on the device" is "fewest bytes read per decoded token",
measured from each exported artifact's own tensors. Every candidate is judged against one stored float
reference (edgeft.reference), fewest bytes per token first, and the work stops where it can:

1. on shared token ids (KL divergence, top-1, perplexity: one forward pass per held-out sequence); a
   candidate stops early once it is over a budget beyond doubt (`clearly_failing`);
2. then on the app path (its own template, tokenizer and greedy answers), which stops as soon as the misses
   exceed what a budget allows (`stop_rule`); candidates that read as many bytes go in order of KLD;
3. the first that meets every budget wins; the candidates that read more bytes per token could only be
   slower, so they are screened on a few sequences for the report and never judged in full.

With `exhaustive=True` every candidate is measured in full and the same rule picks: the check that the
early stops keep the choice (bench/search_speed.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft import formats, verify
from edgeft.constants import BUDGET_KINDS
from edgeft.errors import EdgeftError
from edgeft.footprint import Footprint
from edgeft.runtime import Runtime
from edgeft.targets import ArtifactSpec, DriftBudget, TargetProfile


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
    note: str = (
        ""  # why its drift is out of line with its size, where edgeft can see it (explain_out_of_line)
    )

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
            "sequences_checked": self.weights.n_sequences if self.weights is not None else None,
            "near_ties": self.drift.near_ties if self.drift is not None else None,
            "latency": latency,
            "fits_ram": self.footprint.need_bytes <= target.ram_budget_mb * 1e6,
            "violations": list(self.violations),
            "verdict": self.verdict,
            "note": self.note or None,
            "steered": _steered(self.path),
            "chosen": self.chosen,
        }


def _steered(path: Path) -> str | None:
    """What edgeft steered in a candidate (tensors written in another type than the quantizer chose), if
    anything."""
    try:
        return formats.tensor_types(path).steered
    except (EdgeftError, OSError):
        return None


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


# Shared-id screening (step 1): a candidate gives up once, after at least GIVE_UP_AFTER sequences, its KLD
# is over budget by more than GIVE_UP_Z standard errors (or its top-1 under budget by as much): a clear
# failure, which the sequences left could not undo. A dominated candidate (more bytes per token than the
# winner) is scored on its first SCREEN sequences only: a point on the report's plot, not a judgement.
GIVE_UP_AFTER = 16
GIVE_UP_Z = 3.0
SCREEN = 8


def clearly_failing(budget: DriftBudget) -> verify.GiveUp:
    """A rule for weights_drift: True once the drift so far is over the budget beyond doubt."""

    def give_up(d: verify.WeightsDrift) -> bool:
        if d.n_sequences < GIVE_UP_AFTER:
            return False
        kld = budget.kld_mean is not None and d.kld_mean - GIVE_UP_Z * d.kld_se > budget.kld_mean
        top1 = budget.top1 is not None and d.top1 + GIVE_UP_Z * d.top1_se < budget.top1
        return kld or top1

    return give_up


class Measurements:
    """Drift measured in full, by artifact file: a candidate several targets consider (the same file, judged on
    the same eval set against the same reference) is measured once. A measurement stopped early depends on a
    budget, so only whole ones are kept."""

    def __init__(self) -> None:
        self._weights: dict[Path, verify.WeightsDrift] = {}
        self._drift: dict[Path, verify.DriftReport] = {}
        self.reused = 0  # how many measurements were taken from here instead of run again

    def weights(self, path: Path) -> verify.WeightsDrift | None:
        found = self._weights.get(Path(path))
        self.reused += found is not None
        return found

    def keep_weights(self, path: Path, d: verify.WeightsDrift) -> verify.WeightsDrift:
        if not d.partial:
            self._weights[Path(path)] = d
        return d

    def drift(self, path: Path) -> verify.DriftReport | None:
        found = self._drift.get(Path(path))
        self.reused += found is not None
        return found

    def keep_drift(self, path: Path, d: verify.DriftReport, *, whole: bool = True) -> verify.DriftReport:
        if whole:
            self._drift[Path(path)] = d
        return d


def choose(
    cands: list[Candidate],
    ref: verify.ReferenceRun,
    es: verify.EvalSet,
    open_rt: Opener,
    *,
    task: Callable[[str, int], Any],
    exhaustive: bool = False,
    measured: Measurements | None = None,
) -> Candidate | None:
    """Judge a slot's candidates (see the module docstring); marks and returns the winner, or None when no
    candidate meets every budget. A slot with one candidate (no search) is measured in full and chosen
    whatever its drift: the build's --fail-on-drift decides about it, as for any fixed artifact.

    `exhaustive` measures every candidate in full (shared ids and app path, no early stops) and then picks
    by the same rule: the way to check that the early stops change no choice (bench/search_speed.py)."""
    ref_acc = ref.task_accuracy
    n = len(es.examples)
    memo = measured if measured is not None else Measurements()
    if len(cands) == 1:
        c = cands[0]
        c.drift = memo.drift(c.path)
        if c.drift is None:
            with opened(open_rt, c.path) as rt, task(f"verify {c.spec.label}", es.n_steps) as update:
                c.drift = memo.keep_drift(c.path, verify.compare(ref, rt, es, update))
        c.violations = tuple(c.drift.explain(v) for v in _violations(c, ref_acc))
        c.chosen, c.verdict = True, "the slot's only artifact (no search)"
        return c

    fitting = [c for c in cands if not c.verdict]  # the others cannot fit the device's RAM
    by_bytes: dict[int, list[Candidate]] = {}
    for c in fitting:
        by_bytes.setdefault(c.footprint.decode_bytes_per_token, []).append(c)
    winner = None
    for bpt in sorted(by_bytes):
        group = by_bytes[bpt]
        if winner is not None and not exhaustive:
            for c in group:
                _screen(c, winner, ref, es, open_rt, task, memo)
            continue
        alive = []
        for c in group:
            give_up = None if exhaustive else clearly_failing(c.spec.budget)
            c.weights = memo.weights(c.path)
            if c.weights is None:
                with (
                    opened(open_rt, c.path) as rt,
                    task(f"drift {c.spec.label}", len(es.sequences)) as update,
                ):
                    c.weights = memo.keep_weights(
                        c.path, verify.weights_drift(ref, rt, es, update, give_up=give_up)
                    )
            c.violations = tuple(_violations(c, ref_acc))
            if c.violations:
                c.verdict = "fails on shared ids: " + "; ".join(c.violations)
                if c.weights.partial:
                    c.verdict += (
                        f" (stopped after {c.weights.n_sequences} of {c.weights.of_sequences} sequences: "
                        f"over budget by more than {GIVE_UP_Z:g} standard errors)"
                    )
                    if not exhaustive:
                        continue
                # a near miss (measured in full, not beyond doubt): it cannot win, but whether it keeps the
                # task is worth knowing, so it goes down the app path for the record
            alive.append(c)
        for c in sorted(alive, key=lambda c: (bool(c.violations), c.weights.kld_mean)):  # type: ignore[union-attr]
            if winner is not None and not exhaustive:
                c.verdict = c.verdict or (
                    f"not verified on the app path: as many bytes per token as {winner.spec.label}, more drift"
                )
                continue
            rule = None if exhaustive else stop_rule(c.spec.budget, n, ref_acc, scored=es.scored)
            d = memo.drift(c.path)
            if d is None:
                with opened(open_rt, c.path) as rt, task(f"verify {c.spec.label}", es.n_steps) as update:
                    d = verify.compare(ref, rt, es, update, weights=c.weights, stop=rule)
                memo.keep_drift(c.path, d, whole=d.n_examples == n and not c.weights.partial)  # type: ignore[union-attr]
            stopped = d.n_examples < n
            c.drift = _upper_bounds(d, n) if stopped else d
            c.violations = tuple(c.drift.explain(v) for v in _violations(c, ref_acc))
            if c.violations:
                if c.verdict:  # a near miss on shared ids: what it did with the task
                    acc = c.drift.task_accuracy
                    c.verdict += (
                        f"; on the app path{' (upper bounds)' if stopped else ''}: task accuracy "
                        f"{'—' if acc is None else f'{acc:.1%}'}, answers match {c.drift.answers_match:.1%}"
                    )
                    continue
                c.verdict = "fails on the app path: " + "; ".join(c.violations)
                if stopped:
                    c.verdict += (
                        f" (stopped after {d.n_examples} of {n} conversations; shares are upper bounds)"
                    )
                continue
            if winner is None:
                winner = c
    explain_out_of_line(fitting)
    if winner is not None:
        winner.chosen = True
        winner.verdict = (
            f"chosen: the fewest bytes read per decoded token ({winner.footprint.decode_bytes_per_token / 1e6:.2f} "
            "MB) among the candidates that meet every budget"
        )
        if exhaustive:
            for c in fitting:
                if c is not winner and not c.verdict:
                    c.verdict = f"meets every budget; reads more bytes per token than {winner.spec.label}"
    return winner


# A candidate is out of line when its KLD is more than OUT_OF_LINE times that of a candidate reading fewer
# bytes per token (more bits should drift less), and at least OUT_OF_LINE_FLOOR (below it, noise).
OUT_OF_LINE = 2.0
OUT_OF_LINE_FLOOR = 0.01


def explain_out_of_line(cands: list[Candidate]) -> None:
    """Give each out-of-line candidate a note naming what edgeft can see: the tensor types it actually wrote
    (GGUF K-quants fall back to other types for rows that are not whole 256-blocks) and the types it holds
    that the smaller, better-behaved candidate does not."""
    measured = [c for c in cands if c.metrics().get("kld_mean") is not None]
    for c in measured:
        kld = float(c.metrics()["kld_mean"])  # type: ignore[arg-type]
        better = [
            d
            for d in measured
            if d.footprint.decode_bytes_per_token < c.footprint.decode_bytes_per_token
            and float(d.metrics()["kld_mean"]) * OUT_OF_LINE < kld  # type: ignore[arg-type]
        ]
        if kld < OUT_OF_LINE_FLOOR or not better:
            continue
        d = min(better, key=lambda x: float(x.metrics()["kld_mean"]))  # type: ignore[arg-type]
        try:
            mine, theirs = formats.tensor_types(c.path), formats.tensor_types(d.path)
        except (EdgeftError, OSError):
            continue
        odd = [t for t in mine.matrices if t not in theirs.matrices]
        written = ", ".join(f"{t} ×{n}" for t, n in sorted(mine.matrices.items(), key=lambda kv: -kv[1]))
        c.note = (
            f"out of line: KLD {kld:.3g}, {kld / float(d.metrics()['kld_mean']):.0f}× that of {d.spec.label} "  # type: ignore[arg-type]
            f"which reads fewer bytes per token; it wrote {written} (weight matrices)"
        )
        if odd:
            share = sum(mine.shares.get(t, 0.0) for t in odd)
            c.note += (
                f"; {', '.join(odd)} ({share:.0%} of its weight bytes) {'is' if len(odd) == 1 else 'are'} the "
                f"type{'s' if len(odd) > 1 else ''} {d.spec.label} does not use: the likely cause"
            )


def _screen(
    c: Candidate,
    winner: Candidate,
    ref: verify.ReferenceRun,
    es: verify.EvalSet,
    open_rt: Opener,
    task: Callable[[str, int], Any],
    memo: Measurements,
) -> None:
    """A dominated candidate: drift on its first SCREEN sequences (or all of them, when another target had
    them measured already), for the report; never judged."""
    c.weights = memo.weights(c.path)
    if c.weights is None:
        with (
            opened(open_rt, c.path) as rt,
            task(f"screen {c.spec.label}", min(SCREEN, len(es.sequences))) as update,
        ):
            c.weights = verify.weights_drift(ref, rt, es, update, limit=SCREEN)
    mine, best = c.footprint.decode_bytes_per_token / 1e6, winner.footprint.decode_bytes_per_token / 1e6
    c.verdict = (
        f"not judged: reads {mine:.2f} MB per token, more than {winner.spec.label} ({best:.2f} MB); drift from "
        f"its first {c.weights.n_sequences} of {c.weights.of_sequences} sequences"
    )


def _violations(c: Candidate, reference_accuracy: float | None) -> list[str]:
    return c.spec.budget.violations(c.metrics(), reference_accuracy, c.size_mb)
