import sys

import typer
from rich.table import Table

import coopt_fast

from . import options as o
from .app import command, emit


@command
def inspect(
    run: str = typer.Argument(..., help="run folder"),
    no_plot: bool = o.flag("--no-plot", "skip RUN/inspect.png"),
    json_out: bool = o.json_flag(),
):
    """After align: U, fit residuals and the target inconsistency G before/after alignment; plots RUN/inspect.png."""
    s = coopt_fast.inspect(run, plot=not no_plot)
    g, ci = s["inconsistency"], s["inconsistency_ci95"]
    t = Table(title=f"G (two-sample TV lower bound, 95% CI) before alignment {g['before']:.3f} "
              f"[{ci['before'][0]:.3f}, {ci['before'][1]:.3f}] -> after {g['after']:.3f} "
              f"[{ci['after'][0]:.3f}, {ci['after'][1]:.3f}]")
    for c in ("participant", "prior", "dim", "U on S", "residual"):
        t.add_column(c)
    for r in s["participants"]:
        t.add_row(r["participant"] + (" *" if r["reference"] else ""), r["prior"], str(r["feature_dim"]),
                  f"{r['uniformity']:.4f}", f"{r['residual']:.4f}")
    emit(s, json_out, t)
    if s.get("plot") and not json_out:
        print(f"plot: {s['plot']}", file=sys.stderr)
