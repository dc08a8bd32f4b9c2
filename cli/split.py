from typing import Optional

import typer
from rich.table import Table

import coopt_fast

from . import options as o
from .app import command, emit


@command
def split(
    dataset: str = typer.Argument(..., help="fashion-mnist[:test] | folder:PATH | npy:IMAGES.npy[,LABELS.npy]"),
    out: str = o.out("run folder to create (the platform)"),
    participants: int = typer.Option(4, "--participants", "-k", help="K, the number of shards", metavar="K"),
    shared_fraction: float = typer.Option(0.05, "--shared-fraction", metavar="F", help="|S|/N: the shared set used for scoring and alignment"),
    seed: int = o.seed("the shards and S (the same seed and data give the same plan)"),
    sizes: Optional[str] = typer.Option(None, "--sizes", metavar="W1,..,WK", help="relative shard sizes w1,..,wK (default: balanced)"),
    limit: Optional[int] = o.limit("DATASET"),
    force: bool = o.flag("--force", "replace an existing, different plan.json (orphans the "
                               "participants' uploads made for it)"),
    json_out: bool = o.json_flag(),
):
    """Step 1 of 5, the platform: split DATASET into K disjoint shards and a shared set S -> OUT/plan.json.


    Over an existing plan: the same split leaves it unchanged; a different one is refused
    unless --force."""
    w = None
    if sizes is not None:
        try:
            w = [float(s) for s in sizes.split(",")]
        except ValueError:
            raise coopt_fast.CooptError(f"--sizes {sizes!r}: expected comma-separated numbers") from None
    plan = coopt_fast.split(dataset, out, participants=participants, shared_fraction=shared_fraction,
                            seed=seed, sizes=w, limit=limit, force=force)
    summary = {"plan": f"{out}/plan.json", "n": plan["fingerprint"]["n"], "shard_sizes": [len(s) for s in plan["shards"]],
               "shared": len(plan["shared"]), "fingerprint": plan["fingerprint"]["sha256"],
               "unchanged": plan["unchanged"], "warnings": plan["warnings"]}
    t = Table(title=f"plan for {dataset} ({summary['n']} samples, |S| = {summary['shared']})"
              + (": unchanged, already in place" if plan["unchanged"] else ""))
    t.add_column("shard")
    t.add_column("samples", justify="right")
    for k, s in enumerate(summary["shard_sizes"]):
        t.add_row(str(k), f"{s:,}")
    emit(summary, json_out, t)
