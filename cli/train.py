import typer
from rich.table import Table

from coopt_fast.configs import TrainConfig

from coopt_fast.errors import CooptError

from .app import command, emit


def parse_resident(value: str) -> bool | None:
    choices = {"auto": None, "yes": True, "no": False}
    if value not in choices:
        raise CooptError(f"--store-on-device {value!r}: use auto, yes or no")
    return choices[value]

_D = TrainConfig(run="")


@command
def train(
    run: str = typer.Argument(..., help="run folder holding merged.h5 (or the path of a merged .h5)"),
    student: str = typer.Option(_D.student, "--student", help="convnet, linear (trivial, for measuring) or a torchvision classifier (resnet18, ...)"),
    epochs: int = typer.Option(_D.epochs, "--epochs"),
    out: str = typer.Option(..., "-o", "--out", help="output folder: student.pt, state.pt, train.jsonl, curve.png"),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size"),
    lr: float = typer.Option(_D.lr, "--lr", help="AdamW peak learning rate (warmup, then cosine)"),
    wd: float = typer.Option(_D.wd, "--wd", help="AdamW weight decay (not on norms and biases)"),
    seed: int = typer.Option(_D.seed, "--seed", help="seeds the student's initialisation (backbone and head), the data order and the augmentations"),
    input_size: int = typer.Option(None, "--input-size", help="default: convnet the image side rounded up to 32, others 224"),
    max_seconds: float = typer.Option(None, "--max-seconds", help="wall-clock budget: stop after the step that exceeds it"),
    max_steps: int = typer.Option(None, "--max-steps", help="stop after this many optimizer steps"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/state.pt"),
    force: bool = typer.Option(False, "--force", help="start over in an OUT that already holds a run (its "
                               "student.pt, state.pt, log and snapshots are removed; without it: refused)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="torch.compile on CUDA"),
    store_on_device: str = typer.Option("auto", "--store-on-device", help="CUDA: keep the merged store in GPU memory "
                                        "(yes), stream it through pinned buffers (no), or yes when it takes under half "
                                        "the free GPU memory (auto); on the CPU, yes copies it into RAM"),
    snapshots: int = typer.Option(0, "--snapshots", help="also save N copies of the backbone at evenly spaced "
                                  "points of training (for accuracy-vs-time curves; the last one is the final model)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    json_out: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
):
    """Train a student to regress the merged targets (cosine loss, z-scored targets, AdamW).

    Reads RUN/merged.h5 through the memory-mapped loader; writes OUT/student.pt (the backbone,
    usable by `probe` and as `extract --prior ARCH:OUT/student.pt`) every epoch, OUT/state.pt
    for --resume (bitwise-exact on the CPU), OUT/train.jsonl and OUT/curve.png.
    """
    from coopt_fast.student import train as run_train  # imports torch: only when the command runs

    s = run_train(run, student, epochs, out, batch_size=batch_size, lr=lr, wd=wd, seed=seed, input_size=input_size,
                  max_seconds=max_seconds, max_steps=max_steps, resume=resume, force=force, device=device, compile=compile,
                  resident=parse_resident(store_on_device), snapshots=snapshots, progress=not quiet)
    t = Table(title=f"train {student}")
    for k in ("checkpoint", "rows", "target_dim", "input_size", "device", "compiled", "epochs", "steps", "stopped",
              "store_on_device", "resumed", "trained_now", "loss", "seconds", "train_seconds", "samples_per_s"):
        t.add_row(k, f"{s[k]:.4g}" if isinstance(s[k], float) else str(s[k]))
    emit(s, json_out, t)
