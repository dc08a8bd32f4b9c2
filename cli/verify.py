import typer
from rich.table import Table

import coopt_fast

from . import options as o
from .app import command, emit


@command
def verify(
    run: str = typer.Argument(..., help="run folder"),
    json_out: bool = o.json_flag(),
):
    """Any time: check every file in RUN (checksums, completion, format version, plan, hashes); exit 1 on any fault."""
    s = coopt_fast.verify(run)
    t = Table(title=f"verify {run}: {'all fine' if s['ok'] else 'FAULTS FOUND'}")
    for c in ("file", "", "checks"):
        t.add_column(c)
    files: dict[str, list] = {}
    for c in s["checks"]:
        files.setdefault(c["file"], []).append(c)
    for name, cs in files.items():  # one row per file: its faults, or what passed
        faults = [f"{c['check']}: {c['detail']}" for c in cs if not c["ok"]]
        t.add_row(name, "[red]FAULT[/]" if faults else "[green]ok[/]",
                  "; ".join(faults) if faults else ", ".join(c["check"] for c in cs))
    emit(s, json_out, t)
    if not s["ok"]:
        raise typer.Exit(1)
