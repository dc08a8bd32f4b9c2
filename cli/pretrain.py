import typer
from rich.table import Table

from coopt_fast.configs import PretrainConfig

from .app import command, emit

_D = PretrainConfig(dataset="")


@command
def pretrain(
    dataset: str = typer.Argument(..., help="data set spec: fashion-mnist, folder:PATH, npy:IMAGES.npy[,LABELS.npy]"),
    method: str = typer.Option(_D.method, "--method", help="supervised | byol | simclr"),
    arch: str = typer.Option(_D.arch, "--arch", help="convnet or a torchvision classifier (resnet18, ...)"),
    epochs: int = typer.Option(_D.epochs, "--epochs"),
    out: str = typer.Option(..., "-o", "--out", help="backbone checkpoint to write (.pt or .safetensors)"),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size"),
    lr: float = typer.Option(_D.lr, "--lr", help="AdamW peak learning rate (warmup, then cosine)"),
    wd: float = typer.Option(None, "--wd", help="weight decay (default: 0.01 supervised, 1e-4 byol/simclr)"),
    labeled_fraction: float = typer.Option(_D.labeled_fraction, "--labeled-fraction",
                                           help="supervised: train on this random fraction of the labels"),
    seed: int = typer.Option(_D.seed, "--seed", help="seeds the network's initialisation, the data order and the augmentations"),
    limit: int = typer.Option(None, "--limit", help="use the first N samples only"),
    input_size: int = typer.Option(None, "--input-size", help="default: convnet 32 (image side rounded up to 32), others 224"),
    max_seconds: float = typer.Option(None, "--max-seconds", help="wall-clock budget: stop after the step that exceeds it"),
    max_steps: int = typer.Option(None, "--max-steps", help="stop after this many optimizer steps"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT.state.pt"),
    force: bool = typer.Option(False, "--force", help="start over, replacing the run OUT holds (without it an OUT "
                               "that holds a started or finished run is refused)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="torch.compile on CUDA"),
    snapshots: int = typer.Option(0, "--snapshots", help="also save N copies of the backbone at evenly spaced "
                                  "points of training (for accuracy-vs-time curves; the last one is the final model)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    json_out: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
):
    """Pretrain a prior model / SSL baseline: supervised (cross-entropy), BYOL or SimCLR.

    Writes OUT (the backbone, usable as `extract --prior ARCH:OUT` and by `probe`) every epoch,
    with OUT.state.pt for --resume and OUT.log.jsonl (loss, seconds, samples/s per epoch).
    """
    from coopt_fast.ssl import pretrain as run_pretrain  # imports torch: only when the command runs

    s = run_pretrain(dataset, method, arch, epochs, out, batch_size=batch_size, lr=lr, wd=wd,
                     labeled_fraction=labeled_fraction, seed=seed, limit=limit, input_size=input_size,
                     max_seconds=max_seconds, max_steps=max_steps, resume=resume, force=force, device=device,
                     compile=compile, snapshots=snapshots, progress=not quiet)
    t = Table(title=f"pretrain {method} {arch}")
    for k in ("checkpoint", "samples", "input_size", "device", "epochs", "steps", "stopped", "resumed",
              "loss", "seconds", "samples_per_s"):
        t.add_row(k, f"{s[k]:.4g}" if isinstance(s[k], float) else str(s[k]))
    emit(s, json_out, t)
