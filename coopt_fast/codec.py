"""Target storage dtypes: what an upload and the merged store hold per target value.

  float16   2 bytes/value (default). Exact cast of the fp32 product.
  bfloat16  2 bytes/value, stored as the raw uint16 bits (HDF5 has no bfloat16 type).
            Same size as float16, wider range, 3 fewer mantissa bits: only worth it when
            targets overflow float16 (|y| > 65504), which aligned targets do not.
  int8      1 byte/value + one float32 scale per row (absmax/127). Exact range per row.
  int8-dim  1 byte/value + one float32 scale per dimension and participant, calibrated on
            the participant's shared-set targets (absmax x 1.25 / 127); values outside are
            clipped, and the fraction clipped is recorded.
The loader dequantises on the fly (`decode`). Statistics for z-scoring are taken on the
decoded values, i.e. on what the student will see.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import CooptError

TARGET_DTYPES = ("float16", "bfloat16", "int8", "int8-dim")
DIM_HEADROOM = 1.25  # int8-dim: S's absmax x 1.25 covers the shard's tail on our data (clipped < 0.1%)


def check(name: str) -> str:
    if name not in TARGET_DTYPES:
        raise CooptError(f"--target-dtype {name!r}: use one of {', '.join(TARGET_DTYPES)}")
    return name


def storage_dtype(name: str) -> np.dtype:
    return np.dtype({"float16": np.float16, "bfloat16": np.uint16}.get(name, np.int8))


def kernel_dtype(name: str) -> torch.dtype:
    """What align_apply should cast to: the stored type itself, or fp32 before quantising."""
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


def bytes_per_row(name: str, n: int) -> int:
    return n * storage_dtype(name).itemsize + (4 if name == "int8" else 0)


def dim_scale(shared_targets: torch.Tensor) -> torch.Tensor:
    """int8-dim: per-dimension scale from the shared-set targets [|S|, n]."""
    amax = shared_targets.float().abs().amax(0) * DIM_HEADROOM
    return torch.where(amax > 0, amax / 127, torch.ones_like(amax))


def encode(y: torch.Tensor, name: str, scale: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Targets [m, n] (already in kernel_dtype(name)) -> (stored array, per-row scales or None)."""
    if name == "float16":
        return y.numpy(), None
    if name == "bfloat16":
        return y.view(torch.int16).numpy().view(np.uint16), None
    y = y.float()
    if name == "int8":
        amax = y.abs().amax(1, keepdim=True)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        return torch.round(y / scale).to(torch.int8).numpy(), scale[:, 0].numpy()
    return torch.round(y / scale).clamp_(-127, 127).to(torch.int8).numpy(), None


def decode(stored: torch.Tensor, name: str, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Stored targets [m, n] -> float32. scale: [m] per row (int8), or [n] / [m, n] (int8-dim)."""
    if name == "float16":
        return stored.float()
    if name == "bfloat16":
        return stored.view(torch.int16).view(torch.bfloat16).float()
    s = scale.float()
    return stored.float() * (s[:, None] if name == "int8" else s)


def clipped(y: torch.Tensor, scale: torch.Tensor) -> int:
    """int8-dim: how many values of y [m, n] fall outside +-127 * scale."""
    return int((y.float().abs() > 127 * scale).sum())
