import typer
from rich.table import Table

from coopt_fast.configs import ProbeConfig

from .app import command, emit

_D = ProbeConfig()


@command
def probe(
    ckpt: str = typer.Argument(..., help="checkpoint from train/pretrain, ARCH:CHECKPOINT, or ARCH (random init)"),
    train: str = typer.Option("fashion-mnist", "--train", help="labelled data set spec the classifiers are fit on"),
    test: str = typer.Option("fashion-mnist:test", "--test", help="labelled data set spec they are scored on"),
    arch: str = typer.Option(None, "--arch", help="architecture, when the checkpoint does not record it"),
    limit_train: int = typer.Option(None, "--limit-train", help="first N train samples only"),
    limit_test: int = typer.Option(None, "--limit-test", help="first N test samples only"),
    epochs: int = typer.Option(_D.epochs, "--epochs", help="linear probe epochs"),
    k: int = typer.Option(_D.k, "--k", help="kNN neighbours"),
    seed: int = typer.Option(_D.seed, "--seed", help="seeds the linear probe's shuffle order (its problem is convex: no init seed matters)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    json_out: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
):
    """Linear-probe and weighted-kNN accuracy of a backbone's frozen features.

    Features are computed once. Linear probe: standardised features, SGD momentum 0.9, lr 0.1,
    cosine decay, batch 512, 100 epochs (>= 1000 steps). kNN: k=20, cosine, weights exp(sim/0.07).
    """
    from coopt_fast.evaluate import probe as run_probe  # imports torch: only when the command runs

    s = run_probe(ckpt, train, test, arch=arch, limit_train=limit_train, limit_test=limit_test, device=device,
                  progress=not quiet, epochs=epochs, k=k, seed=seed)
    t = Table(title=f"probe {ckpt}")
    for key in ("arch", "method", "dim", "n_train", "n_test", "probe_accuracy", "knn_accuracy", "seconds"):
        t.add_row(key, f"{s[key]:.4f}" if isinstance(s[key], float) else str(s[key]))
    emit(s, json_out, t)
