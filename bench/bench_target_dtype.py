"""What each --target-dtype costs and what it does to the student, on the demo's setting.

    python bench/bench_target_dtype.py                     # demo size, seeds 0 and 1 (~30 min on 2 cores)
    python bench/bench_target_dtype.py --seeds 0 --limit 2000 --epochs 1   # a smoke run

One data side (the demo's priors, split, parallel extraction, score) is run once; then for each
target dtype (float16, bfloat16, int8 per row, int8-dim per participant x dimension) the run is
copied, aligned with that dtype, merged, and a student is trained on it and probed, for every
seed. Everything but the stored target bytes is identical across dtypes for a given seed (same
plan, features, projections, fit, student init, order and augmentation), so the comparison is
paired: a dtype's effect is its accuracy minus float16's at the same seed.

Reported per dtype: bytes per sample of an upload (codec.bytes_per_row) and of the merged
targets dataset on disk; target reconstruction against the float16 store (relative RMS error,
mean cosine); linear-probe and kNN accuracy per seed, their mean and the paired difference to
float16. Prior checkpoints are cached in runs/demo/checkpoints (shared with `make demo`).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from coopt_fast import codec  # noqa: E402
from coopt_fast.align import align  # noqa: E402
from coopt_fast.ranking import score  # noqa: E402
from coopt_fast.demo import DemoConfig, _extract_in_parallel, _prior_specs  # noqa: E402
from coopt_fast.evaluate import probe  # noqa: E402
from coopt_fast.loader import StoreLoader  # noqa: E402
from coopt_fast.merge import merge  # noqa: E402
from coopt_fast.plan import split  # noqa: E402
from coopt_fast.student import train  # noqa: E402


def decoded_targets(store: Path) -> torch.Tensor:
    """All merged targets as float32, in store row order, through the loader's own decoding."""
    ld = StoreLoader(store, 4096, fields=("targets", "index"), shuffle=False)
    parts = [(b["index"], b["targets"].float()) for b in ld]
    idx = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    return y[torch.argsort(idx)]  # sample order, comparable across stores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-dtype")
    ap.add_argument("--checkpoints", default="runs/demo/checkpoints")
    ap.add_argument("--limit", type=int, default=DemoConfig.limit)
    ap.add_argument("--epochs", type=int, default=DemoConfig.student_epochs)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--dtypes", default=",".join(codec.TARGET_DTYPES))
    ap.add_argument("--probe-test", type=int, default=10000, help="test images for the probes (all 10,000 by default)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "target_dtype.json"))
    args = ap.parse_args()

    cfg = DemoConfig(out=args.out, limit=args.limit)
    out = Path(args.out)
    base, ckpts, logs = out / "base", Path(args.checkpoints), out / "logs"
    for d in (ckpts, logs):
        d.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(step, fn, *a, **kw):
        t0 = time.perf_counter()
        r = fn(*a, **kw)
        seconds[step] = round(time.perf_counter() - t0, 2)
        print(f"  {step}: {seconds[step]:.1f} s", flush=True)
        return r

    specs = _prior_specs(cfg, ckpts, timed)
    if not (base / "scores.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        timed("split", split, "fashion-mnist", base, participants=cfg.participants,
              shared_fraction=cfg.shared_fraction, seed=cfg.seed, limit=cfg.limit)
        timed("extract", _extract_in_parallel, base, [(nm, k, p, sd) for k, (nm, p, sd) in enumerate(specs)],
              logs, cfg.device)
        sc = timed("score", score, base)
        (base / "scores.json").write_text(json.dumps(sc, indent=2))  # marks the data side as done

    seeds = [int(s) for s in args.seeds.split(",")]
    dtypes = [codec.check(d.strip()) for d in args.dtypes.split(",")]
    rows, ref_y = {}, None
    for td in dtypes:
        run = out / f"run-{td}"
        if not (run / "merged.h5").exists():
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(base, run, ignore=shutil.ignore_patterns("*aligned*", "merged*"))
            timed(f"align {td}", align, run, dim=cfg.dim, target_dtype=td, progress=False)
            timed(f"merge {td}", merge, run, progress=False)
        store = run / "merged.h5"
        with h5py.File(store, "r") as f:
            n_rows, dim = f["targets"].shape
            disk = f["targets"].id.get_storage_size() + (f["target_scale"].id.get_storage_size()
                                                           if td == "int8" and "target_scale" in f else 0)
        y = decoded_targets(store)
        if ref_y is None and td == "float16":
            ref_y = y
        rec = {}
        if ref_y is not None:
            err = (y - ref_y).norm() / ref_y.norm()
            cos = torch.nn.functional.cosine_similarity(y, ref_y, dim=1).mean()
            rec = {"rel_rms_vs_float16": float(err), "mean_cos_vs_float16": float(cos)}
        r = {"dtype": td, "rows": n_rows, "dim": dim, "upload_bytes_per_row": codec.bytes_per_row(td, dim),
             "merged_target_bytes_per_row": disk / n_rows, **rec, "seeds": {}}
        for s in seeds:
            st = timed(f"train {td} seed {s}", train, run, student=cfg.arch, epochs=args.epochs,
                       out=run / f"student-s{s}", batch_size=cfg.batch_size, seed=s, progress=False)
            pr = timed(f"probe {td} seed {s}", probe, st["checkpoint"], "fashion-mnist", "fashion-mnist:test",
                       limit_train=cfg.probe_train, limit_test=args.probe_test, progress=False)
            r["seeds"][s] = {"probe": pr["probe_accuracy"], "knn": pr["knn_accuracy"], "loss": st["loss"],
                             "train_seconds": st["seconds"]}
            print(f"  {td} seed {s}: probe {pr['probe_accuracy']:.4f} knn {pr['knn_accuracy']:.4f} "
                  f"loss {st['loss']:.4f}", flush=True)
        rows[td] = r

    ref = rows.get("float16")
    print(f"\n{'dtype':<9} {'B/row up':>9} {'B/row merged':>13} {'relRMS':>8} {'cos':>8} "
          f"{'probe':>8} {'d probe':>8} {'kNN':>8} {'d kNN':>8}")
    for td, r in rows.items():
        for m in ("probe", "knn"):
            r[f"{m}_mean"] = statistics.mean(v[m] for v in r["seeds"].values())
            if ref is not None:
                r[f"{m}_paired_diff_vs_float16"] = statistics.mean(
                    v[m] - ref["seeds"][s][m] for s, v in r["seeds"].items())
        print(f"{td:<9} {r['upload_bytes_per_row']:>9} {r['merged_target_bytes_per_row']:>13.1f} "
              f"{r.get('rel_rms_vs_float16', float('nan')):>8.4f} {r.get('mean_cos_vs_float16', float('nan')):>8.5f} "
              f"{r['probe_mean']:>8.4f} {r.get('probe_paired_diff_vs_float16', float('nan')):>+8.4f} "
              f"{r['knn_mean']:>8.4f} {r.get('knn_paired_diff_vs_float16', float('nan')):>+8.4f}")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    res = {"benchmark": "target_dtype", "date": time.strftime("%Y-%m-%d"), "commit": commit,
           "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, no GPU",
           "setting": {"limit": cfg.limit, "participants": cfg.participants, "priors": cfg.priors, "dim": cfg.dim,
                       "student_epochs": args.epochs, "probe_train": cfg.probe_train, "probe_test": args.probe_test,
                       "seeds": seeds},
           "seconds": seconds, "dtypes": rows}
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
