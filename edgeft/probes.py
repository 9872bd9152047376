"""Built-in probes: texts and conversations every exporter and verify push through a tokenizer.

They cover where tokenizers and chat templates disagree in practice: whitespace runs, digits and numbers,
non-ASCII text, code, a system turn and several turns (ref: unsloth PR #5080; llama.cpp #7062, #15842;
transformers 5 models/*/tokenization_*.py; llama.cpp src/llama-vocab.cpp). Exporters check them (and the
eval set's conversations) before shipping; verify answers the conversations when no task data is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from edgeft import data as data_mod
from edgeft.errors import EdgeftError
from edgeft.template import TemplateBoundsError

PROBE_TEXTS: tuple[str, ...] = (
    "Hello world",
    "  leading spaces and trailing   ",
    "line\nbreaks\r\n\n\tand tabs",
    "version 3.11, 2024-05-17 at 07:30 for 1234567 items",
    "café naïve Ålesund 日本語 🙂",
    "def f(x):\n    return x**2  # ok",
    "It's they're we've I'm you'll he'd",
)
PROBE_CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is 2 + 2?"},),
    ({"role": "user", "content": "Set the timer to 3.11 minutes,   then  stop."},),
    (
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Café in Ålesund: open at 07:30?"},
    ),
    (
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "list 3 colours\n\n- red"},
    ),
)


def first_difference(want: Sequence[Any], got: Sequence[Any]) -> int | None:
    """Where two id sequences (or texts) first differ (the shorter one's length when one extends the other),
    or None."""
    if list(want) == list(got):
        return None
    return next(
        (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got))
    )


def show_token(ids: Sequence[int], k: int, piece: Callable[[int], str]) -> str:
    """Token k of `ids` as "'▁[' (518)", or "(end)" past the end — for one-line difference reports."""
    return f"{piece(int(ids[k]))!r} ({ids[k]})" if k < len(ids) else "(end)"


def tokenization_mismatches(
    tokenizer: Any,
    runtime: str,
    encode: Callable[[str], list[int]],
    chat: Callable[[list[dict[str, str]]], list[int]],
    conversations: Sequence[Sequence[dict[str, str]]],
    *,
    text_specials: bool,
) -> list[str]:
    """Probes a runtime tokenizes differently from the model's own tokenizer, one line each.

    `encode(text)` is the runtime's plain-text encoding (compared with the tokenizer's, special tokens added
    when `text_specials`); `chat(messages)` the prompt ids its chat path builds (compared with the
    fine-tune's, edgeft.data.chat_prompt_ids). Conversations the model's own template refuses are skipped.
    """

    def piece(i: int) -> str:
        return str(tokenizer.convert_ids_to_tokens(int(i)))

    def line(label: str, want: list[int], got: list[int]) -> str | None:
        k = first_difference(want, got)
        if k is None:
            return None
        return (
            f"{label}: token {k} is {show_token(got, k, piece)} in {runtime}, "
            f"{show_token(want, k, piece)} in the fine-tune"
        )

    found: list[str | None] = []
    for n, text in enumerate(PROBE_TEXTS, 1):
        want = list(tokenizer(text, add_special_tokens=text_specials)["input_ids"])
        found.append(line(f"probe text {n} {text[:24]!r}", want, encode(text)))
    for n, messages in enumerate(conversations, 1):
        msgs = [dict(m) for m in messages]
        try:
            want = data_mod.chat_prompt_ids(tokenizer, msgs)
        except TemplateBoundsError:
            raise
        except EdgeftError:  # the model's template refuses this shape (e.g. a system turn)
            continue
        try:
            got = chat(msgs)
        except Exception as e:  # noqa: BLE001 - the runtime's template engine may reject what HF renders
            found.append(f"conversation {n}: {runtime} cannot render it ({str(e).splitlines()[0]})")
            continue
        found.append(line(f"conversation {n}", want, got))
    return [f for f in found if f]
