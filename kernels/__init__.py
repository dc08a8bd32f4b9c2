"""Kernel dispatcher: the one place that picks an implementation.

`COOPT_KERNELS=auto|torch|triton` (default auto), read at every call: auto = Triton for CUDA
tensors (when triton imports), the blocked torch fallback (`torch_ops.py`) elsewhere. `triton` on
CPU tensors works only under TRITON_INTERPRET=1 (how CI tests the kernels); an explicit request
that cannot be met raises. `reference.py` holds the oracles (`*_ref`), with the same signatures.
"""
from __future__ import annotations

import os

import torch

from . import align_apply_triton as _align_mod
from . import uniformity_triton as _uniformity_mod  # imports triton only when a Triton kernel first runs
from .reference import align_apply_ref, uniformity_ref
from .torch_ops import align_apply_torch, check_align_args, uniformity_torch

MODES = ("auto", "torch", "triton")


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


__all__ = ["uniformity", "align_apply", "uniformity_ref", "align_apply_ref", "kernel_mode", "use_triton"]
