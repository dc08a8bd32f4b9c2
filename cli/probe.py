import typer

from coopt_fast.configs import ProbeConfig

from . import options as o
from .app import command, emit, kv_table

_D = ProbeConfig()


@command
def probe(
    ckpt: str = typer.Argument(..., help="checkpoint from train/pretrain, ARCH:CHECKPOINT, or ARCH (random init)"),
    train: str = typer.Option("fashion-mnist", "--train", metavar="DATASET", help="labelled data set spec the classifiers are fit on"),
    test: str = typer.Option("fashion-mnist:test", "--test", metavar="DATASET", help="labelled data set spec they are scored on"),
    arch: str = typer.Option(None, "--arch", metavar="ARCH", help="architecture, when the checkpoint does not record it"),
    limit_train: int = o.limit("--train", "--limit-train"),
    limit_test: int = o.limit("--test", "--limit-test"),
    epochs: int = typer.Option(_D.epochs, "--epochs", metavar="N", help="linear probe epochs"),
    k: int = typer.Option(_D.k, "--neighbours", help="k of the weighted kNN classifier", metavar="K"),
    seed: int = o.seed("the linear probe's shuffle order (its problem is convex: no init seed matters)", _D.seed),
    device: str = o.device(),
    quiet: bool = o.quiet_flag(),
    json_out: bool = o.json_flag(),
):
    """Evaluation: linear-probe and weighted-kNN accuracy of a backbone's frozen features.

    Features are computed once. Linear probe: standardised features, SGD momentum 0.9, lr 0.1,
    cosine decay, batch 512, 100 epochs (>= 1000 steps). kNN: k=20, cosine, weights exp(sim/0.07).
    """
    from coopt_fast.evaluate import probe as run_probe  # imports torch: only when the command runs

    s = run_probe(ckpt, train, test, arch=arch, limit_train=limit_train, limit_test=limit_test, device=device,
                  progress=not quiet, epochs=epochs, k=k, seed=seed)
    emit(s, json_out, kv_table(f"probe {ckpt}", s, (
        "arch", "method", "dim", "n_train", "n_test", "probe_accuracy", "knn_accuracy", "seconds"), ".4f"))
