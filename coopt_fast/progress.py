"""Progress on stderr for long library work (stdout stays free for --json).

On a terminal: rich bars. Elsewhere (CI, nohup, a pipe): a plain line every
COOPT_PROGRESS_SECONDS (default 10) with done/total, rate and ETA, and one when the work ends.
COOPT_PROGRESS overrides: 0 = nothing, 1 or bars = bars even without a terminal, lines = lines
even on one.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

DEFAULT_SECONDS = 10.0


def mode() -> str:
    """"bars", "lines" or "off", from COOPT_PROGRESS and whether stderr is a terminal."""
    v = os.environ.get("COOPT_PROGRESS", "").strip().lower()
    if v in ("0", "off", "none"):
        return "off"
    if v in ("1", "bars"):
        return "bars"
    if v == "lines":
        return "lines"
    return "bars" if sys.stderr.isatty() else "lines"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("COOPT_PROGRESS_SECONDS", DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


@contextlib.contextmanager
def bar(description: str, total: int, enabled: bool = True, unit: str = "img"):
    """Yields `advance(n, **fields)`; shows rate in `unit`/s. Disabled -> a no-op callable."""
    how = mode() if enabled else "off"
    if how == "off":
        yield lambda n=1, **kw: None
    elif how == "lines":
        with _lines(description, total, unit) as advance:
            yield advance
    else:
        with _bars(description, total, unit) as advance:
            yield advance


@contextlib.contextmanager
def _lines(description: str, total: int, unit: str):
    every = _interval()
    last = time.monotonic()
    done, since, said = 0, None, -1  # the rate counts from the first advance (maybe a resume's rows done before)

    def line() -> None:
        nonlocal said
        said = done
        now = time.monotonic()
        rate = (done - since[0]) / (now - since[1]) if since and now > since[1] else 0.0
        eta = f", ETA {(total - done) / rate:,.0f} s" if rate > 0 and done < total else ""
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        print(f"{description}: {done:,}/{total:,}{pct}, {rate:,.0f} {unit}/s{eta}", file=sys.stderr, flush=True)

    def advance(n: int = 1, **fields):
        nonlocal done, since, last
        done += n
        if since is None:
            since = (done, time.monotonic())
        if time.monotonic() - last >= every:
            last = time.monotonic()
            line()

    yield advance
    if said != done:
        line()


@contextlib.contextmanager
def _bars(description: str, total: int, unit: str):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

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
