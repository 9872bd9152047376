"""What every model is scored on, and how a runtime answers it the way an app does.

An `EvalSet` holds the task conversations (the fine-tune's held-out split, or the built-in probes) with their
ids as the fine-tune saw them; `app_answer` runs one conversation through a runtime's own chat template,
tokenizer and end ids, greedily, as an app's chat call would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgeft import data as data_mod
from edgeft import files
from edgeft.errors import EdgeftError
from edgeft.probes import PROBE_CONVERSATIONS
from edgeft.runtime import Runtime
from edgeft.template import TemplateBoundsError
from edgeft.ui import Progress


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

    def digest(self) -> str:
        """What a reference run of this set depends on besides the model: every id and expected answer."""
        return files.digest(
            [
                [list(ex.messages) for ex in self.examples],
                self.sequences,
                self.prompts,
                self.max_new_tokens,
                self.scored,
            ]
        )


@dataclass(frozen=True)
class AppAnswer:
    """One conversation through a runtime's app path."""

    prompt: list[int]
    answer: list[int]  # greedy ids before the first end-of-generation id
    ended: bool  # whether it ended on an end-of-generation id (not on the token limit)
    text: str
    error: str | None = None  # the runtime could not render or run this conversation
    end_id: int | None = None  # the end-of-generation id it ended on

    def same_answer(self, other: AppAnswer) -> bool:
        return self.error is None and self.answer == other.answer and self.ended == other.ended

    @property
    def generated(self) -> list[int]:
        """Every id it generated: the answer, then the end id it stopped on."""
        return self.answer + ([self.end_id] if self.ended and self.end_id is not None else [])


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
    except TemplateBoundsError:
        raise  # a hostile template, not a conversation it refuses
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
        data_mod.vet_examples(
            tokenizer, examples
        )  # the template renders them within bounds first, in one batch
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


def could_match(rt: Runtime, out: list[int], ex: data_mod.Example) -> bool:
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


def vet_app_path(rt: Runtime, es: EvalSet) -> None:
    """Every conversation's prompt through the runtime's own template within bounds, in one batch, before
    the runtime renders them one by one (Runtime.vet)."""
    vet = getattr(rt, "vet", None)  # a runtime that renders no stranger's template (a test's) has none
    if vet is not None:
        vet([list(ex.prompt_messages) for ex in es.examples])


def app_answer(
    rt: Runtime, es: EvalSet, i: int, keep_going: Callable[[list[int]], bool] | None = None
) -> AppAnswer:
    """Conversation `i` through the runtime's own chat template, tokenizer and end ids."""
    ex = es.examples[i]
    try:
        prompt = rt.chat_prompt_ids(ex.prompt_messages)
    except TemplateBoundsError:
        raise  # a hostile template is the artifact's fault, not one conversation's
    except EdgeftError as e:
        return AppAnswer([], [], False, "", error=str(e))
    if len(prompt) + es.max_new_tokens > es.n_ctx:
        return AppAnswer(prompt, [], False, "", error=f"prompt of {len(prompt)} tokens exceeds the context")
    out = greedy(rt, prompt, es.max_new_tokens, keep_going)
    return cut_answer(rt, prompt, out)


def cut_answer(rt: Runtime, prompt: list[int], out: list[int]) -> AppAnswer:
    """The AppAnswer of greedy ids `out`: cut before the first of the runtime's end ids."""
    ends = set(rt.end_ids)
    cut = next((k for k, t in enumerate(out) if t in ends), len(out))
    ended = cut < len(out)
    return AppAnswer(prompt, out[:cut], ended, rt.decode(out[:cut]), end_id=out[cut] if ended else None)


def task_accuracy(rt: Runtime, es: EvalSet, progress: Progress | None = None) -> float | None:
    """Exact-match accuracy of greedy answers on the task (None without task data); an answer stops as soon
    as it can no longer match. A runtime that decodes in batches (PyTorch) answers BATCH conversations at
    once."""
    if not es.scored:
        return None
    vet_app_path(rt, es)
    hits = 0
    if getattr(rt, "generate_batch", None) is not None:
        for a in range(0, len(es.examples), BATCH):
            idx = list(range(a, min(a + BATCH, len(es.examples))))
            prompts = [rt.chat_prompt_ids(es.examples[i].prompt_messages) for i in idx]

            def going(j: int, out: list[int], idx: list[int] = idx) -> bool:
                return could_match(rt, out, es.examples[idx[j]])

            outs = rt.generate_batch(prompts, es.max_new_tokens, rt.end_ids, keep_going=going)  # type: ignore[attr-defined]
            for i, p, (ids, _) in zip(idx, prompts, outs, strict=True):
                ans = cut_answer(rt, p, ids)
                hits += ans.ended and data_mod.answer_text_matches(ans.text, es.examples[i])
            if progress:
                progress(idx[-1] + 1, len(es.examples))
        return hits / len(es.examples)
    for i, ex in enumerate(es.examples):
        a = app_answer(rt, es, i, lambda out, ex=ex: could_match(rt, out, ex))
        hits += a.ended and data_mod.answer_text_matches(a.text, ex)
        if progress:
            progress(i + 1, len(es.examples))
    return hits / len(es.examples)


BATCH = 32  # conversations a batched runtime answers at once
