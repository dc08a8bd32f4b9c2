"""Pure-torch fast paths: the CPU fallbacks behind the dispatcher (no triton here).

They compute what `reference.py` computes, with the memory and pass structure of the Triton
kernels: uniformity over blocked Gram tiles (O(n + B*l + B^2) memory instead of the reference's
n(n-1)/2 distances), align_apply over row blocks that stay in cache while their statistics are
taken. Shared pieces the Triton wrappers reuse (row preparation, the final log-sum-exp) live
here too, so both paths define zero rows and large t the same way.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# exp2 arguments are -t*||a-b||^2*log2(e) >= -4*t*log2(e). Up to t = 20 that is >= -115.4, above
# fp32's smallest normal exponent (-126): no term underflows, so sums need no max-shift. Larger t
# (and only then) pays for a per-tile max and a log-sum-exp combine.
SHIFT_FREE_MAX_T = 20.0


def check_uniformity_args(x: torch.Tensor, t: float) -> None:
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs a 2-D tensor with at least 2 rows, got shape {tuple(x.shape)}")
    if not t >= 0:  # also rejects NaN
        raise ValueError(f"uniformity needs a temperature t >= 0, got {t}")


def normalized_rows(
    x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None, chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows L2-normalised in fp32 (F.normalize, as the reference), then cast to `dtype`.

    Returns (xh [n, l] in `dtype`, written into `out` if given, sq [n] fp32): sq holds the
    squared norms of the rows *as cast*, so ||a-b||^2 = sq_a + sq_b - 2 a.b is consistent with
    Gram tiles of the same cast values. Zero rows stay zero (F.normalize clamps the norm at
    1e-12): sq = 0, so a zero row sits at squared distance sq_b (=1) from a unit row and 0 from
    another zero row: the reference's semantics, with no special case. Works in row chunks so
    the fp32 temporaries stay O(chunk * l) (n = 1M, l = 2048 would otherwise add 2 x 8 GiB).
    """
    n, l = x.shape
    xh = torch.empty(n, l, dtype=dtype, device=x.device) if out is None else out
    sq = torch.empty(n, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        xh[r0:r1] = F.normalize(x[r0:r1].float(), dim=1)
        c = xh[r0:r1].float()
        sq[r0:r1] = (c * c).sum(1)
    return xh, sq


def finish_uniformity(log2_sum: torch.Tensor | float, n: int) -> float:
    """U = ln(sum / npairs) from log2(sum) (fp64): the sums are kept in base 2 because the
    kernels use exp2 with log2(e) folded into their coefficients."""
    return float(log2_sum) * LN2 - math.log(n * (n - 1) / 2)


def uniformity_torch(x: torch.Tensor, t: float = 2.0, block: int = 1024, block_cols: int = 2048) -> torch.Tensor:
    """Blocked-Gram uniformity (uniformity_ref's signature plus tile sizes): all pairs i < j."""
    check_uniformity_args(x, t)
    log2_sum = uniformity_log2sum_torch(x, t, None, block, block_cols)
    return torch.tensor(finish_uniformity(log2_sum, x.shape[0]), dtype=torch.float32, device=x.device)


def uniformity_log2sum_torch(
    x: torch.Tensor, t: float = 2.0, rows: tuple[int, int] | None = None, block: int = 1024, block_cols: int = 2048
) -> float:
    """log2 of sum exp(-t ||x^_i - x^_j||^2) over the pairs i < j with r0 <= i < r1 (rows = (r0, r1),
    default all rows): one rank's band of the pair triangle (kernels.uniformity_sharded); -inf for
    a band without pairs. Any r0 < r1 works; tiles start at r0 and each band's first block is its
    diagonal block.

    Blocked Gram: tiles of F^F^T with j >= i only, the diagonal masked exactly.

    exp(-t d^2) = 2^(C g_ij + a_i + a_j) with C = 2 t log2(e), a_i = -t log2(e) ||x^_i||^2. The
    row terms are folded into the GEMM by augmenting the rows, [C x^_i, a_i, 1] . [x^_j, 1, a_j]
    = C g_ij + a_i + a_j, so a tile costs one mm + one in-place exp2 + one sum: no broadcast
    passes, and few parallel regions per tile (each ends in a barrier, which on a shared 2-core
    machine can cost a scheduler quantum). Tiles are block x block_cols; each row band starts at
    its diagonal block, whose lower triangle and diagonal are masked. Tile sums are fp32
    (<= 2M terms in (0, 1]) accumulated across tiles in fp64 Python floats, in a fixed order.

    Memory: O(n + B*l + B^2), not even the O(n*l) of a normalised copy: rows are normalised
    (F.normalize's x / max(||x||, 1e-12), in fp32) into the tile's operand buffers as they are
    used, which costs ~1/block of the GEMM's work. Defaults: ~14 MiB for l = 512.
    """
    check_uniformity_args(x, t)
    n, l = x.shape
    r0, r1 = rows or (0, n)
    if not 0 <= r0 <= r1 <= n:
        raise ValueError(f"uniformity rows {rows} are not a range of the {n} rows")
    if r1 - r0 == 0:
        return -math.inf
    dev = x.device
    C = 2.0 * t * LOG2E
    # pass 1, O(2048 * l) temporaries: F.normalize's denominators and the row terms a_i (rows
    # before r0 are in no pair of the band)
    denom = torch.empty(n, 1, dtype=torch.float32, device=dev)
    rowc = torch.empty(n, dtype=torch.float32, device=dev)
    for c0 in range(r0, n, 2048):
        c1 = min(c0 + 2048, n)
        xf = x[c0:c1].float()
        d = torch.linalg.vector_norm(xf, dim=1, keepdim=True).clamp_min_(1e-12)
        xh = xf / d  # the values the tiles below recompute with torch.div(x, denom)
        rowc[c0:c1] = (xh * xh).sum(1) * (-t * LOG2E)
        denom[c0:c1] = d
    block, block_cols = min(block, r1 - r0), min(max(block_cols, block), n - r0)
    a = torch.empty(block, l + 2, dtype=torch.float32, device=dev)  # rows [C x^_i, a_i, 1]
    a[:, l + 1] = 1.0
    b = torch.empty(block_cols, l + 2, dtype=torch.float32, device=dev)  # rows [x^_j, 1, a_j]
    b[:, l] = 1.0
    tile = torch.empty(block * block_cols, dtype=torch.float32, device=dev)
    # lower triangle + diagonal of the diagonal block: pairs i >= j, excluded exactly
    lower = torch.ones(block, block, dtype=torch.bool, device=dev).tril_()
    shift = t > SHIFT_FREE_MAX_T
    total, top = 0.0, -math.inf  # sum of 2^(e - top) over the pairs seen so far; top = running max
    for i0 in range(r0, r1, block):
        i1 = min(i0 + block, r1)
        ai = a[: i1 - i0]
        torch.div(x[i0:i1], denom[i0:i1], out=ai[:, :l]).mul_(C)
        ai[:, l] = rowc[i0:i1]
        for j0 in range(i0, n, block_cols):
            j1 = min(j0 + block_cols, n)
            bj = b[: j1 - j0]
            torch.div(x[j0:j1], denom[j0:j1], out=bj[:, :l])
            bj[:, l + 1] = rowc[j0:j1]
            e = tile[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
            torch.mm(ai, bj.T, out=e)
            if j0 == i0:
                w = min(i1 - i0, j1 - j0)
                e[:, :w].masked_fill_(lower[: i1 - i0, :w], -math.inf)
            # e <= 0 (d^2 >= 0) fails by a few ulp of C for near-duplicates. At t <= 20 that
            # changes U by ~1e-7 and a clamp would be one more pass over the tile; at t = 1000
            # (C = 2885) it is ~3e-4, so the shift path clamps, as the kernel always does.
            if shift:
                m = e.clamp_(max=0.0).max().item()
                if m == -math.inf:  # the 1-row diagonal tile at the end: no pairs
                    continue
                s = e.sub_(m).exp2_().sum().item()
                if m > top:
                    total, top = total * 2.0 ** (top - m) + s, m
                else:
                    total += s * 2.0 ** (m - top)
            else:
                total += e.exp2_().sum().item()
    # total > 0 for a band with pairs (every unshifted term >= 2^-116; a shifted tile holds its
    # max, 2^0), or NaN if the input held NaN/inf, which math.log2 passes through.
    return math.log2(total) + (top if shift else 0.0) if total != 0 else -math.inf


def check_align_args(xs: list[torch.Tensor], maps: list[torch.Tensor]) -> int:
    """Validate the groups exactly as align_apply_ref does; returns the common dimension n."""
    if len(xs) != len(maps) or not xs:
        raise ValueError("align_apply needs one map per group and at least one group")
    n = maps[0].shape[1] if maps[0].dim() == 2 else -1
    for x, m in zip(xs, maps):
        if x.dim() != 2 or m.dim() != 2 or x.shape[1] != m.shape[0] or m.shape[1] != n:
            raise ValueError(f"group shapes do not chain: x {tuple(x.shape)} @ map {tuple(m.shape)} (n={n})")
    return n


def align_apply_torch(
    xs: list[torch.Tensor],
    maps: list[torch.Tensor],
    out_dtype: torch.dtype = torch.float16,
    block_rows: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """align_apply_ref in row blocks: per block one fp32 GEMM into a reused buffer, the cast into
    the output, and the statistics of the cast values while the block is still in cache.

    The reference materialises, per group, an fp32 copy of x, the fp32 product, and two fp64
    copies of the whole output (y.double(), its square). Here each block is read back once from
    cache; column sums of a block are fp32 (<= block_rows terms of fp16/bf16-representable
    values, whose squares are exact in fp32) and accumulate across blocks in fp64, so nothing
    larger than [G, n] is ever float64. Returns per-group statistics [G, n], as the reference.
    """
    n = check_align_args(xs, maps)
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        from .reference import align_apply_ref  # e.g. fp64 targets: stats need the output's precision

        return align_apply_ref(xs, maps, out_dtype)
    dev = maps[0].device
    if block_rows is None:
        # 32 MiB fp32 output blocks (n = 512 -> 16384 rows): few, large parallel regions, since
        # each ends in an OpenMP barrier that a busy machine turns into a scheduler quantum.
        block_rows = max(64, (1 << 23) // max(n, 1))
    s = torch.zeros(len(xs), n, dtype=torch.float64, device=dev)
    ss = torch.zeros(len(xs), n, dtype=torch.float64, device=dev)
    # reused buffers: a fresh multi-MiB tensor per block would be mmapped and page-faulted anew
    buf = torch.empty(block_rows, n, dtype=torch.float32, device=dev)
    xbuf = torch.empty(block_rows * max(x.shape[1] for x in xs), dtype=torch.float32, device=dev)
    ys = []
    for g, (x, m) in enumerate(zip(xs, maps)):
        mf = m.float().contiguous()
        y = torch.empty(x.shape[0], n, dtype=out_dtype, device=dev)
        for r0 in range(0, x.shape[0], block_rows):
            r1 = min(r0 + block_rows, x.shape[0])
            xb = xbuf[: (r1 - r0) * x.shape[1]].view(r1 - r0, x.shape[1]).copy_(x[r0:r1])
            yb = buf[: r1 - r0]
            torch.mm(xb, mf, out=yb)
            y[r0:r1].copy_(yb)  # the cast that is stored ...
            if out_dtype != torch.float32:
                yb.copy_(y[r0:r1])  # ... and its values back in fp32 (exact), for the statistics
            s[g] += yb.sum(0)
            ss[g] += yb.square_().sum(0)
        ys.append(y)
    return ys, s, ss
