import typer
from rich.table import Table

import coopt_fast

from .app import command, emit


@command
def extract(
    run: str = typer.Argument(..., help="run folder made by split"),
    participant: str = typer.Option(..., "--participant", help="your name (letters, digits, _ . -)"),
    shard: int = typer.Option(..., "--shard", help="which shard of the plan is yours (one participant per shard)"),
    prior: str = typer.Option(..., "--prior", help="ARCH, ARCH:CHECKPOINT (.pt/.pth/.safetensors) or labels"),
    batch_size: int = typer.Option(256, "--batch-size"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ... or auto (cuda if present)"),
    round_: int = typer.Option(0, "--round", help="collaboration round (>= 0), recorded in the file. A round higher "
                               "than the published round R (an upgraded prior) first archives R under "
                               "participants/NAME/rounds/R/; a lower one is refused. merge uses each "
                               "participant's latest round"),
    seed: int = typer.Option(0, "--seed", help="seeds a checkpoint-less prior's random initialisation"),
    decoder: str = typer.Option("auto", "--decoder", help="dali | torchvision | auto (the faster one measured for this input)"),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the prior (compile time reported apart)"),
    on_bad_image: str = typer.Option("fail", "--on-bad-image", help="fail (name the file) | skip (record it, zero row)"),
    workers: int = typer.Option(None, "--workers", help="decode threads/processes (default: min(4, cores))"),
    workspace: str = typer.Option(None, "--workspace", help="your own folder for features.h5 (default: "
                                  "RUN/participants/NAME); the run receives only record.json"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    json_out: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
):
    """Step 2a: features of your shard and of S with your prior -> WORKSPACE/features.h5, and your
    record (round, shard, prior, scores on S) published to RUN/participants/NAME/record.json.

    Interrupted (even by kill -9) and rerun with the same options, it resumes at the last
    written batch and ends with the same values as an uninterrupted run. Under
    `torchrun --nproc_per_node=G -m coopt_fast extract ...` the shard is split across ranks
    and stitched into the one features.h5. With a higher --round the previous round moves to
    participants/NAME/rounds/R/ first (rerun to finish an interrupted move); realign after it.
    """
    s = coopt_fast.extract(run, participant, shard, prior, batch_size=batch_size, device=device, round=round_,
                           seed=seed, decoder=decoder, compile=compile, on_bad_image=on_bad_image, workers=workers,
                           progress=not quiet, workspace=workspace)
    t = Table(title=f"extract {participant}")
    for k in ("prior", "round", "archived", "rows", "shared_rows", "skipped_images", "feature_dim", "uniformity",
              "decoder", "seconds", "compile_seconds", "model_seconds", "resumed", "skipped"):
        t.add_row(k, f"{s[k]:.4f}" if isinstance(s[k], float) else str(s[k]))
    emit(s, json_out, t)
