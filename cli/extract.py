import typer

import coopt_fast

from . import options as o
from .app import command, emit, kv_table


@command
def extract(
    run: str = typer.Argument(..., help="run folder made by split"),
    participant: str = typer.Option(..., "--participant", metavar="NAME", help="your name (letters, digits, _ . -)"),
    shard: int = typer.Option(..., "--shard", metavar="K", help="which shard of the plan is yours (one participant per shard)"),
    prior: str = typer.Option(..., "--prior", metavar="SPEC", help="ARCH, ARCH:CHECKPOINT (.pt/.pth/.safetensors) or labels"),
    batch_size: int = o.batch_size(256, "images per model call"),
    device: str = o.device("the prior runs there; DALI decodes on it (mixed) when it is a GPU"),
    round_: int = typer.Option(0, "--round", metavar="R", help="collaboration round (>= 0), recorded in the file. A round higher "
                               "than the published round R (an upgraded prior) first archives R under "
                               "participants/NAME/rounds/R/; a lower one is refused. merge uses each "
                               "participant's latest round"),
    seed: int = o.seed("a checkpoint-less prior's random initialisation"),
    decoder: o.Decoder = typer.Option("auto", "--decoder", help="auto: the faster one measured for this input"),
    compile: bool = o.compile_flag(),
    on_bad_image: o.OnBadImage = typer.Option("fail", "--on-bad-image", help="fail: name the file and stop; skip: "
                                               "record it and write a zero row"),
    workers: int = typer.Option(None, "--workers", metavar="N", help="decode threads/processes (default: min(4, cores))"),
    workspace: str = typer.Option(None, "--workspace", metavar="DIR", help="your own folder for features.h5 (default: "
                                  "RUN/participants/NAME); the run receives only record.json"),
    quiet: bool = o.quiet_flag(),
    json_out: bool = o.json_flag(),
):
    """Step 2 of 5, each participant: features of its shard and of S -> WORKSPACE/features.h5; its record published.

    The record (round, shard, prior, scores on S, the features' sha256) goes to
    RUN/participants/NAME/record.json; the features stay in the workspace.

    Interrupted (even by kill -9) and rerun with the same options, it resumes at the last
    written batch and ends with the same values as an uninterrupted run. Under
    `torchrun --nproc_per_node=G -m coopt_fast extract ...` the shard is split across ranks
    and stitched into the one features.h5. With a higher --round the previous round moves to
    participants/NAME/rounds/R/ first (rerun to finish an interrupted move); realign after it.
    """
    s = coopt_fast.extract(run, participant, shard, prior, batch_size=batch_size, device=device, round=round_,
                           seed=seed, decoder=decoder, compile=compile, on_bad_image=on_bad_image, workers=workers,
                           progress=not quiet, workspace=workspace)
    emit(s, json_out, kv_table(f"extract {participant}", s, (
        "prior", "round", "archived", "rows", "shared_rows", "skipped_images", "feature_dim", "uniformity", "decoder",
        "seconds", "compile_seconds", "model_seconds", "resumed", "skipped"), ".4f"))
