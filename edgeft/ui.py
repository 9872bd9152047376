"""Progress and messages on stderr (stdout is kept for `--json` output)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.errors import MarkupError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as Bar

from edgeft.errors import printable

console = Console(stderr=True)
# A long step's progress callback: update(done, total); task()'s also takes an optional note (e.g. the loss).
Progress = Callable[[int, int], None]


@contextmanager
def task(description: str, total: int | None = None) -> Iterator[Progress]:
    """A progress bar for one long step (elapsed time and ETA); yields `update(done, total, note=None)`."""
    with Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=False,
    ) as bar:
        tid = bar.add_task(description, total=total or 1, note="")  # no count: shows 0/1 → 1/1

        def update(done: int, tot: int, note: str | None = None) -> None:
            bar.update(tid, completed=done, total=tot, **({"note": note} if note is not None else {}))

        yield update
        t = bar.tasks[0].total
        if t is not None:
            bar.update(tid, completed=t)


def info(msg: str) -> None:
    """A line on stderr with edgeft's own markup; control characters are escaped whatever the text holds, and
    a stranger's stray markup (an unbalanced "[/]") prints as text rather than failing the command."""
    try:
        console.print(printable(msg), highlight=False, soft_wrap=True)
    except MarkupError:
        console.print(printable(msg), markup=False, highlight=False, soft_wrap=True)


def plain(text: str) -> str:
    """A stranger's text for a line of info(): its markup shown, not applied."""
    return escape(printable(text))


def info_text(msg: str) -> None:
    """A line holding a stranger's text (a device's reason, a path it sent): no rich markup, no control
    characters, so it can neither style nor forge what is around it."""
    console.print(printable(msg), markup=False, highlight=False, soft_wrap=True)
