"""`coopt-fast demo`: the paper's story end to end on Fashion-MNIST, sized for a 2-core CPU.

1. priors: participants' prior models of different kinds, trained here (or reused from
   OUT/checkpoints): supervised on a small labelled fraction, BYOL, a weak early checkpoint,
   a random network, human labels.
2. data side: split D among K participants; their extractions run as parallel processes
   (sharing the run folder as separate machines would); score, align, merge, inspect.
3. student: trained on the merged targets, then probed (linear + kNN on frozen features).
4. baseline: the same student architecture trained with BYOL on the same images for the same
   wall-clock as COOPT's data optimisation + student training, then probed the same way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import CooptError

PRIOR_KINDS = ("supervised", "byol", "simclr", "weak", "random", "labels")


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    limit: int = 8000                 # samples of Fashion-MNIST train in D; 60000 = all of it
    participants: int = 4
    priors: str = "supervised,byol,weak,random"  # one kind per participant, from PRIOR_KINDS
    shared_fraction: float = 0.05     # |S| = 400 at the default size
    dim: int = 256                    # n, the common target dimension
    arch: str = "convnet"             # priors' and student's architecture
    # Priors stand for models their owners already have (pretrained elsewhere, as in the paper):
    # their training is cached and not part of COOPT's time. Each sees its own 4,000 images.
    prior_limit: int = 4000
    labeled_fraction: float = 0.25    # of prior_limit: the supervised participant's 1,000 labels
    prior_epochs: int = 10            # supervised prior; the weak prior gets 1 epoch on a tenth
    byol_prior_epochs: int = 4
    student_epochs: int = 3
    batch_size: int = 128
    probe_train: int = 10000          # labelled train images for the probes
    probe_test: int = 2000            # test images for the probes
    device: str = "auto"
    seed: int = 0


def _kinds(cfg: DemoConfig) -> list[str]:
    kinds = [k.strip() for k in cfg.priors.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in PRIOR_KINDS]
    if unknown:
        raise CooptError(f"--priors: unknown kind(s) {unknown} (use {', '.join(PRIOR_KINDS)})")
    if len(kinds) != cfg.participants:
        raise CooptError(f"--priors names {len(kinds)} kinds for {cfg.participants} participants")
    return kinds


def check_config(cfg: DemoConfig) -> None:
    """Every option, before anything is trained or written: a bad one found after minutes of
    prior training (or after the previous run was removed) costs the user both."""
    from .student import MAX_SEED, resolve_device  # the demo's seed also seeds pretrain and train

    resolve_device(cfg.device)
    for flag, v in (("--participants", cfg.participants), ("--limit", cfg.limit), ("--dim", cfg.dim),
                    ("--student-epochs", cfg.student_epochs), ("--limit-train", cfg.probe_train),
                    ("--limit-test", cfg.probe_test)):
        if v < 1:
            raise CooptError(f"{flag} must be >= 1, got {v}")
    if cfg.participants > cfg.limit:
        raise CooptError(f"--participants {cfg.participants} is larger than --limit {cfg.limit}")
    if not 0 <= cfg.seed <= MAX_SEED - cfg.participants:  # participant i's random prior uses seed + i
        raise CooptError(f"--seed {cfg.seed}: must be an integer in [0, {MAX_SEED - cfg.participants}]")
    _kinds(cfg)


def _prior_specs(cfg: DemoConfig, ckpts: Path, timed) -> list[tuple[str, str, int]]:
    """(participant, prior spec, seed) per participant; trains the checkpoints it needs once."""
    from .ssl import pretrain

    kinds = _kinds(cfg)
    common = dict(batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device, progress=False)
    recipes = {  # kind -> (method, epochs, extra pretrain options)
        "supervised": ("supervised", cfg.prior_epochs, dict(limit=cfg.prior_limit, labeled_fraction=cfg.labeled_fraction)),
        "weak": ("supervised", 1, dict(limit=cfg.prior_limit, labeled_fraction=cfg.labeled_fraction / 10)),
        "byol": ("byol", cfg.byol_prior_epochs, dict(limit=cfg.prior_limit)),
        "simclr": ("simclr", cfg.byol_prior_epochs, dict(limit=cfg.prior_limit)),
    }
    specs = []
    for i, kind in enumerate(kinds):
        name = f"p{i}-{kind}"
        if kind == "labels":
            specs.append((name, "labels", 0))
        elif kind == "random":
            specs.append((name, cfg.arch, cfg.seed + i))
        else:
            method, epochs, extra = recipes[kind]
            path = ckpts / f"{kind}-{cfg.arch}-e{epochs}-n{extra['limit']}-s{cfg.seed}.safetensors"
            if not path.exists():  # cached across demo runs: the participants' models exist beforehand
                timed(f"pretrain {kind} prior", pretrain, "fashion-mnist", method=method, arch=cfg.arch,
                      epochs=epochs, out=path, **extra, **common)
            specs.append((name, f"{cfg.arch}:{path}", cfg.seed))
    return specs


def _extract_in_parallel(run: Path, jobs: list[tuple[str, int, str, int]], log_dir: Path, device: str) -> None:
    """One OS process per participant; threads split evenly so they don't oversubscribe cores."""
    threads = max(1, (os.cpu_count() or 1) // len(jobs))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = []
    for name, shard, prior, seed in jobs:
        cmd = [sys.executable, "-m", "coopt_fast", "extract", str(run), "--participant", name, "--shard", str(shard),
               "--prior", prior, "--seed", str(seed), "--device", device, "--workers", "1", "--quiet", "--json"]
        log = open(log_dir / f"extract-{name}.log", "w")
        procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    failed = []
    for name, p, log in procs:
        p.wait()
        log.close()
        if p.returncode != 0:
            failed.append(f"{name} (exit {p.returncode}, see {log_dir / f'extract-{name}.log'})")
    if failed:
        raise CooptError("extraction failed for " + ", ".join(failed))


def _config(cfg: DemoConfig | None, options: dict) -> DemoConfig:
    if cfg is None:
        return DemoConfig(**options)
    if options:
        raise TypeError(f"demo: pass either cfg or keyword options, not both ({', '.join(options)})")
    return cfg


def _folders(cfg: DemoConfig) -> tuple[Path, Path, Path, Path]:
    """OUT, OUT/run (started afresh: a demo run begins from a new plan), OUT/checkpoints (prior
    checkpoints stay cached), OUT/logs."""
    out = Path(cfg.out)
    run, ckpts, logs = out / "run", out / "checkpoints", out / "logs"
    for d in (ckpts, logs):
        d.mkdir(parents=True, exist_ok=True)
    if run.exists():
        import shutil

        shutil.rmtree(run)
    return out, run, ckpts, logs


def demo(cfg: DemoConfig | None = None, progress: bool = True, **options) -> dict:
    """The whole COOPT story on Fashion-MNIST (what `coopt-fast demo` runs); see the module doc.

    Args:
        cfg: every setting as a DemoConfig; or leave it None and pass DemoConfig's fields as
            keyword `options` (out="runs/demo", limit=8000, participants=4, priors=..., dim=256,
            student_epochs=3, probe_train=10000, probe_test=2000, device="auto", seed=0, ...).
        progress: progress bars (or plain lines without a terminal) on stderr.

    Returns:
        The summary also written to OUT/summary.json: "participants" (prior, U on S, residual),
        "inconsistency" (G before/after), "student" and "baseline" (probe and kNN accuracy,
        seconds), "seconds" per step, "run" (the run folder, OUT/run), "student_dir",
        "inspect_png".

    Raises:
        CooptError: a bad option (checked before any work; the previous OUT/run survives) or a
            failing step. TypeError: an unknown option name.
    """
    cfg = _config(cfg, options)
    from .align import align  # the steps, imported when the demo runs (not for --help)
    from .diagnostics import inspect
    from .evaluate import probe
    from .merge import merge
    from .plan import split
    from .ranking import score
    from .ssl import pretrain
    from .student import train

    check_config(cfg)
    out, run, ckpts, logs = _folders(cfg)
    seconds: dict[str, float] = {}

    def timed(step, fn, *a, **kw):
        t0 = time.perf_counter()
        r = fn(*a, **kw)
        seconds[step] = round(time.perf_counter() - t0, 2)
        return r

    specs = _prior_specs(cfg, ckpts, timed)
    timed("split", split, "fashion-mnist", run, participants=cfg.participants, shared_fraction=cfg.shared_fraction,
          seed=cfg.seed, limit=cfg.limit)
    timed("extract", _extract_in_parallel, run, [(nm, k, p, sd) for k, (nm, p, sd) in enumerate(specs)], logs, cfg.device)
    timed("score", score, run)
    al = timed("align", align, run, dim=cfg.dim, progress=progress)
    timed("merge", merge, run, progress=progress)
    ins = timed("inspect", inspect, run)
    st = timed("train student", train, run, student=cfg.arch, epochs=cfg.student_epochs, out=out / "student",
               batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device, progress=progress,
               force=True)  # a second demo retrains its student
    coopt_seconds = sum(seconds[k] for k in ("extract", "score", "align", "merge", "train student"))
    bl = timed("train BYOL baseline", pretrain, "fashion-mnist", method="byol", arch=cfg.arch, epochs=1000,
               out=out / "baseline" / "byol.safetensors", limit=cfg.limit, max_seconds=coopt_seconds,
               batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device, progress=progress,
               force=True)  # a second demo retrains its baseline too
    probe_kw = dict(limit_train=cfg.probe_train, limit_test=cfg.probe_test, device=cfg.device, progress=progress)
    p_st = timed("probe student", probe, st["checkpoint"], "fashion-mnist", "fashion-mnist:test", **probe_kw)
    p_bl = timed("probe baseline", probe, bl["checkpoint"], "fashion-mnist", "fashion-mnist:test", **probe_kw)
    summary = {
        "participants": ins["participants"],
        "reference": al["reference"],
        "inconsistency": ins["inconsistency"],
        "student": {"probe_accuracy": p_st["probe_accuracy"], "knn_accuracy": p_st["knn_accuracy"],
                    "seconds": round(coopt_seconds, 2), "epochs": st["epochs"]},
        "baseline": {"method": "byol", "probe_accuracy": p_bl["probe_accuracy"], "knn_accuracy": p_bl["knn_accuracy"],
                     "seconds": round(bl["seconds"], 2), "epochs": bl["epochs"], "steps": bl["steps"]},
        "seconds": seconds,
        "config": asdict(cfg),
        "run": str(run), "student_dir": str(out / "student"), "inspect_png": str(run / "inspect.png"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
