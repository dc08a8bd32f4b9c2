"""`coopt-fast demo`: the paper's story end to end on Fashion-MNIST, sized for a 2-core CPU.

Data side: split among K=4 participants with heterogeneous priors, their extractions run as
parallel processes (each sharing the run folder, as separate machines would), then score,
align, merge and inspect.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .align import align, score
from .diagnostics import inspect
from .errors import CooptError
from .merge import merge
from .plan import split


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    dataset: str = "fashion-mnist"
    limit: int = 8000               # samples in D; 60000 = the full training set
    participants: int = 4
    shared_fraction: float = 0.05   # |S| = 400 at the default size
    dim: int = 256                  # n, the common target dimension
    seed: int = 0


def _priors(cfg: DemoConfig, ckpt_dir: Path) -> list[tuple[str, str, int]]:
    """(participant, prior spec, seed) for K participants: the kinds of prior the paper mixes."""
    kinds = [("labeler", "labels", 0), ("random", "convnet", 0), ("random2", "convnet", 1), ("random3", "convnet", 2)]
    return kinds[: cfg.participants]


def _extract_in_parallel(run: Path, jobs: list[tuple[str, int, str, int]], log_dir: Path) -> None:
    """One OS process per participant; threads split evenly so they don't oversubscribe cores."""
    threads = max(1, (os.cpu_count() or 1) // len(jobs))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = []
    for name, shard, prior, seed in jobs:
        cmd = [sys.executable, "-m", "coopt_fast", "extract", str(run), "--participant", name, "--shard", str(shard),
               "--prior", prior, "--seed", str(seed), "--quiet", "--json"]
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


def demo(cfg: DemoConfig, progress: bool = True) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    run, ckpts, logs = out / "run", out / "checkpoints", out / "logs"
    for d in (ckpts, logs):
        d.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(step, fn, *a, **kw):
        t0 = time.perf_counter()
        r = fn(*a, **kw)
        seconds[step] = round(time.perf_counter() - t0, 2)
        return r

    priors = _priors(cfg, ckpts)
    if len(priors) < cfg.participants:
        raise CooptError(f"the demo has {len(priors)} prior kinds; --participants must be <= that")
    timed("split", split, cfg.dataset, run, participants=cfg.participants, shared_fraction=cfg.shared_fraction,
          seed=cfg.seed, limit=cfg.limit)
    timed("extract", _extract_in_parallel, run, [(nm, k, p, sd) for k, (nm, p, sd) in enumerate(priors)], logs)
    timed("score", score, run)
    al = timed("align", align, run, dim=cfg.dim, progress=progress)
    timed("merge", merge, run, progress=progress)
    ins = timed("inspect", inspect, run)
    summary = {
        "config": asdict(cfg),
        "participants": ins["participants"],
        "reference": al["reference"],
        "inconsistency": ins["inconsistency"],
        "seconds": seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
