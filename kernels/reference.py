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
