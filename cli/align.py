from typing import Optional

import typer
from rich.table import Table

import coopt_fast
from coopt_fast.scores import DEFAULT_SCORE, SCORES

from .app import command, emit


@command
def align(
    run: str = typer.Argument(..., help="run folder"),
    dim: int = typer.Option(512, "--dim", help="n, the common target dimension"),
    participant: Optional[str] = typer.Option(None, "--participant", help="align only this participant (local mode)"),
    reference: str = typer.Option("consensus", "--reference", help="consensus (default: the top-n directions of everyone's features on S) | best (by --score) | NAME | none (W only, no alignment)"),
    score: str = typer.Option(DEFAULT_SCORE, "--score",
                              help=f"how --reference best ranks the priors on S: {' | '.join(SCORES)} "
                                   "(uniformity: the paper's; see README 'How the reference is chosen')"),
    ridge: Optional[float] = typer.Option(None, "--ridge", help="ridge λ for the fit (default: auto, see README)"),
    target_dtype: str = typer.Option("float16", "--target-dtype", help="float16 | bfloat16 | int8 (row scale) | int8-dim (dimension scale)"),
    force: bool = typer.Option(False, "--force", help="realign over existing aligned.h5 files (without it, one made "
                               "with other settings or features is refused; an identical one is left as it is)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    json_out: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
):
    """Step 2b: project features to n dims and align them to the reference prior -> aligned.h5.

    With --participant, only that participant aligns, reading its own features, the others'
    published features on S (the consensus is computed from them; --reference best scores them),
    and a single reference's published shared targets (raw shard features never leave it).
    Every features.h5 it reads must match its participant's manifest.json and this run's plan.
    """
    s = coopt_fast.align(run, dim=dim, participant=participant, reference=reference, ridge=ridge,
                         target_dtype=target_dtype, progress=not quiet, score=score, force=force)
    by = f" (best by {s['score']})" if s["score"] and s["reference"] else ""
    t = Table(title=f"aligned to {s['reference'] or 'nothing (W only)'}{by} in {dim} dims, "
              f"{s['target_dtype']} ({s['bytes_per_row']} bytes/sample)")
    for c in ("participant", "prior", "U on S", "residual", "ridge", "aligned.h5"):
        t.add_column(c)
    for r in s["participants"]:
        t.add_row(r["participant"] + (" *" if r["reference"] else ""), r["prior"], f"{r['uniformity']:.4f}",
                  f"{r['residual']:.4f}", f"{r['ridge']:.3g}", "up to date" if r["skipped"] else "written")
    emit(s, json_out, t)
