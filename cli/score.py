import typer
from rich.table import Table

import coopt_fast

from .app import command, emit


@command
def score(
    run: str = typer.Argument(..., help="run folder"),
    json_out: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
):
    """Rank the participants' priors by uniformity U on the shared set S (lower = better prior)."""
    s = coopt_fast.score(run)
    t = Table(title="priors ranked by uniformity on S (lower is better)")
    for c in ("rank", "participant", "prior", "dim", "rows", "U on S"):
        t.add_column(c)
    for r in s["participants"]:
        t.add_row(str(r["rank"]), r["participant"], r["prior"], str(r["feature_dim"]), f"{r['rows']:,}", f"{r['uniformity']:.4f}")
    emit(s, json_out, t)
