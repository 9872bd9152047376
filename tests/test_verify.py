"""Drift metrics: zero against itself, positive and ordered as logits are perturbed."""

from collections.abc import Sequence

import numpy as np

from edgeft import verify


class FakeRuntime:
    """Fixed random logits per position plus optional noise: a runtime with known drift."""

    def __init__(self, noise: float, vocab: int = 50, seed: int = 1) -> None:
        self.noise, self.vocab = noise, vocab
        self.rng = np.random.default_rng(seed)
        self.base = np.random.default_rng(0).normal(size=(64, vocab)) * 3

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        x = self.base[: len(ids)]
        return (x + self.noise * self.rng.normal(size=x.shape)).astype(np.float32)

    def generate(self, ids, n, stop_ids=()):
        return []

    def close(self) -> None:
        pass


def _evalset() -> verify.EvalSet:
    seqs = [list(range(i, i + 40)) for i in range(3)]
    return verify.EvalSet(seqs, [], [], [], None)


def test_identical_runtime_has_no_drift() -> None:
    es = _evalset()
    ref = verify.run_reference(FakeRuntime(0.0), es)
    rep = verify.compare(ref, FakeRuntime(0.0), es)
    assert rep.kld_mean < 1e-9 and rep.top1 == 1.0 and abs(rep.ppl_ratio - 1) < 1e-6
    assert rep.n_positions == 120 and rep.task_accuracy is None


def test_drift_grows_with_noise() -> None:
    es = _evalset()
    ref = verify.run_reference(FakeRuntime(0.0), es)
    small = verify.compare(ref, FakeRuntime(0.1), es)
    large = verify.compare(ref, FakeRuntime(1.0), es)
    assert 0 < small.kld_mean < large.kld_mean
    assert small.kld_p99 >= small.kld_mean
    assert large.top1 < 1.0
