import typer

import coopt_fast

from . import options as o
from .app import command, emit, kv_table


@command
def merge(
    run: str = typer.Argument(..., help="run folder"),
    allow_missing: bool = o.flag("--allow-missing", "merge even if some shards have no upload"),
    force: bool = o.flag("--force", "replace an existing merged.h5 made from other inputs "
                               "(without it: kept if made from the same uploads, refused otherwise)"),
    quiet: bool = o.quiet_flag(),
    json_out: bool = o.json_flag(),
):
    """Step 5 of 5, the platform: check every aligned upload against the plan -> RUN/merged.h5, in global order.


    A merged.h5 already made from the same uploads is left as it is ("skipped": up to date).
    """
    s = coopt_fast.merge(run, allow_missing=allow_missing, progress=not quiet, force=force)
    emit(s, json_out, kv_table(f"{'up to date' if s['skipped'] else 'merged'} {s['path']}", s, (
        "rows", "dim", "participants", "missing_shards", "coverage", "images", "seconds", "skipped")))
