"""Pure-torch references for every kernel: the test oracles, written for obviousness, not speed.

Imports no triton. Each public function here has the exact signature of its fast
counterpart in the dispatcher (`coopt_fast.kernels`); the fast CPU fallbacks are in
torch_ops.py, the Triton kernels in uniformity_triton.py and align_apply_triton.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def uniformity_ref(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """U(F) = log mean_{i<j} exp(-t ||f_i - f_j||^2) on L2-normalised rows (Wang & Isola 2020).

    The oracle: materialises all n(n-1)/2 pairwise distances, O(n^2) memory.
    Rows of zeros stay zero after normalisation (F.normalize clamps the norm), so a zero
    row sits at distance 1 from every unit row.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs a 2-D tensor with at least 2 rows, got shape {tuple(x.shape)}")
    xn = F.normalize(x.float(), dim=1)
    return torch.pdist(xn, p=2).pow(2).mul(-t).exp().mean().log()


def uniformity_tiled_ref(x: torch.Tensor, t: float = 2.0, block: int = 1024, block_cols: int = 4096) -> torch.Tensor:
    """The competent plain-torch baseline (benchmarks, not an oracle): what a careful engineer
    writes without kernels. Rows normalised once, in x's dtype for the GEMM (fp16/bf16/fp32,
    fp32 otherwise); tiles of x^ x^T over j >= i, d^2 = sq_i + sq_j - 2 g and exp(-t d^2) summed in
    place (no n x n matrix: O(block * block_cols) temporaries), the diagonal block's lower triangle
    and diagonal masked. fp32 tile sums, fp64 total. Underflows to -inf at large t, like the reference.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs a 2-D tensor with at least 2 rows, got shape {tuple(x.shape)}")
    dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    xh = F.normalize(x.float(), dim=1).to(dtype)
    sq = xh.float().square().sum(1)
    n, total = x.shape[0], torch.zeros((), dtype=torch.float64, device=x.device)
    lower = torch.ones(block, block, dtype=torch.bool, device=x.device).tril_()
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        for j0 in range(i0, n, block_cols):
            j1 = min(j0 + block_cols, n)
            d2 = (xh[i0:i1] @ xh[j0:j1].T).float().mul_(-2).add_(sq[i0:i1, None]).add_(sq[None, j0:j1])
            e = d2.mul_(-t).exp_()
            if j0 == i0:  # pairs i >= j of the diagonal block
                e[:, : i1 - i0].masked_fill_(lower[: i1 - i0, : i1 - i0], 0.0)
            total += e.sum(dtype=torch.float64)
    return (total / (n * (n - 1) / 2)).log().float()


def align_apply_ref(
    xs: list[torch.Tensor], maps: list[torch.Tensor], out_dtype: torch.dtype = torch.float16
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Apply each group's l_k x n map to its own rows: ys[k] = (xs[k] @ maps[k]).to(out_dtype).

    xs[k]: [m_k, l_k] (stored float16 features, any float dtype accepted); maps[k]: [l_k, n].
    Returns (ys, sums, sumsqs): per-group, per-dimension sums and sums of squares over the
    rows of the *cast* targets (what is stored), float64 [G, n] — the statistics merge needs
    for z-scoring. Per group because each participant's file carries its own statistics.
    """
    if len(xs) != len(maps) or not xs:
        raise ValueError("align_apply needs one map per group and at least one group")
    n = maps[0].shape[1]
    ys = []
    s = torch.zeros(len(xs), n, dtype=torch.float64, device=maps[0].device)
    ss = torch.zeros(len(xs), n, dtype=torch.float64, device=maps[0].device)
    for g, (x, m) in enumerate(zip(xs, maps)):
        if x.dim() != 2 or m.dim() != 2 or x.shape[1] != m.shape[0] or m.shape[1] != n:
            raise ValueError(f"group shapes do not chain: x {tuple(x.shape)} @ map {tuple(m.shape)} (n={n})")
        y = torch.matmul(x.float(), m.float()).to(out_dtype)
        yd = y.double()
        s[g] = yd.sum(0)
        ss[g] = yd.square().sum(0)
        ys.append(y)
    return ys, s, ss
