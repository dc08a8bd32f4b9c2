"""Grouped Triton apply: Y_k = X_k M_k for every participant k in one launch, with the per-dimension
sums and sums of squares of the stored (cast) targets taken in the same pass.

Reads top to bottom as kernel -> wrapper. Built for K <= a few hundred groups of m_k rows each
(N = sum m_k up to tens of millions), l_k up to a few thousand, n (the common dimension) ~512.

Layout choice: a device-side table, not packed inputs. The X_k are the big operands (N x l_k
fp16, read once); packing them into one buffer would cost a full extra read + write of every
feature, i.e. more HBM traffic than the kernel itself. So each group keeps its own tensor and a
tiny int64 table carries (pointer, row stride, m_k, l_k, map row offset, output row offset). The
maps are small (l_k x n) and *are* packed into one [sum l_k, n] buffer in the dot dtype, and
all outputs go to one [N, n] buffer that the wrapper returns as per-group views.

Programs: one per (row tile of one group, column tile), column tiles fastest so the programs that
share an X row tile run together and read it from L2; the row-tile -> (group, first row) table
is built on the host (N / BLOCK_M entries). Each program stores its tile cast to the output
dtype and writes the column sums / sums of squares of those cast values to its own slot of a
[row tiles, n] fp32 buffer; the host reduces each group's slice of that buffer in fp64 in a fixed
order (deterministic: no atomics) into per-group statistics [G, n], as align_apply_ref returns.

Roofline note (H200, fp16, n = 512): a row costs 2 l n flops for 2 (l + n) bytes, i.e. 256 flop/B
at l = 512 and 410 flop/B at l = 2048, above the machine balance (989 TFLOP/s / 4.8 TB/s = 206
flop/B). The op is tensor-core bound at those shapes: 80% of HBM bandwidth would need 99% (l=512)
and 160% (l=2048) of dense fp16 peak. bench_align.py reports both fractions.

Precision: X_k is fp16 (stored features, exact in the dot) and the fp32 map goes to the tensor
cores as two fp16 halves, hi = fp16(M s) and lo = fp16(M s - hi), two dots into one fp32
accumulator, times 1/s in the epilogue. s is a per-group power of two that puts max |M_k s| in
[2^13, 2^14): no fp16 overflow, and lo stays clear of fp16's subnormals. Why not one fp16 map:
a fitted map cancels (row sums of |x_i m_ij| ~100x |y_ij| seen on a 256-dim convnet), and
its fp16 rounding (2^-11 relative per entry) then moved targets by 6% of the row's largest
value, where hi + lo moves them by ~1e-5 (fp16 output rounding: 5e-4): the CPU's fp32 product
within float tolerance. Cost: twice the tensor-core work of one fp16 dot (still half of tf32x3's
three passes; the features, the big operand, are read once). bf16 features: bf16 halves (2^-16
relative, ~1e-3 of the row max at that cancellation, under bf16's output rounding); fp32
features: one tf32x3 dot.
"""
from __future__ import annotations

import math

import torch

from .torch_ops import check_align_args
from .uniformity_triton import interpreting, jit

tl = None  # bound by jit() on first use: triton is imported lazily (see uniformity_triton.py)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# group table columns: x pointer, x row stride, m_k, l_k, map row offset, output row offset
_NTAB = 6


def _align_kernel(
    tab_ptr, tiles_ptr, w_ptr, wlo_ptr, inv_ptr, y_ptr, psum_ptr, psq_ptr,  # w, wlo: packed map halves; inv: 1/s_k
    n, stride_w, stride_y,
    NTAB: tl.constexpr, X_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr, SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(n, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    g = tl.load(tiles_ptr + 2 * pid_m)
    row0 = tl.load(tiles_ptr + 2 * pid_m + 1)
    x_ptr = tl.load(tab_ptr + NTAB * g).to(tl.pointer_type(X_DTYPE))
    stride_x = tl.load(tab_ptr + NTAB * g + 1)
    m_g = tl.load(tab_ptr + NTAB * g + 2)
    l_g = tl.load(tab_ptr + NTAB * g + 3)
    w_row0 = tl.load(tab_ptr + NTAB * g + 4)
    y_row0 = tl.load(tab_ptr + NTAB * g + 5)
    # Values read from memory carry no divisibility facts, and without them the compiler emits
    # 2-byte loads (no cp.async): the base, the row stride and l_g (the K mask's bound) must be
    # known multiples of 16 bytes. The wrapper checked every group (else ALIGN = 1); checked in
    # the sm_90 PTX: cp.async.cg 16-byte copies with the hints, ld.global.b16 without.
    x_ptr = tl.multiple_of(x_ptr, 16 if ALIGN > 1 else 1)  # bytes, for a pointer
    stride_x = tl.multiple_of(stride_x, ALIGN)  # elements
    l_g = tl.multiple_of(l_g, ALIGN)

    rows = row0 + tl.arange(0, BLOCK_M)  # int64: row0 comes from the int64 table
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rmask = rows < m_g
    cmask = cols < n
    x_ptrs = x_ptr + rows[:, None] * stride_x + ks[None, :]
    w_ptrs = w_ptr + (w_row0 + ks)[:, None] * stride_w + cols[None, :]
    wlo_ptrs = wlo_ptr + (w_row0 + ks)[:, None] * stride_w + cols[None, :]  # the same layout
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, l_g, BLOCK_K):
        # the K mask also keeps the packed-map read inside this group's l_g rows
        kmask = ks < l_g - k0
        a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if DOT_F32:  # fp32 maps, or bf16 under the interpreter (its bf16 tl.dot is broken)
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if SPLIT:  # the map's low half
            wlo = tl.load(wlo_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            if DOT_F32:
                wlo = wlo.to(tl.float32)
            acc = tl.dot(a, wlo, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_w
        wlo_ptrs += BLOCK_K * stride_w
    acc = acc * tl.load(inv_ptr + g)  # undo the map's power-of-two scale: exact

    y = acc.to(y_ptr.dtype.element_ty)
    y_ptrs = y_ptr + (y_row0 + rows)[:, None] * stride_y + cols[None, :]
    tl.store(y_ptrs, y, mask=rmask[:, None] & cmask[None, :])
    # statistics of the values as stored (the cast), as align_apply_ref takes them
    yf = tl.where(rmask[:, None], y.to(tl.float32), 0.0)
    tl.store(psum_ptr + pid_m * n + cols, tl.sum(yf, axis=0), mask=cmask)
    tl.store(psq_ptr + pid_m * n + cols, tl.sum(yf * yf, axis=0), mask=cmask)


def split_maps(maps: list[torch.Tensor], wdt: torch.dtype, n: int, dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hi, lo, inv): the maps packed [sum l_k, n] in `wdt` as hi = wdt(M_k s_k), lo = wdt(M_k s_k - hi)
    (lo is hi itself, unused, for fp32), and inv = 1/s_k [G] fp32: s_k = 2^(14 - e) for
    max |M_k| in [2^(e-1), 2^e), so max |M_k s_k| is in [2^13, 2^14) (1 for fp32 or a zero map)."""
    scales = []
    for m in maps:
        amax = float(m.abs().max()) if m.numel() else 0.0
        half = wdt != torch.float32 and 0.0 < amax < math.inf
        scales.append(math.ldexp(1.0, max(min(14 - math.frexp(amax)[1], 100), -100)) if half else 1.0)
    scaled = [m.float() * s for m, s in zip(maps, scales)]
    hi = torch.cat([m.to(wdt) for m in scaled]).contiguous()
    lo = hi if wdt == torch.float32 else torch.cat([(m - m.to(wdt).float()).to(wdt) for m in scaled]).contiguous()
    if hi.numel() == 0:  # every l_k = 0: keep valid pointers for the (fully masked) loads
        hi = lo = torch.zeros(1, n, dtype=wdt, device=dev)
    return hi, lo, torch.tensor([1.0 / s for s in scales], dtype=torch.float32, device=dev)


def align_apply_triton(
    xs: list[torch.Tensor],
    maps: list[torch.Tensor],
    out_dtype: torch.dtype = torch.float16,
    *,
    block_m: int = 128,
    block_n: int = 128,
    block_k: int = 64,
    num_warps: int = 8,
    num_stages: int = 3,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """align_apply with one grouped launch; signature of align_apply_ref plus tile sizes.

    All xs must share one dtype among fp16/bf16/fp32 (others are upcast to fp32, a copy) and lie
    on one device; out_dtype must be fp16, bf16 or fp32 (the statistics are fp32 partials).
    """
    n = check_align_args(xs, maps)
    if out_dtype not in _DTYPES:
        raise ValueError(f"align_apply_triton stores fp16/bf16/fp32 targets, not {out_dtype}")
    dev = maps[0].device
    xdt = xs[0].dtype
    if xdt not in _DTYPES or any(x.dtype != xdt for x in xs):
        xdt = torch.float32
    # the kernel needs unit column stride; keep the caller's tensors when they already have it
    xs = [x.to(xdt) if x.dtype != xdt else x for x in xs]
    xs = [x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous() for x in xs]

    # dot dtype: the features' own half type (the map as two halves), fp32 for fp32 features
    wdt = xdt
    w, wlo, inv = split_maps(maps, wdt, n, dev)

    esize = xs[0].element_size()
    aligned = all(x.data_ptr() % 16 == 0 and (x.stride(0) * esize) % 16 == 0 and (x.shape[1] * esize) % 16 == 0
                  for x in xs if x.numel())
    align = 16 // esize if aligned else 1
    sizes = [x.shape[0] for x in xs]
    N = sum(sizes)
    y = torch.empty(N, n, dtype=out_dtype, device=dev)
    tab, tiles = [], []
    w_off = y_off = 0
    for g, (x, m) in enumerate(zip(xs, maps)):
        tab += [x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], w_off, y_off]
        tiles += [v for r0 in range(0, x.shape[0], block_m) for v in (g, r0)]
        w_off += m.shape[0]
        y_off += x.shape[0]
    num_tiles = len(tiles) // 2
    psum = torch.empty(max(num_tiles, 1), n, dtype=torch.float32, device=dev)
    psq = torch.empty_like(psum)
    if num_tiles and n:
        tab_t = torch.tensor(tab, dtype=torch.int64, device=dev)
        tiles_t = torch.tensor(tiles, dtype=torch.int64, device=dev)
        kernel = jit(_align_kernel)
        grid = (num_tiles * -(-n // block_n),)
        kernel[grid](
            tab_t, tiles_t, w, wlo, inv, y, psum, psq, n, w.stride(0), y.stride(0),
            NTAB=_NTAB, X_DTYPE=getattr(tl, str(xdt).removeprefix("torch.")),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_F32=(wdt == torch.float32 or (interpreting() and wdt == torch.bfloat16)),
            PRECISION="tf32x3" if wdt == torch.float32 else "tf32",
            ALIGN=align, SPLIT=wdt != torch.float32, num_warps=num_warps,
            # fp32 operands: 3 stages would take 224 KiB of shared memory on sm_90 (limit 227)
            num_stages=min(num_stages, 2) if wdt == torch.float32 else num_stages,
        )
    # per-group statistics: a group's row tiles are a contiguous range of the partials; one
    # fixed-order fp64 sum per group (index_add_ would use atomics on CUDA: not deterministic)
    s = torch.zeros(len(xs), n, dtype=torch.float64, device=dev)
    ss = torch.zeros_like(s)
    t0 = 0
    for g, m_g in enumerate(sizes):
        t1 = t0 + -(-m_g // block_m)
        if t1 > t0:
            s[g] = psum[t0:t1].double().sum(0)
            ss[g] = psq[t0:t1].double().sum(0)
        t0 = t1
    return list(torch.split(y, sizes)), s, ss
