"""The judge: drift metrics on hand-computed cases, and the app-path comparison on scripted runtimes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from edgeft import metrics, verify
from edgeft.data import Example

# --- metrics, against numbers worked out by hand -----------------------------------------------------------


def test_kld_is_reference_to_test_direction() -> None:
    """KL(p‖q) with p = (0.5, 0.5), q = (0.9, 0.1): 0.5·ln(0.5/0.9) + 0.5·ln(0.5/0.1) = 0.51083; the other
    direction would be 0.9·ln(1.8) + 0.1·ln(0.2) = 0.36806."""
    ref = np.log([[0.5, 0.5]])
    test = np.log([[0.9, 0.1]])
    stats = metrics.compare_logits(ref, test, [0])
    assert stats.kld[0] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5.0), abs=1e-12)
    assert stats.kld[0] == pytest.approx(0.510826, abs=1e-6)
    assert metrics.compare_logits(test, ref, [0]).kld[0] == pytest.approx(0.368064, abs=1e-6)


def test_logits_are_shift_invariant_and_top1_counts_argmax() -> None:
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    test = ref + 100.0  # same distributions
    stats = metrics.compare_logits(ref, test, [0, 1])
    assert np.all(np.abs(stats.kld) < 1e-12)
    test2 = np.array([[1.0, 3.5, 3.0], [3.0, 2.0, 1.0]])  # first row's argmax moves to index 1
    assert metrics.compare_logits(ref, test2, [0, 1]).same_top1.tolist() == [False, True]


def test_next_token_nll_scores_the_following_token() -> None:
    """Row t predicts ids[t+1]: with ids (0, 2, 1), NLL = (−ln p0[2], −ln p1[1]); the last row scores nothing."""
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    stats = metrics.compare_logits(np.log(probs), np.log(probs), [0, 2, 1])
    assert stats.ref_nll.tolist() == pytest.approx([-math.log(0.1), -math.log(0.6)])
    assert len(stats.test_nll) == 2


def test_ppl_ratio_is_exp_of_the_nll_difference() -> None:
    """Two positions predict tokens 1 and 2: the reference gives them p = 0.5 and 0.25, the test 0.25 and 0.25;
    PPL ratio = exp(mean NLL_test − mean NLL_ref) = exp((ln4 + ln4 − ln2 − ln4) / 2) = sqrt(2)."""
    ref = np.log([[0.25, 0.5, 0.25], [0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    test = np.log([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    ref_rt, rt = Scripted(ref, {}), Scripted(test, {})
    ex = _example("x", "y")
    es = verify.EvalSet([ex], [[0, 1, 2]], [ref_rt.chat_prompt_ids(ex.prompt_messages)], 4, False, "test")
    rep = verify.compare(verify.run_reference(ref_rt, es), rt, es)
    assert rep.ppl_ratio == pytest.approx(math.sqrt(2))
    assert rep.n_positions == 3 and rep.top1 == pytest.approx(2 / 3)


def test_blocks_give_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    ref, test = rng.normal(size=(37, 11)), rng.normal(size=(37, 11))
    ids = rng.integers(0, 11, size=37).tolist()
    whole = metrics.compare_logits(ref, test, ids)
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 11 * 4)  # 4 positions a block
    blocked = metrics.compare_logits(ref, test, ids)
    assert np.allclose(whole.kld, blocked.kld) and np.array_equal(whole.same_top1, blocked.same_top1)
    assert np.allclose(whole.ref_nll, blocked.ref_nll) and np.allclose(whole.test_nll, blocked.test_nll)


# --- scripted runtimes ---------------------------------------------------------------------------------------

END = 0


class Scripted:
    """A runtime whose logits are fixed per position and whose answers follow a script per prompt."""

    def __init__(self, logits: np.ndarray, answers: dict[tuple[int, ...], list[int]], prompt_shift: int = 0):
        self.table, self.answers, self.shift = logits, answers, prompt_shift
        self.n_vocab = logits.shape[1]
        self.generated = 0

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self.table[: len(ids)]

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        ids = [ord(c) % 50 + 1 for c in messages[-1]["content"]]
        return ids[:1] + [ids[1] + self.shift] + ids[2:] if self.shift else ids

    def generate(self, ids: Sequence[int], n: int, stop_ids: Sequence[int] = ()) -> list[int]:
        for prompt, script in self.answers.items():
            if list(ids[: len(prompt)]) == list(prompt):
                pos = len(ids) - len(prompt)
                out = []
                for t in script[pos : pos + n]:
                    out.append(t)
                    self.generated += 1
                    if t in stop_ids:
                        break
                return out
        return [END]

    @property
    def end_ids(self) -> list[int]:
        return [END]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(96 + i) for i in ids if i)

    def close(self) -> None:
        pass


def _example(prompt: str, answer: str) -> Example:
    return Example(({"role": "user", "content": prompt}, {"role": "assistant", "content": answer}), "t:1")


def _evalset(examples: list[Example], rt: Scripted) -> verify.EvalSet:
    prompts = [rt.chat_prompt_ids(ex.prompt_messages) for ex in examples]
    return verify.EvalSet(examples, [list(range(20))], prompts, 16, True, "test")


def _script(text: str) -> list[int]:
    return [ord(c) - 96 for c in text] + [END]


def test_identical_runtime_matches_everywhere() -> None:
    logits = np.random.default_rng(0).normal(size=(20, 30))
    exs = [_example("turn on", "abc"), _example("lights", "de")]
    answers = {}
    for ex, ans in zip(exs, ("abc", "dx"), strict=True):
        answers[tuple(Scripted(logits, {}).chat_prompt_ids(ex.prompt_messages))] = _script(ans)
    ref_rt, rt = Scripted(logits, answers), Scripted(logits, answers)
    es = _evalset(exs, ref_rt)
    ref = verify.run_reference(ref_rt, es)
    assert ref.task_accuracy == 0.5  # "abc" right, "dx" wrong
    rep = verify.compare(ref, rt, es)
    assert rep.kld_mean < 1e-12 and rep.top1 == 1.0 and rep.ppl_ratio == pytest.approx(1.0)
    assert rep.prompt_ids_match == 1.0 and rep.answers_match == 1.0 and rep.task_accuracy == 0.5
    assert rep.prompt_diff is None and rep.answer_diff is None


def test_a_different_prompt_tokenization_is_caught_and_named() -> None:
    logits = np.random.default_rng(0).normal(size=(20, 30))
    ex = _example("turn on", "abc")
    ref_rt = Scripted(
        logits, {tuple(Scripted(logits, {}).chat_prompt_ids(ex.prompt_messages)): _script("abc")}
    )
    art = Scripted(logits, {}, prompt_shift=1)  # token 1 of every prompt differs; answers nothing useful
    es = _evalset([ex], ref_rt)
    rep = verify.compare(verify.run_reference(ref_rt, es), art, es)
    assert rep.prompt_ids_match == 0.0 and rep.answers_match == 0.0
    assert rep.prompt_diff is not None and "token 1" in rep.prompt_diff and "t:1" in rep.prompt_diff
    assert rep.kld_mean < 1e-12  # the weights are identical: only the app path shows the problem
    assert "prompt_ids_match" in rep.explain(
        "prompt_ids_match = 0, budget >= 1"
    ) and "token 1" in rep.explain("prompt_ids_match = 0, budget >= 1")


def test_an_answer_that_never_ends_is_not_a_match() -> None:
    """Endless output (EOS lost in conversion) differs from the float model even when the text starts right."""
    logits = np.zeros((20, 30))
    ex = _example("turn on", "abc")
    key = tuple(Scripted(logits, {}).chat_prompt_ids(ex.prompt_messages))
    ref_rt = Scripted(logits, {key: _script("abc")})
    art = Scripted(logits, {key: [1, 2, 3] + [4] * 40})  # "abc" then never stops
    es = _evalset([ex], ref_rt)
    rep = verify.compare(verify.run_reference(ref_rt, es), art, es)
    assert rep.answers_match == 0.0 and rep.task_accuracy == 0.0
    assert rep.answer_diff is not None and "token 3" in rep.answer_diff and "end of turn" in rep.answer_diff
    assert art.generated < 16  # cut once it could no longer match either answer


class ByteRuntime(Scripted):
    """Decodes ids as UTF-8 bytes, so a partial multi-byte character shows as U+FFFD."""

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i).decode("utf-8", errors="replace")


def test_early_cut_keeps_answers_with_multibyte_characters() -> None:
    answer = "café"
    ids = list(answer.encode("utf-8")) + [END]  # "é" is two bytes: after the first, decode shows "caf\ufffd"
    logits = np.zeros((20, 300))
    ex = _example("x", answer)
    key = tuple(ByteRuntime(logits, {}).chat_prompt_ids(ex.prompt_messages))
    rt = ByteRuntime(logits, {key: ids})
    es = _evalset([ex], rt)
    assert verify.task_accuracy(rt, es) == 1.0


def test_base_model_answers_are_cut_short() -> None:
    logits = np.zeros((20, 30))
    ex = _example("q", "abcdefghij")
    key = tuple(Scripted(logits, {}).chat_prompt_ids(ex.prompt_messages))
    wrong = Scripted(logits, {key: [24, 25, 26] * 13})
    es = _evalset([ex], wrong)
    assert verify.task_accuracy(wrong, es) == 0.0
    assert wrong.generated == 4  # one chunk: cut as soon as it diverged, not 16 tokens


# --- the answer gate's near-tie rule -------------------------------------------------------------------------


def _near_tie_case(
    art_answer: list[int], choices: list[tuple[list[int], list[float]]], prompt_shift: int = 0
) -> verify.DriftReport:
    """The float model answers "abc" + end; at each position it had `choices` (ids, log-probs); the
    artifact answers `art_answer` (its prompt shifted by `prompt_shift` to mimic a changed template)."""
    logits = np.zeros((20, 30))
    ex = _example("turn on", "abc")
    key = tuple(Scripted(logits, {}).chat_prompt_ids(ex.prompt_messages))
    ref_rt = Scripted(logits, {key: _script("abc")})
    shifted = tuple(Scripted(logits, {}, prompt_shift).chat_prompt_ids(ex.prompt_messages))
    art = Scripted(logits, {shifted: art_answer}, prompt_shift)
    es = _evalset([ex], ref_rt)
    ref = verify.run_reference(ref_rt, es)
    ref.choices = [choices]
    return verify.compare(ref, art, es)


SURE = ([1, 2], [-0.001, -7.0])  # the float model was sure of its token


def test_a_flip_at_a_near_tie_still_matches() -> None:
    """The float model chose 'c' over 'x' by 0.2 nats: an artifact choosing 'x' there parted on noise."""
    near = ([3, 24], [-0.6, -0.8])
    rep = _near_tie_case([1, 2, 24, END], [SURE, SURE, near, SURE])
    assert rep.answers_match == 1.0 and rep.near_ties == 1 and rep.answer_diff is None
    assert (
        rep.near_tie_diff is not None and "token 2" in rep.near_tie_diff and "0.200 nats" in rep.near_tie_diff
    )
    assert rep.task_accuracy == 0.0  # the task is still scored on the artifact's own answer


def test_a_flip_where_the_float_model_was_sure_fails() -> None:
    far = ([3, 24], [-0.05, -3.05])
    rep = _near_tie_case([1, 2, 24, END], [SURE, SURE, far, SURE])
    assert rep.answers_match == 0.0 and rep.near_ties == 0
    assert rep.answer_diff is not None and "token 2" in rep.answer_diff and "3.00 nats" in rep.answer_diff


def test_a_first_token_the_float_model_never_considered_fails() -> None:
    """A space after a special token: the artifact's first id is not among the float model's alternatives."""
    first = ([1, 5], [-0.3, -0.5])
    rep = _near_tie_case([27, 1, 2, 3, END], [first, SURE, SURE, SURE])
    assert rep.answers_match == 0.0 and rep.answer_diff is not None and "token 0" in rep.answer_diff


def test_a_missing_end_of_turn_fails() -> None:
    """The float model was sure the answer ends after 'abc'; the artifact goes on."""
    end = ([END, 4], [-0.002, -6.0])
    rep = _near_tie_case([1, 2, 3, 4, 4, 4, 4, 4], [SURE, SURE, SURE, end])
    assert rep.answers_match == 0.0 and rep.answer_diff is not None and "end of turn" in rep.answer_diff


def test_a_changed_template_is_never_excused() -> None:
    """Different prompt ids: the float model's margins are about another prompt, so no flip is a near-tie."""
    near = ([3, 24], [-0.6, -0.8])
    rep = _near_tie_case([1, 2, 24, END], [SURE, SURE, near, SURE], prompt_shift=1)
    assert rep.prompt_ids_match == 0.0 and rep.answers_match == 0.0 and rep.near_ties == 0
