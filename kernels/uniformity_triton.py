"""Fused Triton uniformity: exp-and-sum over tiles of F^F^T, never writing the n x n matrix.

Reads top to bottom as kernel -> wrapper. Built for n from 2 to ~1M rows, l up to a few
thousand; the O(n^2 l) GEMM dominates, so the design follows a tensor-core matmul:

* Tiles: square BLOCK x BLOCK tiles (i <= j) only. The triangle of T(T+1)/2 tiles is folded into
  a (T/2) x (T+1) rectangle (row r pairs with row T-1-r), then walked in the grouped order of the
  Triton matmul tutorial, so programs running together share a band of GROUP row blocks and a
  window of column blocks in L2. In the folded half the column block is c-1 for every row of a
  band: reuse is as good as in the unfolded half.
* Loads: rows zero-padded to a multiple of BLOCK_K (zeros change no dot product), rows past n
  wrapped: no masks in the K loop, aligned 16-byte copies for any n and l.
* Epilogue in registers: e = C g + a_i + a_j is log2 of exp(-t d^2) (C = 2 t log2 e,
  a_i = -t log2(e) ||x_i||^2, see torch_ops.uniformity_torch), clamped at 0 (d^2 >= 0), masked to
  strict i < j (the diagonal excluded exactly, as pdist does) and to rows < n, then exp2 + sum.
* Large t: when t > SHIFT_FREE_MAX_T every term may underflow fp32, so each tile also reports its
  max m and sums 2^(e - m); the host combines (m, s) pairs as a log-sum-exp. For t <= 20 no term
  can underflow and the tile max (a second cross-warp reduction) is skipped.
* Determinism: each program writes its partial to its own slot; a fixed-order fp64 torch sum
  follows. No atomics, so the same input gives the same bits.

Numerics trap: the Gram form 2 - 2 a.b cancels for near-duplicate rows, so d^2 carries an error
of ~eps(dtype) (bf16: ~4e-3). At t = 2 that is invisible; at t = 1000 only fp32 inputs are
meaningful (the torch fallback and the fp32 path here agree with an fp64 pdist there).
"""
from __future__ import annotations

import os

import torch

from .torch_ops import LOG2E, SHIFT_FREE_MAX_T, check_uniformity_args, finish_uniformity, normalized_rows

# triton is imported on first use (load_triton), not with the package: the torch paths and
# `import coopt_fast` must work without it, and under TRITON_INTERPRET=1 triton has to be
# imported *after* the variable is set (see jit() below). The kernels' bodies name `tl`; jit()
# binds it in their module.
triton = tl = None


def _uniformity_kernel(
    x_ptr, rowc_ptr, part_s_ptr, part_m_ptr,  # xh [n, l]; rowc [n] = a_i; partials [num programs]
    n, l_pad, stride_x, coef,  # l_pad: l zero-padded to BLOCK_K
    rb0, Kp, Tc, row_hi,  # the band: row blocks rb0 .. rb0+Kp-1 (Kp even), column blocks < Tc, rows < row_hi
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    SHIFT: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    # grouped order over the folded (Kp/2) x W rectangle: band row r (Tc - rb0 - r tiles) pairs
    # with band row Kp-1-r (Tc - rb0 - Kp + 1 + r tiles), W tiles together for every r. The whole
    # triangle is the band rb0 = 0, Kp = Tc = T rounded up to even.
    R = Kp // 2
    W = 2 * (Tc - rb0) - Kp + 1
    width = GROUP * W
    first_r = (pid // width) * GROUP
    group_size = tl.minimum(R - first_r, GROUP)
    r = first_r + (pid % width) % group_size
    c = (pid % width) // group_size
    w_upper = Tc - rb0 - r
    upper = c < w_upper
    bi = tl.where(upper, rb0 + r, rb0 + Kp - 1 - r)
    bj = tl.where(upper, rb0 + r + c, rb0 + Kp - 1 - r + c - w_upper)
    # (with K odd, block rb0+Kp-1 lies past the band: past n, or another rank's rows; masked
    # by row_hi like any edge)

    offs_m = bi * BLOCK + tl.arange(0, BLOCK)
    offs_n = bj * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past n are wrapped instead of masked and the wrapper pads l with zero columns to a
    # multiple of BLOCK_K, so every load is unpredicated and 16-byte aligned for any n and l
    # (cp.async 16-byte copies in the sm_90 PTX); the epilogue masks the wrapped rows' pairs.
    # int64 offsets: n * l reaches 2^31 at n = 1M, l = 2048.
    rm = (offs_m % n).to(tl.int64)
    rn = (offs_n % n).to(tl.int64)
    a_ptrs = x_ptr + rm[:, None] * stride_x + offs_k[None, :]
    b_ptrs = x_ptr + rn[None, :] * stride_x + offs_k[:, None]  # B = xh^T tile, [BLOCK_K, BLOCK]
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, l_pad // BLOCK_K):  # no K mask: the padding columns are zeros
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        if DOT_F32:  # interpreter only: its tl.dot multiplies bf16 bit patterns (triton#11584)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    ci = tl.load(rowc_ptr + rm)
    cj = tl.load(rowc_ptr + rn)
    e = tl.minimum(acc * coef + ci[:, None] + cj[None, :], 0.0)
    # strict i < j (for bi < bj every pair qualifies), j < n (which implies i < n), i in the band
    valid = (offs_m[:, None] < offs_n[None, :]) & (offs_n[None, :] < n) & (offs_m[:, None] < row_hi)
    e = tl.where(valid, e, -float("inf"))
    if SHIFT:
        m = tl.max(tl.max(e, axis=1), axis=0)
        s = tl.sum(tl.sum(tl.exp2(e - tl.where(m == -float("inf"), 0.0, m)), axis=1), axis=0)
        tl.store(part_m_ptr + pid, m)  # -inf for a tile without pairs: weight 0 on the host
    else:
        s = tl.sum(tl.sum(tl.exp2(e), axis=1), axis=0)
    tl.store(part_s_ptr + pid, s)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def load_triton():
    """Import triton (once); a clear RuntimeError if it cannot be imported."""
    global triton, tl
    if triton is None:
        try:
            import triton as _triton
            import triton.language as _tl
        except Exception as exc:  # ImportError, or a broken install failing while it imports
            raise RuntimeError(
                f"triton is not importable ({exc!r}); install it, or set COOPT_KERNELS=torch"
            ) from exc
        triton, tl = _triton, _tl
    return triton


_JIT: dict[str, object] = {}


def jit(fn):
    """triton.jit(fn) on first use, with `tl` bound in fn's module.

    Trap: triton decides interpreter vs compiler when it decorates, and its own helpers
    (tl.cdiv, tl.sum, tl.max, ...) are decorated when triton.language is imported. So the mode
    is fixed by whoever imports triton first; a later change of TRITON_INTERPRET would fail
    deep in the interpreter ("Cannot call @triton.jit'd outside of the scope of a kernel"), so
    it is refused here with the fix.
    """
    load_triton()
    from triton.runtime.interpreter import InterpretedFunction

    imported_interpreted = isinstance(tl.cdiv, InterpretedFunction)
    if imported_interpreted != interpreting():
        was = "1" if imported_interpreted else "unset/0"
        raise RuntimeError(
            f"triton was imported with TRITON_INTERPRET={was} but it is "
            f"{os.environ.get('TRITON_INTERPRET', 'unset')!r} now; set TRITON_INTERPRET before anything "
            "imports triton (for tests: at the top of the test module)"
        )
    key = fn.__module__ + "." + fn.__qualname__
    if key not in _JIT:
        fn.__globals__["tl"] = tl
        _JIT[key] = triton.jit(fn)
    return _JIT[key]


def uniformity_triton(
    x: torch.Tensor,
    t: float = 2.0,
    *,
    block: int = 128,
    block_k: int = 64,
    group: int = 8,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """Uniformity with the fused kernel; signature of uniformity_ref plus tile sizes.

    Compute dtype = x.dtype for fp16/bf16/fp32 (fp32 runs as tf32x3, ~fp32 accurate), fp32 for
    anything else. Defaults target H100/H200 (bf16 128x128x64 tiles, 8 warps, 3 stages); tests
    pass small tiles (>= 16, tl.dot's minimum) so the interpreter finishes in seconds.
    """
    log2_sum = uniformity_log2sum_triton(x, t, None, block=block, block_k=block_k, group=group,
                                         num_warps=num_warps, num_stages=num_stages)
    return torch.tensor(finish_uniformity(log2_sum, x.shape[0]), dtype=torch.float32, device=x.device)


def uniformity_log2sum_triton(
    x: torch.Tensor,
    t: float = 2.0,
    rows: tuple[int, int] | None = None,
    *,
    block: int = 128,
    block_k: int = 64,
    group: int = 8,
    num_warps: int = 8,
    num_stages: int = 3,
) -> float:
    """log2 of the pair sum over i < j with r0 <= i < r1 (rows = (r0, r1), default all rows), as
    torch_ops.uniformity_log2sum_torch; -inf for a band without pairs. r0 must be a multiple of
    `block` (the band is whole row blocks; r1 too, unless it is n)."""
    check_uniformity_args(x, t)
    n, l = x.shape
    r0, r1 = rows or (0, n)
    if not 0 <= r0 <= r1 <= n or r0 % block or (r1 % block and r1 != n):
        raise ValueError(f"uniformity rows {rows}: a range of the {n} rows in whole blocks of {block}")
    if r1 == r0:
        return float("-inf")
    dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    l_pad = max(-(-l // block_k), 1) * block_k
    # rows before r0 are in no pair of the band: zeros there, never read
    xh = torch.zeros(n, l_pad, dtype=dtype, device=x.device)
    rowc = torch.zeros(n, dtype=torch.float32, device=x.device)
    rowc[r0:] = normalized_rows(x[r0:], dtype, out=xh[r0:, :l])[1].mul_(-t * LOG2E)
    T = -(-n // block)
    rb0, K = r0 // block, -(-r1 // block) - r0 // block
    Kp = K + (K & 1)
    Tc = max(T, rb0 + Kp)
    grid = Kp // 2 * (2 * (Tc - rb0) - Kp + 1)
    shift = t > SHIFT_FREE_MAX_T
    part_s = torch.empty(grid, dtype=torch.float32, device=x.device)
    part_m = torch.empty(grid if shift else 1, dtype=torch.float32, device=x.device)
    jit(_uniformity_kernel)[(grid,)](
        xh, rowc, part_s, part_m, n, l_pad, xh.stride(0), 2.0 * t * LOG2E, rb0, Kp, Tc, r1,
        BLOCK=block, BLOCK_K=block_k, GROUP=group, SHIFT=shift,
        DOT_F32=(interpreting() and dtype == torch.bfloat16),
        PRECISION="tf32x3" if dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        # fp32 tiles are twice the bytes: 3 stages of 128x64 A and B tiles would need 192 KiB of
        # shared memory (224 KiB in the sm_90 build, at the 227 KiB limit); 2 stages fit easily
        num_stages=min(num_stages, 2) if dtype == torch.float32 else num_stages,
    )
    s = part_s.double()
    if shift:
        m = part_m.double()
        top = m.max()
        if top == float("-inf"):  # no pairs in any tile (a band of the last row)
            return float("-inf")
        return float(top + torch.log2((s * torch.exp2(m - top)).sum()))
    return float(torch.log2(s.sum()))
