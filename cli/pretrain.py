import typer

from coopt_fast.configs import PretrainConfig

from . import options as o
from .app import command, emit, kv_table

_D = PretrainConfig(dataset="")


@command
def pretrain(
    dataset: str = typer.Argument(..., help="data set spec: fashion-mnist, folder:PATH, npy:IMAGES.npy[,LABELS.npy]"),
    method: o.Method = typer.Option(_D.method, "--method", help="supervised: cross-entropy on the labels; byol, simclr: self-supervised"),
    arch: str = typer.Option(_D.arch, "--arch", metavar="ARCH", help="convnet or a torchvision classifier (resnet18, ...)"),
    epochs: int = typer.Option(_D.epochs, "--epochs", metavar="N"),
    out: str = o.out("backbone checkpoint to write (.pt or .safetensors)"),
    batch_size: int = o.batch_size(_D.batch_size, "samples per step; under torchrun the global batch, split "
                                   "evenly over the ranks"),
    lr: float = typer.Option(_D.lr, "--lr", metavar="LR", help="AdamW peak learning rate (warmup, then cosine)"),
    wd: float = typer.Option(None, "--wd", metavar="WD", help="weight decay (default: 0.01 supervised, 1e-4 byol/simclr)"),
    labeled_fraction: float = typer.Option(_D.labeled_fraction, "--labeled-fraction", metavar="F",
                                           help="supervised: train on this random fraction of the labels"),
    seed: int = o.seed("the network's initialisation, the data order and the augmentations", _D.seed),
    limit: int = o.limit("DATASET"),
    input_size: int = typer.Option(None, "--input-size", metavar="PX", help="default: convnet 32 (image side rounded up to 32), others 224"),
    max_seconds: float = typer.Option(None, "--max-seconds", metavar="SECONDS", help="wall-clock budget: stop after the step that exceeds it"),
    max_steps: int = typer.Option(None, "--max-steps", metavar="N", help="stop after this many optimizer steps"),
    resume: bool = o.flag("--resume", "continue from OUT.state.pt"),
    force: bool = o.flag("--force", "start over, replacing the run OUT holds (without it an OUT "
                               "that holds a started or finished run is refused)"),
    device: str = o.device(),
    compile: bool = o.compile_flag(),
    snapshots: int = typer.Option(0, "--snapshots", metavar="N", help="also save N copies of the backbone at evenly spaced "
                                  "points of training (for accuracy-vs-time curves; the last one is the final model)"),
    quiet: bool = o.quiet_flag(),
    json_out: bool = o.json_flag(),
):
    """Before split: pretrain a prior model / SSL baseline: supervised (cross-entropy), BYOL or SimCLR.

    Writes OUT (the backbone, usable as `extract --prior ARCH:OUT` and by `probe`) every epoch,
    with OUT.state.pt for --resume and OUT.log.jsonl (loss, seconds, samples/s per epoch).
    """
    from coopt_fast.ssl import pretrain as run_pretrain  # imports torch: only when the command runs
    from coopt_fast.distributed import world

    s = run_pretrain(dataset, method, arch, epochs, out, batch_size=batch_size, lr=lr, wd=wd,
                     labeled_fraction=labeled_fraction, seed=seed, limit=limit, input_size=input_size,
                     max_seconds=max_seconds, max_steps=max_steps, resume=resume, force=force, device=device,
                     compile=compile, snapshots=snapshots, progress=not quiet)
    if world().main:  # torchrun: one summary, rank 0's
        emit(s, json_out, kv_table(f"pretrain {method} {arch}", s, (
            "checkpoint", "samples", "input_size", "device", "epochs", "steps", "stopped", "resumed", "world_size",
            "loss", "seconds", "samples_per_s")))
