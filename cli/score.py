import typer
from rich.table import Table

import coopt_fast
from coopt_fast import distributed
from coopt_fast.scores import DEFAULT_SCORE, SCORES

from . import options as o
from .app import command, emit


@command
def score(
    run: str = typer.Argument(..., help="run folder"),
    by: o.Score = typer.Option(DEFAULT_SCORE, "--by", help=f"rank by {' | '.join(SCORES)} (align --score uses the same)"),
    device: str = o.device("where scores are computed (runs without records, --recompute); Triton on CUDA"),
    recompute: bool = o.flag("--recompute", "compute every score from the features.h5 in the run folder instead of "
                             "reading the published records"),
    json_out: bool = o.json_flag(),
):
    """Step 3, before align: rank the participants' priors by label-free scores on the shared set S.

    uniformity (the paper's; lower = better) is biased on post-ReLU features and always picks
    one-hot labels; uniformity-centred (the default; lower = better) scores the spread around
    the mean; effective-rank (higher = more directions used) is what the targets can span.
    Under `torchrun --nproc_per_node=G -m coopt_fast score RUN --recompute --device cuda` each
    rank takes a share of U's pairs on S; rank 0 prints.
    """
    s = coopt_fast.score(run, by=by, device=device, recompute=recompute)
    if not distributed.world().main:
        return
    t = Table(title=f"priors ranked by {by} on S; `align --reference best --score {by}` picks {s['best']}")
    for c in ("rank", "participant", "prior", "dim", "shard rows", "U on S", "centred U", "effective rank"):
        t.add_column(c)
    for r in s["participants"]:
        t.add_row(str(r["rank"]), r["participant"], r["prior"], str(r["feature_dim"]), f"{r['rows']:,}",
                  f"{r['uniformity']:.4f}", f"{r['uniformity_centred']:.4f}", f"{r['effective_rank']:.1f}")
    emit(s, json_out, t)
