from typing import Optional

import typer
from rich.table import Table

import coopt_fast
from coopt_fast.scores import DEFAULT_SCORE, SCORES

from . import options as o
from .app import command, emit


@command
def align(
    run: str = typer.Argument(..., help="run folder"),
    dim: int = typer.Option(512, "--dim", help="n, the common target dimension", metavar="N"),
    participant: Optional[str] = typer.Option(None, "--participant", metavar="NAME", help="align only this participant (local mode)"),
    reference: str = typer.Option("consensus", "--reference", metavar="consensus|best|NAME|none", help="consensus (default: the top-n directions of everyone's features on S) | best (by --score) | NAME | none (W only, no alignment)"),
    score: o.Score = typer.Option(DEFAULT_SCORE, "--score",
                              help=f"how --reference best ranks the priors on S: {' | '.join(SCORES)} "
                                   "(uniformity: the paper's; see README 'How the reference is chosen')"),
    ridge: Optional[float] = typer.Option(None, "--ridge", metavar="LAMBDA", help="ridge λ for the fit (default: auto, see README)"),
    target_dtype: o.TargetDtype = typer.Option("float16", "--target-dtype", help="how targets are stored: int8 with a scale per row, int8-dim with a scale per dimension"),
    force: bool = o.flag("--force", "realign over existing aligned.h5 files (without it, one made "
                               "with other settings or features is refused; an identical one is left as it is)"),
    workspace: Optional[str] = typer.Option(None, "--workspace", metavar="DIR", help="with --participant: the folder holding your "
                                            "features.h5 (default RUN/participants/NAME)"),
    device: str = o.device("where the shard's targets are computed (Triton on CUDA); the fit on S stays on the CPU"),
    quiet: bool = o.quiet_flag(),
    json_out: bool = o.json_flag(),
):
    """Step 4 of 5, each participant: project features to n dims, align them to the reference -> aligned.h5.


    With --participant, only that participant aligns, reading its own features (in --workspace)
    and what the others published: their records (--reference best ranks them), their projected
    features on S (shared.h5: the consensus is computed from them; yours is published first), or
    a single reference's S*. While one of those is missing it publishes what it can, says whom it
    waits for, and exits 75: rerun once they have aligned. Raw features never leave a workspace.
    Every features.h5 it reads must match its manifest.json and this run's plan.
    """
    s = coopt_fast.align(run, dim=dim, participant=participant, reference=reference, ridge=ridge,
                         target_dtype=target_dtype, progress=not quiet, score=score, force=force,
                         workspace=workspace, device=device)
    by = f" (best by {s['score']})" if s["score"] and s["reference"] else ""
    t = Table(title=f"aligned to {s['reference'] or 'nothing (W only)'}{by} in {dim} dims, "
              f"{s['target_dtype']} ({s['bytes_per_row']} bytes/sample)")
    for c in ("participant", "prior", "U on S", "residual", "ridge", "aligned.h5"):
        t.add_column(c)
    for r in s["participants"]:
        t.add_row(r["participant"] + (" *" if r["reference"] else ""), r["prior"], f"{r['uniformity']:.4f}",
                  f"{r['residual']:.4f}", f"{r['ridge']:.3g}", "up to date" if r["skipped"] else "written")
    emit(s, json_out, t)
