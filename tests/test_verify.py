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


class ScriptedRuntime:
    """Emits a fixed token script (ignoring the prompt beyond its length) and counts generated tokens."""

    def __init__(self, script: list[int], prompt_len: int) -> None:
        self.script, self.prompt_len, self.generated = script, prompt_len, 0

    def generate(self, ids, n, stop_ids=()):
        pos = len(ids) - self.prompt_len
        out = []
        for tok in self.script[pos : pos + n]:
            out.append(tok)
            self.generated += 1
            if tok in stop_ids:
                break
        return out


class CharTokenizer:
    """Token id = character code; 0 is the stop token."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


def test_greedy_answer_stops_when_it_cannot_match() -> None:
    from edgeft.data import Example

    ex = Example(({"role": "user", "content": "q"}, {"role": "assistant", "content": "abcdefghij"}), "t:1")
    es = verify.EvalSet([], [ex], [[1, 2]], [0], CharTokenizer(), max_new_tokens=40)
    right = ScriptedRuntime([ord(c) for c in "abcdefghij"] + [0], prompt_len=2)
    out = verify.greedy_answer(right, [1, 2], ex, es)
    assert CharTokenizer().decode(out) == "abcdefghij" and out[-1] == 0
    wrong = ScriptedRuntime([ord(c) for c in "xyz" * 13], prompt_len=2)
    out = verify.greedy_answer(wrong, [1, 2], ex, es)
    assert wrong.generated == 4  # one chunk: cut as soon as it diverged, not 40 tokens
