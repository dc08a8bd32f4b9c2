"""What crosses the boundary between participants and the platform, in bytes, and what it costs.

Three participants on Fashion-MNIST, each in its own workspace (tests/test_separate.py's flow at
full size): extract, align --participant in turn until none waits (consensus, --dim 512), merge.
For each participant it reports the features kept in its workspace against the files it published
(record.json, shared.h5, aligned.h5); and, measured in the same run, the time of the separate flow
against one process aligning everyone from one folder (the baseline), whose merged targets must be
the same bits.

    python bench/bench_boundary.py                # 60,000 images, 3 participants
    python bench/bench_boundary.py --limit 6000   # quicker
Writes bench/results/boundary.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, machine  # noqa: E402

PRIORS = {"alice": ("convnet", 0), "bob": ("convnet", 1), "carol": ("labels", 0)}


def _extract(run, name: str, shard: int, **kw) -> dict:
    import coopt_fast

    prior, seed = PRIORS[name]
    return coopt_fast.extract(run, name, shard, prior, seed=seed, batch_size=512, progress=False, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=60000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shared-fraction", type=float, default=0.05)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "boundary.json"))
    args = ap.parse_args()

    import coopt_fast
    from coopt_fast import layout
    from coopt_fast.errors import WaitingError

    env = machine()
    tmp = Path(tempfile.mkdtemp(prefix="coopt-boundary-"))
    try:
        split = dict(participants=3, shared_fraction=args.shared_fraction, seed=0, limit=args.limit)
        one, sep = tmp / "one", tmp / "platform"
        coopt_fast.split("fashion-mnist", one, **split)
        coopt_fast.split("fashion-mnist", sep, **split)
        ws = {nm: tmp / f"ws_{nm}" for nm in PRIORS}
        t = time.perf_counter()
        for k, nm in enumerate(PRIORS):
            _extract(one, nm, k)
        extract_s = time.perf_counter() - t
        # The separate workspaces get copies of the same features (extract is not what is measured).
        for k, nm in enumerate(PRIORS):
            ws[nm].mkdir(parents=True)
            for f in ("features.h5", "manifest.json"):
                shutil.copy(layout.participant_dir(one, nm) / f, ws[nm] / f)
            man = json.loads((ws[nm] / "manifest.json").read_text())
            (ws[nm] / "manifest.json").write_text(json.dumps({"features.h5": man["features.h5"]}))
            _extract(sep, nm, k, workspace=ws[nm])  # up to date: publishes the record only

        t = time.perf_counter()
        coopt_fast.align(one, dim=args.dim, progress=False)
        one_align_s = time.perf_counter() - t
        t = time.perf_counter()
        coopt_fast.merge(one, progress=False)
        one_merge_s = time.perf_counter() - t

        t, calls, waits = time.perf_counter(), 0, 0
        pending = list(PRIORS)
        while pending:
            nxt = []
            for nm in pending:
                calls += 1
                try:
                    coopt_fast.align(sep, dim=args.dim, participant=nm, workspace=ws[nm], progress=False)
                except WaitingError:
                    waits += 1
                    nxt.append(nm)
            pending = nxt
        sep_align_s = time.perf_counter() - t
        t = time.perf_counter()
        coopt_fast.merge(sep, progress=False)
        sep_merge_s = time.perf_counter() - t

        with h5py.File(one / "merged.h5", "r") as a, h5py.File(sep / "merged.h5", "r") as b:
            same = all(np.array_equal(a[k][:], b[k][:]) for k in ("targets", "index", "participant",
                                                                  "target_mean", "target_std"))
        rows = []
        for nm in PRIORS:
            d = layout.participant_dir(sep, nm)
            pub = {f: (d / f).stat().st_size for f in layout.PUBLISHED}
            rec = json.loads((d / "record.json").read_text())
            rows.append({"participant": nm, "prior": rec["prior"], "feature_dim": rec["feature_dim"],
                         "rows": rec["rows"], "shared_rows": rec["shared_rows"],
                         "features_kept_bytes": (ws[nm] / "features.h5").stat().st_size,
                         "published_bytes": pub, "published_total": sum(pub.values())})
        leaked = sorted(str(p.relative_to(sep)) for p in sep.rglob("features*"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {"machine": env, "limit": args.limit, "dim": args.dim, "participants": rows,
              "features_in_platform_folder": leaked, "merged_equal_one_folder": same,
              "seconds": {"extract_one_folder": extract_s, "align_one_folder": one_align_s,
                          "align_separate": sep_align_s, "merge_one_folder": one_merge_s,
                          "merge_separate": sep_merge_s},
              "align_calls": calls, "align_waits": waits,
              "align_separate_over_one_folder": sep_align_s / one_align_s}
    print(f"{'participant':12} {'prior':8} {'l':>4} {'rows':>7} {'features kept':>14} {'record':>7} "
          f"{'shared.h5':>10} {'aligned.h5':>11} {'published':>10}")
    for r in rows:
        p = r["published_bytes"]
        print(f"{r['participant']:12} {r['prior']:8} {r['feature_dim']:4} {r['rows']:7,} {r['features_kept_bytes']:14,} "
              f"{p['record.json']:7,} {p['shared.h5']:10,} {p['aligned.h5']:11,} {r['published_total']:10,}")
    s = result["seconds"]
    print(f"align: separate {s['align_separate']:.2f} s ({calls} calls, {waits} waited) vs one folder "
          f"{s['align_one_folder']:.2f} s = {result['align_separate_over_one_folder']:.2f}x; merge "
          f"{s['merge_separate']:.2f} vs {s['merge_one_folder']:.2f} s; merged targets equal: {same}; "
          f"features in the platform folder: {leaked or 'none'}")
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
