"""Which student recipe pays off? A sweep over one merged store, probed as bench/paper.py probes.

    python bench/student_recipe.py                       # seed 0's label-free store, consensus targets (the default)
    python bench/student_recipe.py --run RUN --seeds 0,1,2 --only base,lr2e-3

Each config trains the convnet student on RUN/merged.h5 (one thread per job, two jobs at once,
like paper.py's untimed work) and probes it (linear + kNN on 10,000 train / 10,000 test images).
Reported: accuracies and the training loop's seconds, side by side with the base recipe (the
one `bench/paper.py` and `coopt-fast demo` use) measured in the same run.
Writes bench/results/student_recipe.json (hardware, date, commit, every seed's numbers).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import paper as P  # noqa: E402

BASE = dict(epochs=3, lr=1e-3, wd=0.01, batch_size=128, crop_scale=(0.25, 1.0))
CONFIGS = {
    "base": {},
    "lr2e-3": dict(lr=2e-3),
    "lr4e-3": dict(lr=4e-3),
    "crop0.5": dict(crop_scale=(0.5, 1.0)),
    "crop0.08": dict(crop_scale=(0.08, 1.0)),
    "bs64": dict(batch_size=64),
    "ep4": dict(epochs=4),
    "wd0.05": dict(wd=0.05),
}


def job(run: str, out: str, seed: int, cfg: dict) -> dict:
    from coopt_fast.student import train

    kw = {**BASE, **cfg}
    s = train(run, "convnet", kw.pop("epochs"), out, seed=seed, device="cpu", progress=False, **kw)
    p = P.probe_ckpt(s["checkpoint"], P.FULL)
    return {"train_seconds": s["train_seconds"], "linear": p["linear"], "knn": p["knn"], "loss": s["loss"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a run with merged.h5 (default: runs/paper/s{seed}/fig4d-consensus/run)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--work", default=str(ROOT / "runs" / "student_recipe"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "student_recipe.json"))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    env = P.environment()
    jobs = {}
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"), initializer=P._pool_init) as ex:
        for seed in seeds:
            run = args.run or str(ROOT / "runs" / "paper" / f"s{seed}" / "fig4d-consensus" / "run")
            for n in names:
                jobs[ex.submit(job, run, f"{args.work}/s{seed}-{n}", seed, CONFIGS[n])] = (n, seed, run)
        results = {}
        for fut in cf.as_completed(jobs):
            n, seed, run = jobs[fut]
            results.setdefault(n, {})[seed] = {**fut.result(), "run": run}
            P.log(f"{n} seed {seed}: {results[n][seed]}")
    rows = []
    for n in names:
        per = [results[n][s] for s in seeds]
        rows.append({"config": n, "changes": {**CONFIGS[n]}, "per_seed": per,
                     **{k: P.R.mean_std([p[k] for p in per]) for k in ("linear", "knn", "train_seconds")}})
    base = next((r for r in rows if r["config"] == "base"), None)
    print(f"{'config':10} {'linear %':>9} {'kNN %':>7} {'train s':>8} {'x base time':>11}")
    for r in rows:
        ratio = r["train_seconds"]["mean"] / base["train_seconds"]["mean"] if base else float("nan")
        print(f"{r['config']:10} {100 * r['linear']['mean']:9.2f} {100 * r['knn']['mean']:7.2f} "
              f"{r['train_seconds']['mean']:8.1f} {ratio:11.2f}")
    out = {"env": env, "seeds": seeds, "base": BASE, "rows": rows,
           "setting": "convnet student on a merged store (default: the label-free arm fitted to the consensus, "
                      "align's default), one thread per job, two jobs at once; probes as paper.py"}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
