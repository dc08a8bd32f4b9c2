import typer
from rich.table import Table

import coopt_fast

from .app import command, emit


@command
def merge(
    run: str = typer.Argument(..., help="run folder"),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="merge even if some shards have no upload"),
    force: bool = typer.Option(False, "--force", help="replace an existing merged.h5 made from other inputs "
                               "(without it: kept if made from the same uploads, refused otherwise)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    json_out: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
):
    """Step 4: validate every aligned upload against the plan and write RUN/merged.h5 in global order.

    A merged.h5 already made from the same uploads is left as it is ("skipped": up to date).
    """
    s = coopt_fast.merge(run, allow_missing=allow_missing, progress=not quiet, force=force)
    t = Table(title=f"{'up to date' if s['skipped'] else 'merged'} {s['path']}")
    for k in ("rows", "dim", "participants", "missing_shards", "coverage", "images", "seconds", "skipped"):
        t.add_row(k, str(s[k]))
    emit(s, json_out, t)
