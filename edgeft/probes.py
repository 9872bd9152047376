"""Built-in probes: texts and conversations every exporter and verify push through a tokenizer.

They cover where tokenizers and chat templates disagree in practice: whitespace runs, digits and numbers,
non-ASCII text, code, a system turn and several turns (../shared/REFERENCE.md "Where users get hurt" 2, 8,
10, 11). Exporters check them (and the eval set's conversations) before shipping; verify answers the
conversations when no task data is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def first_difference(want: Sequence[int], got: Sequence[int]) -> int | None:
    """Where two id sequences first differ (the shorter one's length when one extends the other), or None."""
    if list(want) == list(got):
        return None
    return next(
        (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got))
    )


def show_token(ids: Sequence[int], k: int, piece: Callable[[int], str]) -> str:
    """Token k of `ids` as "'▁[' (518)", or "(end)" past the end — for one-line difference reports."""
    return f"{piece(int(ids[k]))!r} ({ids[k]})" if k < len(ids) else "(end)"
