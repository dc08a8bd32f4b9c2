import typer
from rich.table import Table

from coopt_fast.demo import DemoConfig, demo as run_demo

from .app import command, console, emit

_D = DemoConfig()


@command
def demo(
    out: str = typer.Option(_D.out, "--out", help="folder for the run, checkpoints, logs and summary.json"),
    limit: int = typer.Option(_D.limit, "--limit", help="samples of Fashion-MNIST train in D (60000 = all)"),
    participants: int = typer.Option(_D.participants, "--participants", "-k"),
    dim: int = typer.Option(_D.dim, "--dim", help="n, the common target dimension"),
    seed: int = typer.Option(_D.seed, "--seed"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout"),
):
    """Run the whole COOPT story on Fashion-MNIST and print one table (default size: minutes on 2 CPU cores)."""
    cfg = DemoConfig(out=out, limit=limit, participants=participants, dim=dim, seed=seed)
    s = run_demo(cfg, progress=not quiet)
    t = Table(title="COOPT demo: participants")
    for c in ("participant", "prior", "dim", "U on S", "residual"):
        t.add_column(c)
    for r in s["participants"]:
        t.add_row(r["participant"] + (" *" if r["reference"] else ""), r["prior"], str(r["feature_dim"]),
                  f"{r['uniformity']:.4f}", f"{r['residual']:.4f}")
    g = s["inconsistency"]
    steps = Table(title=f"inconsistency G: {g['before']:.3f} before alignment -> {g['after']:.3f} after")
    steps.add_column("step")
    steps.add_column("seconds", justify="right")
    for k, v in s["seconds"].items():
        steps.add_row(k, f"{v:.1f}")
    if not json_out:
        console.print(t)
    emit(s, json_out, steps)
