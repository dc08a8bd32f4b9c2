import typer
from rich.table import Table

import coopt_fast

from . import options as o
from .app import command, emit


@command
def status(
    run: str = typer.Argument(..., help="run folder"),
    json_out: bool = o.json_flag(),
):
    """Any time: each participant's progress (rows done / total, rows/s, ETA), read live while extract runs."""
    s = coopt_fast.status(run)
    t = Table(title=f"{run}: {s['shards_started']} of {s['shards']} shards started "
              f"({len(s['participants'])} participants)" + (", merged" if s["merged"] else ""))
    for c in ("participant", "shard", "state", "rows (shard + S)", "rows/s", "ETA", "aligned", "rounds"):
        t.add_column(c)
    for r in s["participants"]:
        rows = f"{r['rows_done']:,} / {r['rows_total']:,}" if r["rows_total"] else "-"
        t.add_row(r["participant"], "?" if r["shard"] is None else str(r["shard"]), r["state"], rows,
                  f"{r['rate']:,.0f}" if r["rate"] else "-",
                  f"{r['eta_seconds']:.0f} s" if r["eta_seconds"] is not None else "-", "yes" if r["aligned"] else "no",
                  ", ".join(map(str, r["rounds"])) or "-")
    emit(s, json_out, t)
