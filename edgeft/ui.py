"""Progress and messages on stderr (stdout is kept for `--json` output)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar

console = Console(stderr=True)
# A long step's progress callback: update(done, total).
Progress = Callable[[int, int], None]


@contextmanager
def task(description: str, total: int | None = None) -> Iterator[Progress]:
    """A progress bar for one long step; yields `update(done, total)`."""
    with Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tid = bar.add_task(description, total=total or 1)  # a step without a count shows 0/1 → 1/1

        def update(done: int, tot: int) -> None:
            bar.update(tid, completed=done, total=tot)

        yield update
        t = bar.tasks[0].total
        if t is not None:
            bar.update(tid, completed=t)


def info(msg: str) -> None:
    console.print(msg, highlight=False, soft_wrap=True)
