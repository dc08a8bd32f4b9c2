"""How long the command line takes to answer: `coopt-fast --help`, `--version`, `status RUN`, each a
fresh process, against `python -c "import torch"` measured in the same run (what every command
paid before the library imported its steps lazily).

    python bench/bench_startup.py [--repeats 7] [--run runs/demo/run]
Writes bench/results/startup.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, machine  # noqa: E402


def _seconds(cmd: list[str], repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.decode()[-300:]}")
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--run", default=None, help="a run folder for `status` (default: a small one made here)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "startup.json"))
    args = ap.parse_args()
    run = args.run
    if run is None:  # a plan is all `status` needs
        run = tempfile.mkdtemp(prefix="coopt-startup-")
        subprocess.run([sys.executable, "-m", "coopt_fast", "split", "fashion-mnist", "--out", run, "-k", "2",
                        "--limit", "100"], check=True, capture_output=True, cwd=ROOT)
    cli = [sys.executable, "-m", "coopt_fast"]
    rows = {
        "import torch (baseline)": _seconds([sys.executable, "-c", "import torch"], args.repeats),
        "coopt-fast --help": _seconds(cli + ["--help"], args.repeats),
        "coopt-fast --version": _seconds(cli + ["--version"], args.repeats),
        "coopt-fast status RUN": _seconds(cli + ["status", run], args.repeats),
        "coopt-fast align --help": _seconds(cli + ["align", "--help"], args.repeats),
    }
    base = rows["import torch (baseline)"]["median_s"]
    print(f"{'command':28} {'median s':>9} {'min s':>7} {'/ import torch':>15}")
    for k, r in rows.items():
        r["over_import_torch"] = r["median_s"] / base
        print(f"{k:28} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['over_import_torch']:15.2f}")
    Path(args.out).write_text(json.dumps({"machine": machine(), "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
