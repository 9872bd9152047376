"""The automatic choice (edgeft.search): which candidate a budget picks, when the search stops, and the
error naming the closest candidate when none fits. Runtimes are scripted (test_verify.Scripted): each
candidate's logits are the reference's plus noise of a chosen size, so its KL divergence is known in order."""

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from test_verify import Scripted, _evalset, _example, _script

from edgeft import formats, search, stages, targets, verify
from edgeft.footprint import Footprint

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(20, 30)) * 3
NOISE = RNG.normal(size=(20, 30))
EXAMPLES = [_example(p, a) for p, a in (("turn on", "abc"), ("lights", "de"), ("dim it", "fg"), ("off", "h"))]
PROFILE = targets.TargetProfile("t", "test", "native", 2, 1000, 1000, 64, 10.0, ())


@contextmanager
def quiet(description: str, total: int | None = None):
    yield lambda *a: None


def answers_for(texts: list[str]) -> dict[tuple[int, ...], list[int]]:
    probe = Scripted(LOGITS, {})
    return {
        tuple(probe.chat_prompt_ids(ex.prompt_messages)): _script(t)
        for ex, t in zip(EXAMPLES, texts, strict=True)
    }


RIGHT = answers_for(["abc", "de", "fg", "h"])


def candidate(
    quant: str, noise: float, mb_per_token: float, budget: targets.DriftBudget, answers=RIGHT
) -> tuple[search.Candidate, Scripted]:
    spec = targets.ArtifactSpec("gguf", quant, budget)
    fp = Footprint(int(mb_per_token * 1e6), int(mb_per_token * 1e6), 0, "f16", 64)
    cand = search.Candidate(spec, spec, Path(quant), fp, int(mb_per_token * 1e6))
    return cand, Scripted(LOGITS + noise * NOISE, answers)


def run(
    cands: list[tuple[search.Candidate, Scripted]],
) -> tuple[search.Candidate | None, verify.ReferenceRun]:
    ref_rt = Scripted(LOGITS, RIGHT)
    es = _evalset(EXAMPLES, ref_rt)
    ref = verify.run_reference(ref_rt, es)
    by_path = {c.path: rt for c, rt in cands}
    winner = search.choose([c for c, _ in cands], ref, es, lambda p, m=by_path: m[p], task=quiet)
    return winner, ref


def three(kld_budget: float) -> list[tuple[search.Candidate, Scripted]]:
    """q8_0 (little noise, big), q4_k_m (more noise), q4_0 (most noise, smallest)."""
    budget = targets.DriftBudget(kld_mean=kld_budget)
    return [
        candidate("q8_0", 0.05, 8.5, budget),
        candidate("q4_k_m", 0.3, 4.8, budget),
        candidate("q4_0", 0.6, 4.5, budget),
    ]


def kld(noise: float) -> float:
    c, rt = candidate("x", noise, 1, targets.DriftBudget())
    return run([(c, rt)])[0].drift.kld_mean


def test_a_loose_budget_picks_the_smallest_a_tight_one_a_larger() -> None:
    k8, k4km, k40 = kld(0.05), kld(0.3), kld(0.6)
    assert k8 < k4km < k40
    loose, _ = run(three(k40 * 2))
    assert loose is not None and loose.spec.quant == "q4_0"
    middle, _ = run(three((k4km + k40) / 2))
    assert middle is not None and middle.spec.quant == "q4_k_m"
    tight = three((k8 + k4km) / 2)
    winner, _ = run(tight)
    assert winner is not None and winner.spec.quant == "q8_0" and winner.chosen
    # every candidate has its shared-id drift (a point on the report's plot); the losers say why
    assert all(c.weights is not None for c, _ in tight)
    assert all("fails on shared ids" in c.verdict for c, _ in tight if not c.chosen)


def test_bigger_candidates_after_the_winner_are_screened_never_judged() -> None:
    cands = three(10.0)
    winner, _ = run(cands)
    assert winner is not None and winner.spec.quant == "q4_0"
    by_quant = {c.spec.quant: (c, rt) for c, rt in cands}
    for quant in ("q8_0", "q4_k_m"):
        c, rt = by_quant[quant]
        assert c.drift is None and rt.generated == 0 and c.verdict.startswith("not judged")
        assert c.weights is not None  # a point on the report's plot all the same
    assert by_quant["q4_0"][1].generated > 0


def many(kld_budget: float, noises: dict[str, float]) -> tuple[list, verify.EvalSet, verify.ReferenceRun]:
    """Candidates judged on 40 sequences of different lengths (so their per-sequence KLDs spread)."""
    lengths = np.random.default_rng(1).integers(4, 21, size=40)
    budget = targets.DriftBudget(kld_mean=kld_budget)
    cands = [candidate(q, noise, 4.0 + i, budget) for i, (q, noise) in enumerate(noises.items())]
    ref_rt = Scripted(LOGITS, RIGHT)
    prompts = [ref_rt.chat_prompt_ids(ex.prompt_messages) for ex in EXAMPLES]
    es = verify.EvalSet(EXAMPLES, [list(range(n)) for n in lengths], prompts, 16, True, "test")
    return cands, es, verify.run_reference(ref_rt, es)


def test_a_clearly_failing_candidate_stops_early_a_borderline_one_does_not() -> None:
    probe, es, ref = many(1.0, {"q4_k_m": 0.3})
    k = verify.weights_drift(ref, probe[0][1], es).kld_mean  # q4_k_m's KLD on all 40 sequences
    cands, es, ref = many(k * 0.95, {"q4_0": 3.0, "q4_k_m": 0.3, "q8_0": 0.0})
    by_path = {c.path: rt for c, rt in cands}
    winner = search.choose([c for c, _ in cands], ref, es, lambda p, m=by_path: m[p], task=quiet)
    (far, _), (near, _), (exact, _) = cands
    assert winner is exact
    # far over budget: given up after GIVE_UP_AFTER sequences, and says so
    assert far.weights.n_sequences == search.GIVE_UP_AFTER and far.weights.of_sequences == 40
    assert f"stopped after {search.GIVE_UP_AFTER} of 40 sequences" in far.verdict
    # 5 % over budget is not beyond doubt on 16 sequences: measured on all 40, and failing
    assert near.weights.n_sequences == 40 and near.verdict.startswith("fails on shared ids")
    # a near miss cannot win, but the report says whether it keeps the task
    assert near.drift is not None and "on the app path: task accuracy 100.0%" in near.verdict
    assert far.drift is None


def test_the_early_stops_keep_the_exhaustive_choice() -> None:
    for budget in (kld(0.05) * 2, kld(0.3) * 2, kld(0.6) * 2):
        cands, es, ref = many(budget, {"q4_0": 0.6, "q4_k_m": 0.3, "q8_0": 0.05})
        by_path = {c.path: rt for c, rt in cands}
        fast = search.choose([c for c, _ in cands], ref, es, lambda p, m=by_path: m[p], task=quiet)
        cands2, es2, ref2 = many(budget, {"q4_0": 0.6, "q4_k_m": 0.3, "q8_0": 0.05})
        by_path2 = {c.path: rt for c, rt in cands2}
        full = search.choose(
            [c for c, _ in cands2], ref2, es2, lambda p, m=by_path2: m[p], task=quiet, exhaustive=True
        )
        assert fast is not None and full is not None and fast.spec.label == full.spec.label
        assert all(c.drift is not None and c.drift.n_examples == len(EXAMPLES) for c, _ in cands2)
        assert all(not c.weights.partial for c, _ in cands2)


def test_the_app_path_stops_as_soon_as_the_budget_is_lost() -> None:
    budget = targets.DriftBudget(answers_match=0.75)  # one miss of four allowed
    wrong = answers_for(["xbc", "xe", "fg", "h"])  # the first two differ: failed after two conversations
    bad, bad_rt = candidate("q4_0", 0.0, 4.5, budget, wrong)
    good, good_rt = candidate("q8_0", 0.0, 8.5, budget)
    winner, _ = run([(bad, bad_rt), (good, good_rt)])
    assert winner is good
    assert bad.drift is not None and bad.drift.n_examples == 2
    # the shares of a stopped candidate are the most it could still have reached: here 2 of 4
    assert bad.drift.answers_match == pytest.approx(0.5)
    assert "stopped after 2 of 4" in bad.verdict


def test_an_impossible_budget_names_the_closest_candidate() -> None:
    cands = three(1e-9)
    winner, ref = run(cands)
    assert winner is None
    near = search.closest([c for c, _ in cands], ref.task_accuracy)
    assert near.spec.quant == "q8_0"  # the least drift of the three


def test_the_build_fails_naming_the_closest_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    """No candidate within budget: the slot ships the closest, measured in full and marked as failing, and the
    build's failure line (stages.named) names it as the closest; --no-fail-on-drift would ship it."""
    cands = three(1e-9)
    ref_rt = Scripted(LOGITS, RIGHT)
    es = _evalset(EXAMPLES, ref_rt)
    ref = verify.run_reference(ref_rt, es)
    by_path = {c.path: rt for c, rt in cands}
    monkeypatch.setattr(stages.formats, "open_runtime", lambda p, **kw: by_path[p])
    monkeypatch.setattr(stages, "task", quiet)
    shipped = stages.choose([c for c, _ in cands], ref, es, 1)
    assert shipped.spec.quant == "q8_0" and shipped.drift is not None and shipped.drift.n_examples == 4
    assert shipped.chosen and any(v.startswith("kld_mean") for v in shipped.violations)
    line = f"{stages.named(shipped)}: {shipped.violations[0]}"
    assert line.startswith("gguf-q8_0 (the closest of 3 candidates; none meets every budget): kld_mean = ")


def test_a_size_budget_is_a_budget() -> None:
    budget = targets.DriftBudget(max_size_mb=5.0)
    big, big_rt = candidate("q8_0", 0.0, 8.5, budget)
    assert run([(big, big_rt)])[0] is None or big.violations
    assert any("max_size_mb" in v for v in big.violations)


def test_profiles_expand_their_search() -> None:
    rpi = targets.load("raspberrypi")
    gguf = next(a for a in rpi.artifacts if a.format == "gguf")
    labels = [c.label for c in search.expand(gguf, search=True)]
    assert "gguf-q4_k_m-imatrix" in labels and "gguf-q4_k_m" in labels
    assert "gguf-q8_0-imatrix" not in labels  # q8_0 ignores an importance matrix: one candidate
    assert [c.label for c in search.expand(gguf, search=False)] == [gguf.label]


def test_the_importance_matrix_sees_only_the_training_split(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Calibration hands the importance matrix the training split: no held-out conversation, every training one."""
    from edgeft import data
    from edgeft.config import BuildConfig
    from edgeft.demo import DEMO_DATA
    from edgeft.formats.gguf import imatrix

    seen: list[list[dict[str, str]]] = []

    def fake(model_dir, conversations, sources, **kw):
        seen.extend(conversations)
        return imatrix.Imatrix({}, len(conversations), 1, kw["dataset_sha256"])

    monkeypatch.setattr(imatrix, "compute_from", fake)
    cfg = BuildConfig(targets=("raspberrypi",))
    sources = stages.Calibration(tmp_path, Path(DEMO_DATA), cfg, tmp_path)
    sources.importance(formats.get("gguf"))
    train, held = data.load_split(Path(DEMO_DATA), cfg.lora.eval_fraction, cfg.lora.seed, cfg.lora.max_eval)
    as_key = [tuple(tuple(sorted(m.items())) for m in conv) for conv in seen]
    assert len(seen) == len(train) and held
    assert not {tuple(tuple(sorted(m.items())) for m in ex.messages) for ex in held} & set(as_key)
    # a later run that reuses the imatrix artifacts still records what they were made with
    again = stages.Calibration(tmp_path, Path(DEMO_DATA), cfg, tmp_path)
    assert again.record() == {
        "dataset_sha256": data.dataset_sha256(Path(DEMO_DATA)),
        "examples": len(train),
        "tokens": 1,
    }
