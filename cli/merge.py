import typer
from rich.table import Table

import coopt_fast

from .app import command, emit


@command
def merge(
    run: str = typer.Argument(..., help="run folder"),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="merge even if some shards have no upload"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    json_out: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
):
    """Step 4: validate every aligned upload against the plan and write RUN/merged.h5 in global order."""
    s = coopt_fast.merge(run, allow_missing=allow_missing, progress=not quiet)
    t = Table(title=f"merged {s['path']}")
    for k in ("rows", "dim", "participants", "missing_shards", "coverage", "images", "seconds"):
        t.add_row(k, str(s[k]))
    emit(s, json_out, t)
