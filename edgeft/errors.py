"""The one exception type a user can cause; the CLI prints it as one line and exits non-zero."""

from __future__ import annotations

from typing import Any


class EdgeftError(Exception):
    """A user-facing error: the message names the file, field or value and what to do about it."""


def show(value: Any) -> str:
    """A value as a user wrote it, on one short line (TOML spelling for booleans), for error messages."""
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def printable(text: str) -> str:
    """`text` with control characters (ESC, BEL, CR, newlines, ...) shown as escapes: text from a stranger (a
    file name, a device's reason, a template's message) must not forge a line or drive the terminal."""
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in text)
