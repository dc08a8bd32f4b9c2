"""Benchmark align_apply: reference (one matmul per group) vs the blocked torch fallback vs the
grouped Triton kernel. Same method as bench_uniformity.py (subprocess per measurement, peak
memory growth, median of repeats, speed-up against the reference of the same invocation).

    python bench/bench_align.py                                  # default cases for this machine
    python bench/bench_align.py --cases 4194304x512,4194304x2048 --n 512
    python bench/bench_align.py --cases 100000x512+60000x384+42144x2048   # '+' joins groups

Inputs are what align feeds the op: float16 features [m_k, l_k], float32 maps [l_k, n], float16
targets.

Baselines in the kernel's own arithmetic, so a speed-up is the kernel's and not a dtype's:
reference = on CPU kernels.reference.align_apply_ref (fp32 products: what the CPU fallback
computes); on CUDA the Triton kernel's arithmetic with cuBLAS, per group (x @ hi) + (x @ lo) in
fp16 with fp32 accumulation (the map's hi + lo fp16 halves, align_apply_triton.split_maps), cast,
statistics in fp64. reference-fp32 (CUDA): align_apply_ref's fp32 products, for comparison. Bytes counted are the minimum the op must move: features read once, targets written
once, maps read once. On CUDA it reports the fraction of HBM bandwidth and of dense fp16 tensor
peak, and of the roofline max(bytes / HBM, flops / tensor peak): at n = 512 the op is
tensor-bound (see kernels/align_apply_triton.py), so 80% of HBM bandwidth is out of reach there.
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
    H200_HBM_TBPS,
    ROOT,
    cuda_available,
    machine,
    measure,
    print_table,
    run_child,
    wait_quiet,
    write_results,
)


def parse_case(case: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in g.lower().split("x")) for g in case.split("+")]


def align_apply_split_ref(xs, maps, out_dtype=None):
    """The Triton kernel's arithmetic in plain torch (cuBLAS on CUDA): fp16 features times the map's
    fp16 hi and lo halves, two GEMMs per group summed in fp32, cast, fp64 statistics of the cast."""
    import torch

    from coopt_fast.kernels.align_apply_triton import split_maps

    out_dtype = out_dtype or torch.float16
    n = maps[0].shape[1]
    s = torch.zeros(len(xs), n, dtype=torch.float64, device=maps[0].device)
    ss = torch.zeros_like(s)
    ys = []
    for g, (x, m) in enumerate(zip(xs, maps)):
        hi, lo, inv = split_maps([m], x.dtype, n, m.device)
        # fp32 output of the fp16 GEMM (cuBLAS accumulates in fp32): x @ hi is scaled by s and may
        # exceed fp16's range. The CPU has no such GEMM; there it is emulated in fp32 (checks only).
        if x.is_cuda:
            y = torch.mm(x, hi, out_dtype=torch.float32).add_(torch.mm(x, lo, out_dtype=torch.float32))
        else:
            y = (x.float() @ hi.float()).add_(x.float() @ lo.float())
        y = y.mul_(inv[0]).to(out_dtype)
        yd = y.double()
        s[g], ss[g] = yd.sum(0), yd.square().sum(0)
        ys.append(y)
    return ys, s, ss


def _child(spec: dict) -> None:
    import torch

    from coopt_fast.kernels.align_apply_triton import align_apply_triton
    from coopt_fast.kernels.reference import align_apply_ref
    from coopt_fast.kernels.torch_ops import align_apply_torch

    cuda = spec["device"] == "cuda"
    fn = {"reference": align_apply_split_ref if cuda else align_apply_ref, "reference-fp32": align_apply_ref,
          "torch": align_apply_torch, "triton": align_apply_triton}[spec["provider"]]
    g = torch.Generator(device=spec["device"]).manual_seed(0)
    dev, n = spec["device"], spec["n"]
    xs = [torch.randn(m, l, generator=g, device=dev).half() for m, l in spec["groups"]]
    maps = [torch.randn(l, n, generator=g, device=dev) / l**0.5 for _, l in spec["groups"]]

    def run():
        ys, s, ss = fn(xs, maps)
        return float(ss.sum())  # a checksum without cancellation, compared across providers

    print(json.dumps(measure(run, dev, spec["repeats"], spec["budget"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cases", help="comma-separated cases; a case is MxL groups joined by '+'")
    ap.add_argument("--n", type=int, default=512, help="common dimension")
    ap.add_argument("--providers", default=None,
                    help="reference,reference-fp32,torch,triton (default: what the device runs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per measurement before repeats stop")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many seconds for load < 1")
    ap.add_argument("--out", default=str(ROOT / "bench/results/align.json"))
    ap.add_argument("--append", action="store_true", help="keep rows of --out that this run does not redo")
    args = ap.parse_args()
    if args.child:
        return _child(json.loads(args.child))

    cuda = cuda_available()
    device = "cuda" if cuda else "cpu"
    mixed = "+".join(f"{m}x{l}" for m, l in ((100000, 512), (60000, 384), (60000, 1024), (42144, 2048)))
    if cuda:
        mixed = "+".join(f"{m * 16}x{l}" for m, l in parse_case(mixed))
    cases = args.cases or (f"4194304x512,4194304x2048,{mixed}" if cuda else f"262144x512,65536x2048,{mixed}")
    providers = (args.providers or ("reference,reference-fp32,torch,triton" if cuda else "reference,torch")).split(",")
    wait_quiet(args.wait_quiet)
    meta = machine()
    rows = []
    n = args.n
    for case in cases.split(","):
        groups = parse_case(case)
        N = sum(m for m, _ in groups)
        bytes_ = sum(m * l * 2 + l * n * 4 for m, l in groups) + N * n * 2
        flops = sum(2 * m * l * n for m, l in groups)
        label = f"{N}x[{','.join(str(l) for _, l in groups)}]->{n}"
        ref_row = None
        for prov in providers:
            if prov == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
                continue
            row = {"case": label, "groups": groups, "n": n, "provider": prov, "device": device,
                   "bytes": bytes_, "flops": flops}
            res = run_child(__file__, {**row, "repeats": args.repeats, "budget": args.budget}, args.timeout)
            row.update(res)
            if "median_s" in res:
                t = res["median_s"]
                row["gbps"] = bytes_ / t / 1e9
                row["tflops"] = flops / t / 1e12
                if cuda:
                    row["frac_hbm"] = row["gbps"] / (H200_HBM_TBPS * 1e3)
                    row["frac_tensor"] = row["tflops"] / H200_BF16_DENSE_TFLOPS
                    roof = max(bytes_ / (H200_HBM_TBPS * 1e12), flops / (H200_BF16_DENSE_TFLOPS * 1e12))
                    row["frac_roofline"] = roof / t
                if prov == "reference":
                    ref_row = row
                elif ref_row is not None and "median_s" in ref_row:
                    row["speedup_vs_ref"] = ref_row["median_s"] / t
                    # cold vs cold: the only figure every row has (a long reference run is a single cold run)
                    row["mem_frac_of_ref"] = res["peak_mem_cold_mb"] / max(ref_row["peak_mem_cold_mb"], 1e-9)
                    row["rel_diff_vs_ref"] = abs(res["value"] - ref_row["value"]) / abs(ref_row["value"])
            rows.append(row)
            print(f"{label} {prov}: {res}", flush=True)
    meta["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    print(f"\nalign_apply, fp16 features -> fp16 targets, {meta['gpu'] or meta['cpu']} ({meta['cpu_cores']} cores), "
          f"torch {meta['torch']}, load {meta['loadavg_1min_before']} -> {meta['loadavg_1min_after']}")
    print_table(rows, [("case", "rows x [l_k] -> n", "s"), ("provider", "provider", "s"),
                       ("median_s", "median s", ".3f"), ("runs", "runs", "d"), ("gbps", "GB/s", ".2f"),
                       ("tflops", "TFLOP/s", ".3f"), ("frac_hbm", "of HBM", ".1%"),
                       ("frac_roofline", "of roofline", ".1%"), ("peak_mem_mb", "peak MiB", ".1f"),
                       ("peak_mem_cold_mb", "cold MiB", ".1f"),
                       ("speedup_vs_ref", "x ref", ".2f"), ("mem_frac_of_ref", "cold mem/ref", ".1%")])
    for r in rows:
        if r.get("error"):
            print(f"  {r['case']} {r['provider']}: {r['error']}")
    meta["method"] = {
        "peak_memory": "CPU: VmHWM growth after clear_refs=5 (glibc mmap threshold fixed at 64 KiB), inputs "
                       "excluded, outputs included; CUDA: max_memory_allocated growth. peak_mem_mb: over the "
                       "timed runs (cold run if it was the only one); peak_mem_cold_mb: over the first run",
        "time": f"median of up to {args.repeats} runs after 1 cold run, each provider in its own subprocess",
        "bytes": "sum m_k*l_k*2 (fp16 features) + N*n*2 (fp16 targets) + sum l_k*n*4 (fp32 maps)",
        "reference": "CPU: align_apply_ref (fp32 products, the fallback's dtype); CUDA: the kernel's arithmetic "
                     "with cuBLAS (fp16 x @ fp16 map hi + lo, fp32 sum); reference-fp32: align_apply_ref",
        "peaks": f"H200 HBM3e {H200_HBM_TBPS} TB/s, dense FP16/BF16 {H200_BF16_DENSE_TFLOPS} TFLOP/s (spec sheet)",
    }
    write_results(args.out, meta, rows, ("case", "n", "provider", "device"), args.append)


if __name__ == "__main__":
    main()
