"""What every benchmark shares: where the numbers come from (machine), how a measurement runs
(a fresh subprocess per provider and shape, peak memory its own), the table, the JSON.

    from harness import ROOT, machine, measure, run_child, print_table, write_results
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# NVIDIA H200 SXM product brief / spec sheet: dense BF16/FP16 tensor-core peak 989 TFLOP/s (the
# 1,979 figure is with 2:4 sparsity), HBM3e 4.8 TB/s.
H200_BF16_DENSE_TFLOPS = 989.0
H200_HBM_TBPS = 4.8


def machine() -> dict:
    """Where the numbers come from: CPU model and cores, GPU, versions, commit, load, date."""
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem_gb = int(next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))) / 2**20

    def git(*args):
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD") or "no commit",
        "git_dirty": bool(git("status", "--porcelain", "--", "kernels", "bench")),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mem_gb": round(mem_gb, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "loadavg_1min_before": round(os.getloadavg()[0], 2),
    }


def _rss_mb(field: str) -> float:
    for ln in open("/proc/self/status"):
        if ln.startswith(field):
            return int(ln.split()[1]) / 1024
    return float("nan")


def measure(fn, device: str, repeats: int, budget: float) -> dict:
    """One cold run, then up to `repeats` timed runs within `budget` seconds.

    Peak memory is taken twice: over the cold run (includes one-time costs: BLAS packing
    buffers, thread pools, code pages) and over the timed runs (the provider's own working set;
    the parent runs children with glibc's mmap threshold fixed, so memory freed by the cold run
    goes back to the OS instead of hiding in the heap)."""
    import torch

    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def reset() -> float:
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM := VmRSS
            f.write("5")
        return _rss_mb("VmRSS")

    def peak(base: float) -> float:
        return round((torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb("VmHWM")) - base, 1)

    base = reset()
    t0 = time.perf_counter()
    value = fn()
    sync()
    cold = time.perf_counter() - t0
    cold_peak = peak(base)
    times, warm_peak = [], None
    if cold * (repeats + 1) <= budget:
        base = reset()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        warm_peak = peak(base)
    return {
        "median_s": statistics.median(times) if times else cold,
        "times_s": [round(t, 4) for t in times] or [round(cold, 4)],
        "cold_s": round(cold, 4),
        "runs": len(times) or 1,
        "peak_mem_cold_mb": cold_peak,
        "peak_mem_mb": warm_peak if warm_peak is not None else cold_peak,
        "value": value,
    }


def run_child(script: str, spec: dict, timeout: float, ranks: int = 1) -> dict:
    """Run `script --child SPEC` in a fresh interpreter; it prints one JSON line. ranks > 1: under
    torchrun (--standalone, OMP_NUM_THREADS=1 per rank, torchrun's default); rank 0 prints."""
    cmd = [sys.executable, script, "--child", json.dumps(spec)]
    if ranks > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # see measure()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """cols: (key, header, format); missing values print as '-'."""
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for j, c in enumerate(cells):
        print("  ".join(s.rjust(w) for s, w in zip(c, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_results(path: str, meta: dict, rows: list[dict], key: tuple[str, ...], append: bool) -> None:
    """Write {"meta", "results"}; with append, keep earlier rows that this run did not redo
    (matched on `key`), each tagged with the meta of the run that produced it."""
    for r in rows:
        r["run"] = {k: meta[k] for k in ("date", "git_commit", "loadavg_1min_before", "loadavg_1min_after")}
    old = []
    if append and Path(path).exists():
        done = {tuple(str(r.get(k)) for k in key) for r in rows}
        old = [r for r in json.loads(Path(path).read_text())["results"] if tuple(str(r.get(k)) for k in key) not in done]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "results": old + rows}, indent=1) + "\n")
    print(f"wrote {path}" + (f" (kept {len(old)} earlier rows)" if old else ""))


def wait_quiet(seconds: float, below: float = 1.0) -> None:
    """Wait (up to `seconds`) for the 1-minute load average to drop below `below`: on a shared
    2-core machine another job halves throughput and turns every OpenMP barrier into a
    scheduler quantum. The load before and after is recorded either way."""
    end = time.time() + seconds
    while os.getloadavg()[0] >= below and time.time() < end:
        time.sleep(5)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


