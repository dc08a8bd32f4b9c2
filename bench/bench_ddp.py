"""train's throughput under torchrun: 1 process vs 2 gloo ranks on this CPU, same global batch.

    python bench/bench_ddp.py                        # linear and convnet students, 3 repeats
    python bench/bench_ddp.py --students convnet --repeats 5

Store: a synthetic merged store (random 28x28x1 images, float16 [N, 512] targets, the merged
schema) under bench/scratch/ddp/. Each run is a fresh `train --epochs 1 --max-steps S` on the
CPU, as a user starts it: 1 rank is `python -m coopt_fast train`, run twice, with
OMP_NUM_THREADS = cores and = 1; 2 ranks `torchrun --standalone --nproc_per_node=2 -m coopt_fast
train` with cores / 2 threads each. samples/s is train's own figure (the training loop: global
batch x steps / loop seconds, startup excluded); wall s is the whole command, startup included.
Runs interleave; medians over --repeats. The figure is 2 ranks / the better 1-rank setting: on
one CPU the ranks share its cores and memory bandwidth, so DDP adds no compute, only its
gradient all-reduce and a second copy of the per-step Python; what it can win is what one
process loses to intra-op threading (small ops split over threads, OpenMP barriers, which
suffer most on a machine shared with other work). A GPU node is the use case, not this.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from coopt_fast import store as stores  # noqa: E402

PY = sys.executable
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def write_store(path: Path, n: int, dim: int = 512) -> None:
    """A merged store of n random rows (contiguous datasets, as merge writes them)."""
    rng = np.random.default_rng(0)
    part = stores.partial_path(path)
    with h5py.File(part, "w") as f:
        attrs = stores.provenance(participants=json.dumps(["a", "b"]), dataset="synthetic", limit=-1, dim=dim,
                                  target_dtype="float16", fingerprint=json.dumps({"n": n}), inputs=json.dumps({}))
        f.attrs.update(attrs)
        f.create_dataset("targets", data=rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16))
        f.create_dataset("images", data=rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8))
        f.create_dataset("index", data=np.arange(n, dtype=np.int64))
        f.create_dataset("participant", data=(np.arange(n) % 2).astype(np.int16))
        f.create_dataset("target_mean", data=np.zeros(dim, np.float32))
        f.create_dataset("target_std", data=np.ones(dim, np.float32))
    stores.publish(h5py.File(part, "r+"), path)


def hardware() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, no GPU"


def run_train(store: Path, out: Path, student: str, ranks: int, threads: int, batch: int, steps: int) -> dict:
    """One train run on `ranks` ranks of `threads` threads; its --json figures and wall seconds."""
    launch = [PY, "-m"] if ranks == 1 else [TORCHRUN, "--standalone", f"--nproc_per_node={ranks}", "-m"]
    cmd = launch + ["coopt_fast", "train", str(store), "-o", str(out), "--student", student, "--epochs", "1",
                    "--batch-size", str(batch), "--max-steps", str(steps), "--device", "cpu", "--quiet", "--json",
                    "--force"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    wall = time.perf_counter() - t0
    if r.returncode != 0:  # recorded, not hidden: the table counts failed runs
        tail = [line for line in r.stderr.splitlines() if line.strip()][:3]
        print(f"run failed (exit {r.returncode}): {' '.join(cmd)}\n  " + "\n  ".join(tail), file=sys.stderr)
        return {"failed": r.returncode, "stderr_head": tail, "threads": threads}
    s = json.loads(r.stdout)
    assert s["world_size"] == ranks and s["steps"] == steps, s
    return {"samples_per_s": s["samples_per_s"], "loop_s": s["seconds"], "wall_s": wall, "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", default="linear,convnet")
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", default="linear=60,convnet=20", help="steps per run, per student")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ddp_cpu.json"))
    args = ap.parse_args()
    steps = dict(kv.split("=") for kv in args.steps.split(","))
    scratch = ROOT / "bench" / "scratch" / "ddp"
    scratch.mkdir(parents=True, exist_ok=True)
    store = scratch / "merged.h5"
    if not store.exists():
        write_store(store, args.rows)

    cores = os.cpu_count() or 1
    setups = {f"1 rank x {cores} threads": (1, cores), "1 rank x 1 thread": (1, 1),
              f"2 ranks x {max(1, cores // 2)} threads": (2, max(1, cores // 2))}
    rows = []
    for student in args.students.split(","):
        n = int(steps.get(student, 20))
        got = {k: [] for k in setups}
        for rep in range(args.repeats):
            for name, (ranks, threads) in setups.items():
                got[name].append(run_train(store, scratch / f"out{ranks}", student, ranks, threads, args.batch_size, n))
        ok = {k: [r for r in v if "failed" not in r] for k, v in got.items()}
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("samples_per_s", "loop_s", "wall_s")}
               | {"runs_ok": len(v), "runs_failed": len(got[k]) - len(v)} for k, v in ok.items()}
        one, two = [k for k in setups if setups[k][0] == 1], [k for k in setups if setups[k][0] == 2][0]
        best = max(one, key=lambda k: med[k]["samples_per_s"])
        rows.append({"student": student, "global_batch": args.batch_size, "steps": n, "medians": med,
                     "best_one_rank": best, "two_over_best_one": med[two]["samples_per_s"] / med[best]["samples_per_s"],
                     "runs": got})

    print(f"{'student':8} {'batch':>5} {'steps':>5}  {'setup':22} {'samples/s':>10} {'wall s':>7}  2 ranks / best 1 rank")
    for r in rows:
        for k, m in r["medians"].items():
            failed = f"  ({m['runs_failed']} failed)" if m["runs_failed"] else ""
            print(f"{r['student']:8} {r['global_batch']:5d} {r['steps']:5d}  {k:22} {m['samples_per_s']:10.0f} "
                  f"{m['wall_s']:7.1f}{failed}")
        print(f"{'':42} 2 ranks / {r['best_one_rank']}: {r['two_over_best_one']:.2f}")
    res = {"hardware": hardware(), "date": time.strftime("%Y-%m-%d"), "load_average_after": os.getloadavg(),
           "rows": args.rows, "repeats": args.repeats, "results": rows,
           "note": "2 gloo ranks share the CPU cores the 1-rank runs use; the machine was shared with other "
                   "jobs (load average above), which hurts multi-threaded runs most"}
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}  ({res['hardware']})")


if __name__ == "__main__":
    main()
