"""Progress bars for long library work, on stderr (stdout stays free for --json)."""
from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def bar(description: str, total: int, enabled: bool = True, unit: str = "img"):
    """Yields `advance(n, **fields)`; shows rate in `unit`/s. Disabled -> a no-op callable."""
    if not enabled or not sys.stderr.isatty() and not _force():
        yield lambda n=1, **kw: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    ) as p:
        task = p.add_task(description, total=total, rate="", info="")

        def advance(n: int = 1, **fields):
            p.update(task, advance=n, **fields)
            t = p.tasks[task]
            if t.speed:
                p.update(task, rate=f"{t.speed:,.0f} {unit}/s")

        yield advance


def _force() -> bool:
    import os

    return os.environ.get("COOPT_PROGRESS") == "1"
