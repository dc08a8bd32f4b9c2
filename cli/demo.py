import math

import typer
from rich.table import Table

from coopt_fast.demo import DemoConfig, demo as run_demo  # demo.py is torch-free at import

from . import options as o
from .app import command, console, emit

_D = DemoConfig()


@command
def demo(
    out: str = o.out("folder for the run (OUT/run), checkpoints, logs and summary.json", _D.out),
    limit: int = typer.Option(_D.limit, "--limit", metavar="N", help="use the first N samples of Fashion-MNIST train as D (60000 = all)"),
    participants: int = typer.Option(_D.participants, "--participants", "-k", metavar="K", help="K, the number of participants (one shard each)"),
    priors: str = typer.Option(_D.priors, "--priors", metavar="KINDS", help="one kind per participant: supervised, byol, simclr, weak, random, labels"),
    dim: int = typer.Option(_D.dim, "--dim", metavar="N", help="n, the common target dimension"),
    student_epochs: int = typer.Option(_D.student_epochs, "--student-epochs", metavar="N"),
    probe_train: int = typer.Option(_D.probe_train, "--limit-train", metavar="N", help="the probes are fit on the first N labelled train images"),
    probe_test: int = typer.Option(_D.probe_test, "--limit-test", metavar="N", help="the probes are scored on the first N test images (10000 = all)"),
    device: str = o.device(),
    seed: int = o.seed("the split, the priors (participant i's random prior: seed + i), the student and the baseline", _D.seed),
    quiet: bool = o.quiet_flag(),
    json_out: bool = o.json_flag(),
):
    """The whole COOPT story on Fashion-MNIST: priors, split among K participants, parallel
    extraction, score, align, merge, student training and probes, against BYOL trained for
    the same wall-clock. Default size: under 10 minutes on 2 CPU cores; --limit 60000 for all."""
    cfg = DemoConfig(out=out, limit=limit, participants=participants, priors=priors, dim=dim,
                     student_epochs=student_epochs, probe_train=probe_train, probe_test=probe_test,
                     device=device, seed=seed)
    s = run_demo(cfg, progress=not quiet)
    g = s["inconsistency"]
    ref = "the consensus of all" if s["reference"] == "consensus" else "* = reference"
    parts = Table(title=f"participants, aligned to {ref}; target inconsistency G (two-sample TV lower bound) "
                        f"{g['before']:.3f} before alignment, {g['after']:.3f} after")
    for c in ("participant", "prior", "dim", "U on S", "residual"):
        parts.add_column(c)
    for r in s["participants"]:
        parts.add_row(r["participant"] + (" *" if r["reference"] else ""), r["prior"].split("/")[-1], str(r["feature_dim"]),
                      f"{r['uniformity']:.3f}", f"{r['residual']:.3f}")
    res = Table(title="student on COOPT targets vs BYOL, same architecture, same wall-clock")
    for c in ("model", "linear probe", "kNN (k=20)", "seconds"):
        res.add_column(c, justify="right" if c != "model" else "left")
    st, bl = s["student"], s["baseline"]
    res.add_row("COOPT student", f"{st['probe_accuracy']:.2%}", f"{st['knn_accuracy']:.2%}", f"{st['seconds']:.0f}")
    res.add_row("BYOL baseline", f"{bl['probe_accuracy']:.2%}", f"{bl['knn_accuracy']:.2%}", f"{bl['seconds']:.0f}")
    steps = Table(title="time of every step")
    steps.add_column("step")
    steps.add_column("seconds", justify="right")
    for k, v in s["seconds"].items():
        steps.add_row(k, f"{v:.1f}")
    if json_out:
        emit({k: s[k] for k in ("participants", "inconsistency", "student", "baseline", "seconds", "run")}, True)
        return
    console.print(parts)
    console.print(res)
    # A verdict only outside the probe's sampling noise: 2 standard errors of the difference of two
    # accuracies on probe_test images (binomial), about 2.3 points at 2,000 images and 85%.
    a, b = st["probe_accuracy"], bl["probe_accuracy"]
    noise = 2 * math.sqrt((a * (1 - a) + b * (1 - b)) / cfg.probe_test)
    verdict = "beat" if a - b > noise else "fell short of" if b - a > noise else "matched (within noise)"
    console.print(f"[bold]COOPT {verdict} BYOL at equal time: linear probe {a:.2%} vs {b:.2%} "
                  f"(±{noise:.1%} is noise at {cfg.probe_test} test images).[/]")
    console.print(steps)
    console.print(f"The run is [bold]{s['run']}[/] (coopt-fast status/score/inspect/verify {s['run']}); the "
                  f"student is in {s['student_dir']}, the targets' picture in {s['inspect_png']}.")
