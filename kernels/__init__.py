"""Kernel dispatcher: the one place that picks an implementation.

`COOPT_KERNELS=auto|torch|triton` (default auto), read at every call: auto = Triton for CUDA
tensors (when triton imports), the blocked torch fallback (`torch_ops.py`) elsewhere. `triton` on
CPU tensors works only under TRITON_INTERPRET=1 (how CI tests the kernels); an explicit request
that cannot be met raises. `reference.py` holds the oracles (`*_ref`), with the same signatures.
"""
from __future__ import annotations

import math
import os

import torch

from . import align_apply_triton as _align_mod
from . import uniformity_triton as _uniformity_mod  # imports triton only when a Triton kernel first runs
from .reference import align_apply_ref, uniformity_ref
from .torch_ops import (LN2, align_apply_torch, check_align_args, check_uniformity_args, finish_uniformity,
                        uniformity_log2sum_torch, uniformity_torch)

MODES = ("auto", "torch", "triton")
# Rows per unit of a rank's band in uniformity_sharded: the Triton kernel's row block (its bands
# are whole blocks), and fine enough that G bands of n >= G * 128 rows carry about equal work.
BAND_UNIT = 128


def kernel_mode() -> str:
    """The COOPT_KERNELS override, validated (read at call time: tests monkeypatch it)."""
    mode = os.environ.get("COOPT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"COOPT_KERNELS={mode!r} is not one of {'|'.join(MODES)}")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    """True to run the Triton kernel on tensors like `t`; raises if triton is asked for and cannot run."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "auto":
        if not t.is_cuda:
            return False  # CPU tensors never import triton
        try:
            _uniformity_mod.load_triton()
        except RuntimeError:
            return False
        return True
    # checked before importing triton: an import now would fix its mode to "compiled"
    if not t.is_cuda and not _uniformity_mod.interpreting():
        raise RuntimeError(
            f"COOPT_KERNELS=triton needs CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 to run the "
            "Triton kernels on the CPU (slow, for tests), or COOPT_KERNELS=torch"
        )
    _uniformity_mod.load_triton()  # raises "triton is not importable (...)" when it is not
    return True


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """U(F) = log mean_{i<j} exp(-t ||f_i - f_j||^2) on L2-normalised rows, as a 0-d float32 tensor.

    Matches uniformity_ref wherever the reference is finite. Where the reference underflows to
    -inf (large t and no near-duplicate rows: every fp32 exp(-t d^2) is 0), this returns the
    true, finite value (a max-shifted log-sum-exp); finite inputs never give -inf here. NaN/inf
    inputs give NaN. Zero rows stay zero after normalisation, as in the reference (a zero row is
    at squared distance 1 from unit rows, 0 from other zero rows). t must be >= 0.
    """
    if use_triton(x):
        return _uniformity_mod.uniformity_triton(x, t)
    return uniformity_torch(x, t)


def uniformity_log2sum(x: torch.Tensor, t: float = 2.0, rows: tuple[int, int] | None = None) -> float:
    """log2 of sum exp(-t ||x^_i - x^_j||^2) over the pairs i < j with i in rows = (r0, r1) (all
    rows by default; r0 a multiple of BAND_UNIT): one band of uniformity's pair sum, -inf if it
    has no pairs. U = finish_uniformity(log2 of the total, n)."""
    if use_triton(x):
        return _uniformity_mod.uniformity_log2sum_triton(x, t, rows, block=BAND_UNIT)
    return uniformity_log2sum_torch(x, t, rows)


def row_bands(n: int, parts: int, unit: int = BAND_UNIT) -> list[tuple[int, int]]:
    """`parts` contiguous row ranges covering 0..n, cut at multiples of `unit`, each with about
    the same number of pairs i < j (row i has n-1-i of them, so early bands are narrower).
    Rows before cut b hold P(b) = b(n-1) - b(b-1)/2 pairs; cut k solves P(b) = k/parts of them."""
    total, cuts = n * (n - 1) / 2, [0]
    for k in range(1, parts):
        disc = max((2 * n - 1) ** 2 - 8 * total * k / parts, 0.0)
        b = round((2 * n - 1 - math.sqrt(disc)) / 2 / unit) * unit
        cuts.append(min(max(b, cuts[-1]), n))
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:]))


def uniformity_sharded(x: torch.Tensor, t: float = 2.0, group=None) -> torch.Tensor:
    """uniformity(x, t) with the pairs split across the ranks of a torch.distributed `group`
    (None, or one rank: plain uniformity). Every rank passes the same x (all n rows: a band's
    pairs reach every later row) and gets the same full-n value.

    Rank r sums its band of rows (row_bands: about equal pair counts) on x's device, as a log2
    sum (a log-sum-exp: finite where fp32 sums underflow, at large t). The G log2 sums are
    all-gathered (G fp64 scalars, as CPU tensors: `group` should be a gloo group, e.g.
    distributed.coord_group()) and combined as a log-sum-exp in rank order on every rank, so
    every rank holds the same bits. Against one process: the same pairs in other tiles and
    another summation order, equal to ~1e-7 relative in fp32 (tested: 2 gloo ranks).
    Every rank must call it (a collective), in the same order as its other collectives.
    """
    import torch.distributed as dist

    if group is None or dist.get_world_size(group) == 1:
        return uniformity(x, t)
    check_uniformity_args(x, t)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor([uniformity_log2sum(x, t, row_bands(x.shape[0], size)[rank])], dtype=torch.float64)
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine, group=group)
    return torch.tensor(finish_uniformity(combine_log2(parts), x.shape[0]), dtype=torch.float32, device=x.device)


def combine_log2(parts) -> float:
    """log2(sum 2^p) of bands' log2 sums, in the given order (fp64 log-sum-exp: max-shifted, so
    bands whose sums are far below fp32's range combine exactly; -inf bands weigh nothing)."""
    return float(torch.logsumexp(torch.cat([torch.as_tensor(p, dtype=torch.float64).reshape(1) for p in parts])
                                 * LN2, 0)) / LN2


def align_apply(
    xs: list[torch.Tensor], maps: list[torch.Tensor], out_dtype: torch.dtype = torch.float16
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """ys[k] = (xs[k] @ maps[k]).to(out_dtype) for every group, plus per-group sums and sums of
    squares of the cast targets (float64 [G, n]), as align_apply_ref, taken in the same pass.
    On the Triton path the ys[k] are row-slices (views) of one [sum m_k, n] buffer."""
    check_align_args(xs, maps)
    # fp64 (or other) targets: only the torch path keeps statistics in the output's precision
    if use_triton(maps[0]) and (out_dtype in (torch.float16, torch.bfloat16, torch.float32)
                                or kernel_mode() == "triton"):
        return _align_mod.align_apply_triton(xs, maps, out_dtype)
    return align_apply_torch(xs, maps, out_dtype)


__all__ = ["uniformity", "uniformity_sharded", "uniformity_log2sum", "row_bands", "combine_log2", "align_apply", "uniformity_ref",
           "align_apply_ref", "kernel_mode", "use_triton"]
