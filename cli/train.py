import typer

from coopt_fast.configs import TrainConfig

from coopt_fast.errors import CooptError

from . import options as o
from .app import command, emit, kv_table


def parse_resident(value: str) -> bool | None:
    """--store-on-device auto|yes|no -> the API's store_on_device None|True|False."""
    choices = {"auto": None, "yes": True, "no": False}
    if value not in choices:
        raise CooptError(f"--store-on-device {value!r}: use auto, yes or no")
    return choices[value]

_D = TrainConfig(run="")


@command
def train(
    run: str = typer.Argument(..., help="run folder holding merged.h5 (or the path of a merged .h5)"),
    student: str = typer.Option(_D.student, "--student", metavar="ARCH", help="convnet, linear (trivial, for measuring) or a torchvision classifier (resnet18, ...)"),
    epochs: int = typer.Option(_D.epochs, "--epochs", metavar="N"),
    out: str = o.out("output folder: student.pt, state.pt, train.jsonl, curve.png"),
    batch_size: int = o.batch_size(_D.batch_size, "samples per step; under torchrun the global batch, split "
                                   "evenly over the ranks"),
    lr: float = typer.Option(_D.lr, "--lr", metavar="LR", help="AdamW peak learning rate (warmup, then cosine)"),
    wd: float = typer.Option(_D.wd, "--wd", metavar="WD", help="AdamW weight decay (not on norms and biases)"),
    seed: int = o.seed("the student's initialisation (backbone and head), the data order and the augmentations", _D.seed),
    input_size: int = typer.Option(None, "--input-size", metavar="PX", help="default: convnet the image side rounded up to 32, others 224"),
    max_seconds: float = typer.Option(None, "--max-seconds", metavar="SECONDS", help="wall-clock budget: stop after the step that exceeds it"),
    max_steps: int = typer.Option(None, "--max-steps", metavar="N", help="stop after this many optimizer steps"),
    resume: bool = o.flag("--resume", "continue from OUT/state.pt"),
    force: bool = o.flag("--force", "start over in an OUT that already holds a run (its "
                               "student.pt, state.pt, log and snapshots are removed; without it: refused)"),
    device: str = o.device(),
    compile: bool = o.compile_flag(),
    store_on_device: o.AutoYesNo = typer.Option("auto", "--store-on-device", help="CUDA: keep the merged store in GPU memory "
                                        "(yes), stream it through pinned buffers (no), or yes when it takes under half "
                                        "the free GPU memory (auto); on the CPU, yes copies it into RAM"),
    snapshots: int = typer.Option(0, "--snapshots", metavar="N", help="also save N copies of the backbone at evenly spaced "
                                  "points of training (for accuracy-vs-time curves; the last one is the final model)"),
    quiet: bool = o.quiet_flag(),
    json_out: bool = o.json_flag(),
):
    """After merge: train a student to regress the merged targets (cosine loss, z-scored targets, AdamW).

    Reads RUN/merged.h5 through the memory-mapped loader; writes OUT/student.pt (the backbone,
    usable by `probe` and as `extract --prior ARCH:OUT/student.pt`) every epoch, OUT/state.pt
    for --resume (bitwise-exact on the CPU), OUT/train.jsonl and OUT/curve.png.
    """
    from coopt_fast.student import train as run_train  # imports torch: only when the command runs
    from coopt_fast.distributed import world

    s = run_train(run, student, epochs, out, batch_size=batch_size, lr=lr, wd=wd, seed=seed, input_size=input_size,
                  max_seconds=max_seconds, max_steps=max_steps, resume=resume, force=force, device=device, compile=compile,
                  store_on_device=parse_resident(store_on_device), snapshots=snapshots, progress=not quiet)
    if world().main:  # torchrun: one summary, rank 0's
        emit(s, json_out, kv_table(f"train {student}", s, (
            "checkpoint", "rows", "target_dim", "input_size", "device", "compiled", "epochs", "steps", "stopped",
            "store_on_device", "resumed", "trained_now", "world_size", "loss", "seconds", "train_seconds",
            "samples_per_s")))
