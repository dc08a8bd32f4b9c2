"""Benchmark uniformity: reference (pdist) vs a competent plain-torch baseline (tiled) vs the blocked
torch fallback vs the Triton kernel, and the fallback split across 2 torchrun ranks.

    python bench/bench_uniformity.py                      # default shapes for this machine
    python bench/bench_uniformity.py --shapes 16384x512 --providers reference,tiled,torch --repeats 5

Providers: reference = kernels.reference.uniformity_ref (torch.pdist, fp32, O(n^2) memory);
tiled = uniformity_tiled_ref (normalise once, tiles of x^ x^T in x's dtype with an in-place
exp-sum: what a careful engineer writes in plain torch; the baseline a kernel must beat);
torch = the blocked fallback (torch_ops.uniformity_torch); triton = the fused kernel (CUDA, or
TRITON_INTERPRET=1); torch-2ranks = kernels.uniformity_sharded over 2 gloo ranks under torchrun,
one thread each (CPU: the same 2 cores as the 1-process rows, which use 2 threads).

Every (provider, shape) runs in a fresh subprocess, so each one's peak memory is its own:
  CPU : peak RSS growth while the provider runs, from /proc/self/status. The child builds its
        input, writes "5" to /proc/self/clear_refs (resets VmHWM to the current RSS), runs,
        and reports VmHWM - VmRSS(before). Input tensors are excluded; outputs and every
        temporary are included. (tracemalloc cannot see torch's allocations.)
  CUDA: torch.cuda.max_memory_allocated() growth over the same window.
Peak memory is reported over the timed runs (the working set) and over the first, cold run
(adds one-time costs such as BLAS buffers and thread pools); see measure().
Times are medians over --repeats runs after one cold run; a provider whose cold run alone
exceeds --budget seconds is reported from that single run (memory: the cold figure). Speed-ups are against
the reference and against tiled, both measured in the same invocation (x ref, x tiled). Useful FLOPs are n(n-1)*l (the i<j half of the
Gram matrix); the fraction of peak uses H200_BF16_DENSE_TFLOPS and is reported on CUDA only.

The subprocess runner, machine description, table and JSON writer are bench/harness.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    H200_BF16_DENSE_TFLOPS,
    ROOT,
    cuda_available,
    machine,
    measure,
    print_table,
    run_child,
    wait_quiet,
    write_results,
)


# ------------------------------------------------------------------------------ uniformity

RANKS = {"torch-2ranks": 2}


def _child(spec: dict) -> None:
    import torch

    from coopt_fast import distributed
    from coopt_fast.kernels import uniformity_sharded
    from coopt_fast.kernels.reference import uniformity_ref, uniformity_tiled_ref
    from coopt_fast.kernels.torch_ops import uniformity_torch
    from coopt_fast.kernels.uniformity_triton import uniformity_triton

    torch.manual_seed(0)
    x = torch.randn(spec["n"], spec["l"], device=spec["device"]).add_(0.1).to(getattr(torch, spec["dtype"]))
    if spec["provider"] in RANKS:  # every rank builds the same x; rank 0 measures and prints
        w = distributed.world()
        with distributed.process_group(torch.device("cpu"), w):
            res = measure(lambda: float(uniformity_sharded(x, spec["t"], distributed.coord_group())), spec["device"],
                          spec["repeats"], spec["budget"])
        if w.main:
            print(json.dumps(res))
        return
    fn = {"reference": uniformity_ref, "tiled": uniformity_tiled_ref, "torch": uniformity_torch,
          "triton": uniformity_triton}[spec["provider"]]
    print(json.dumps(measure(lambda: float(fn(x, spec["t"])), spec["device"], spec["repeats"], spec["budget"])))


def reference_fits(n: int, device: str) -> tuple[bool, str]:
    """pdist holds n(n-1)/2 fp32 distances, and .pow/.mul/.exp each allocate another: >= 2 live."""
    need = 2 * 4 * n * (n - 1) / 2
    if device == "cuda":
        import torch

        have = torch.cuda.mem_get_info()[0]
    else:
        have = int(next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemAvailable"))) * 1024
    note = f"reference needs 2 x n(n-1)/2 fp32 = {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
    return need < 0.8 * have, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", help="comma-separated NxL, e.g. 16384x512,200000x512 (default: per device)")
    ap.add_argument("--dtype", default=None, help="float32|float16|bfloat16 (default: float32 CPU, bfloat16 CUDA)")
    ap.add_argument("--providers", default=None,
                    help="reference,tiled,torch,triton,torch-2ranks (default: what the device runs)")
    ap.add_argument("--t", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per measurement before repeats stop")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many seconds for load < 1")
    ap.add_argument("--out", default=str(ROOT / "bench/results/uniformity.json"))
    ap.add_argument("--append", action="store_true", help="keep rows of --out that this run does not redo")
    args = ap.parse_args()
    if args.child:
        return _child(json.loads(args.child))

    cuda = cuda_available()
    device = "cuda" if cuda else "cpu"
    # CPU default ~5 min on 2 quiet cores; 200000x128 shows the n the reference cannot allocate
    # (add --shapes 200000x512 --append for the full width: ~2.5 min more when quiet)
    shapes = args.shapes or ("131072x512,1048576x2048" if cuda else "4096x512,16384x512,200000x128")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    providers = (args.providers or ("reference,tiled,torch,triton" if cuda else "reference,tiled,torch,torch-2ranks")).split(",")
    wait_quiet(args.wait_quiet)
    meta = machine()
    rows = []
    for shp in shapes.split(","):
        n, l = (int(v) for v in shp.lower().split("x"))
        ref_row = tiled_row = None
        for prov in providers:
            row = {"shape": f"{n}x{l}", "n": n, "l": l, "dtype": dtype, "t": args.t, "provider": prov, "device": device}
            if prov == "reference":
                fits, note = reference_fits(n, device)
                if not fits:
                    rows.append({**row, "note": "skipped: " + note})
                    print(f"{shp} reference skipped: {note}", flush=True)
                    continue
            if prov == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
                continue
            if prov in ("torch", "tiled", "torch-2ranks") and cuda and n > 300_000:
                rows.append({**row, "note": "skipped: plain torch would take minutes on a GPU"})
                continue
            if prov in RANKS and cuda:
                continue  # 2 ranks need 2 GPUs (cuda:LOCAL_RANK); this row is the CPU's
            spec = {**row, "repeats": args.repeats, "budget": args.budget}
            res = run_child(__file__, spec, args.timeout, RANKS.get(prov, 1))
            row.update(res)
            if "median_s" in res:
                row["tflops"] = n * (n - 1) * l / res["median_s"] / 1e12
                if cuda:
                    row["frac_peak"] = row["tflops"] / H200_BF16_DENSE_TFLOPS
                if prov == "reference":
                    ref_row = row
                elif ref_row is not None and "median_s" in ref_row:
                    row["speedup_vs_ref"] = ref_row["median_s"] / res["median_s"]
                    # cold vs cold: the only figure every row has (a long reference run is a single cold run)
                    row["mem_frac_of_ref"] = res["peak_mem_cold_mb"] / max(ref_row["peak_mem_cold_mb"], 1e-9)
                    row["abs_diff_vs_ref"] = abs(res["value"] - ref_row["value"])
                if prov == "tiled":
                    tiled_row = row
                elif tiled_row is not None and "median_s" in tiled_row and prov != "reference":
                    row["speedup_vs_tiled"] = tiled_row["median_s"] / res["median_s"]
            rows.append(row)
            print(f"{shp} {prov}: {res}", flush=True)
    meta["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    print(f"\nuniformity, {meta['gpu'] or meta['cpu']} ({meta['cpu_cores']} cores), torch {meta['torch']}, "
          f"load {meta['loadavg_1min_before']} -> {meta['loadavg_1min_after']}")
    print_table(rows, [("shape", "n x l", "s"), ("dtype", "dtype", "s"), ("provider", "provider", "s"),
                       ("median_s", "median s", ".3f"), ("runs", "runs", "d"), ("tflops", "TFLOP/s", ".3f"),
                       ("frac_peak", "of peak", ".1%"), ("peak_mem_mb", "peak MiB", ".1f"),
                       ("peak_mem_cold_mb", "cold MiB", ".1f"),
                       ("speedup_vs_ref", "x ref", ".2f"), ("speedup_vs_tiled", "x tiled", ".2f"),
                       ("mem_frac_of_ref", "cold mem/ref", ".1%"),
                       ("value", "U", ".6f")])
    for r in rows:
        if r.get("note") or r.get("error"):
            print(f"  {r['shape']} {r['provider']}: {r.get('note') or ''} {r.get('error') or ''}".rstrip())
    meta["method"] = {
        "peak_memory": "CPU: VmHWM growth after clear_refs=5 (glibc mmap threshold fixed at 64 KiB), input "
                       "excluded; CUDA: max_memory_allocated growth. peak_mem_mb: over the timed runs "
                       "(cold run if it was the only one); peak_mem_cold_mb: over the first run",
        "time": f"median of up to {args.repeats} runs after 1 cold run, each provider in its own subprocess",
        "useful_flops": "n(n-1)*l",
        "baselines": "reference: torch.pdist (fp32); tiled: uniformity_tiled_ref, plain torch tiles of x^ x^T in x's "
                     "dtype with an in-place exp-sum; torch-2ranks: peak memory is rank 0's, time the slowest rank's",
        "peak_tflops": f"H200 dense BF16 {H200_BF16_DENSE_TFLOPS} (spec sheet), CUDA rows only",
    }
    write_results(args.out, meta, rows, ("shape", "dtype", "t", "provider", "device"), args.append)


if __name__ == "__main__":
    main()
