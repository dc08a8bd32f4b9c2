"""Batched, seeded image augmentations on tensors (CPU or GPU), for train and pretrain.

Every op takes a whole batch float [B, C, H, W] in [0, 1] and a torch.Generator, and draws
one parameter set per sample with a handful of vectorised tensor ops: no per-sample Python,
no PIL, so the same code runs on the GPU next to the model, and a saved generator state
replays it exactly (what `--resume` relies on). Random numbers are always drawn on the
generator's device with a fixed number of draws per batch, so the stream never depends on
the data.

What torchvision does differently, and why it does not matter here:
  random_resized_crop   no 10-try rejection loop: the crop's aspect is drawn as usual and its
                        sides are clipped to the image (the area shrinks a little for extreme
                        draws); crop + resize is one bilinear grid_sample, so shrinking a large
                        crop aliases slightly (irrelevant at 28-64 px, the sizes this is for).
  color_jitter          fixed order (brightness, contrast, saturation, hue) instead of a random
                        one; hue is a rotation of the chroma plane in YIQ space, a linear stand-in
                        for torchvision's HSV shift (exact for gray images, where hue is a no-op).
Gaussian blur is left out: SSL recipes for small images (solo-learn's CIFAR configs) use it
with probability 0.

Under torchrun each rank holds a share of the global batch (`Part`): every rank draws the
parameters of the whole global batch from the same generator and applies its share's, so a
sample's augmentation is the one a single process gives it, whatever the world size, and the
generators of all ranks stay in step (one state to save, valid for any world size on resume).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=64)
def _const(values: tuple, shape: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant on `device`, made once: a fresh torch.tensor(..., device="cuda") per step
    would be a synchronous host-to-device copy that stalls the GPU queue."""
    return torch.tensor(values, dtype=torch.float64).reshape(shape).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Part:
    """This rank's rows `rows` of a global batch of `total` rows (World.share)."""
    total: int
    rows: slice


def _draw_size(x: torch.Tensor, part: Part | None) -> int:
    """How many parameter sets to draw: the global batch's under torchrun."""
    if part is None:
        return x.shape[0]
    if len(range(part.total)[part.rows]) != x.shape[0]:
        raise ValueError(f"batch of {x.shape[0]} rows is not the share {part.rows} of {part.total}")
    return part.total


def _mine(part: Part | None, *params: torch.Tensor) -> tuple:
    """This rank's share of per-sample parameters drawn for the global batch. Sliced after all
    elementwise maths on the params: a vectorised op's tail elements may take a scalar path, so
    a result computed on the share alone could differ from the global batch's in the last bit."""
    return params if part is None else tuple(t[part.rows] for t in params)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device) * (hi - lo) + lo


def _bernoulli(g: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device) < p


def random_resized_crop(x: torch.Tensor, size: int, g: torch.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), flip_p: float = 0.5, part: Part | None = None) -> torch.Tensor:
    """Crop a random area fraction in `scale` with aspect in `ratio`, resize to size x size,
    and mirror horizontally with probability flip_p: one affine grid_sample for the batch."""
    b = _draw_size(x, part)
    area = _uniform(g, b, *scale)
    log_r = _uniform(g, b, math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)   # crop width / image width
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(b, generator=g, device=g.device) * 2 - 1) * (1 - w)  # centre, in [-1, 1] coords
    cy = (torch.rand(b, generator=g, device=g.device) * 2 - 1) * (1 - h)
    flip = torch.where(_bernoulli(g, b, flip_p), -1.0, 1.0).to(w)
    w, h, cx, cy, flip = _mine(part, w, h, cx, cy, flip)
    # The affine map is axis-aligned (scale + shift per axis), so the sampling grid is two
    # broadcast products, not F.affine_grid's batched matmul over a base grid (several times slower).
    pos = (torch.arange(size, device=x.device, dtype=x.dtype) * 2 + 1) / size - 1  # pixel centres
    gx = (w * flip).to(x)[:, None, None] * pos[None, None, :] + cx.to(x)[:, None, None]  # [B, 1, S]
    gy = h.to(x)[:, None, None] * pos[None, :, None] + cy.to(x)[:, None, None]            # [B, S, 1]
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma [B, 1, H, W] (ITU-R 601 weights, as torchvision's rgb_to_grayscale)."""
    if x.shape[1] == 1:
        return x
    w = _const((0.299, 0.587, 0.114), (1, 3, 1, 1), x.device, x.dtype)
    return (x * w).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, g: torch.Generator, brightness=0.4, contrast=0.4, saturation=0.2,
                 hue=0.1, p: float = 0.8, part: Part | None = None) -> torch.Tensor:
    """Per-sample brightness/contrast/saturation/hue factors, applied to a fraction p of the batch."""
    b = _draw_size(x, part)
    apply = _bernoulli(g, b, p).view(b, 1, 1, 1)
    fb = _uniform(g, b, 1 - brightness, 1 + brightness).view(b, 1, 1, 1).to(x)
    fc = _uniform(g, b, 1 - contrast, 1 + contrast).view(b, 1, 1, 1).to(x)
    fs = _uniform(g, b, 1 - saturation, 1 + saturation).view(b, 1, 1, 1).to(x)
    fh = _uniform(g, b, -hue, hue).to(x)
    apply, fb, fc, fs, fh = _mine(part, apply, fb, fc, fs, fh)
    y = (x * fb).clamp(0, 1)
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * fc + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(y)
        y = ((y - gray) * fs + gray).clamp(0, 1)
        y = _hue_rotate(y, fh * 2 * math.pi).clamp(0, 1)
    return torch.where(apply, y, x)


_RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_YIQ2RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(_RGB2YIQ, dtype=torch.float64)).tolist()))


def _hue_rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate chroma (I, Q) by `angle` radians per sample: a linear, batched hue shift."""
    flat = lambda m: tuple(v for row in m for v in row)  # noqa: E731
    yiq = torch.einsum("ij,bjhw->bihw", _const(flat(_RGB2YIQ), (3, 3), x.device, x.dtype), x)
    c, s = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], c * i - s * q, s * i + c * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", _const(flat(_YIQ2RGB), (3, 3), x.device, x.dtype), yiq)


def random_grayscale(x: torch.Tensor, g: torch.Generator, p: float = 0.2, part: Part | None = None) -> torch.Tensor:
    apply, = _mine(part, _bernoulli(g, _draw_size(x, part), p).view(-1, 1, 1, 1))
    return torch.where(apply, _gray(x).expand_as(x), x)


def random_solarize(x: torch.Tensor, g: torch.Generator, p: float, threshold: float = 0.5,
                    part: Part | None = None) -> torch.Tensor:
    apply, = _mine(part, _bernoulli(g, _draw_size(x, part), p).view(-1, 1, 1, 1))
    return torch.where(apply & (x >= threshold), 1 - x, x)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[B, 1|3, S, S] in [0, 1] -> normalised [B, 3, S, S] (gray expanded to RGB, like priors.preprocess)."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    m = _const(tuple(mean), (1, -1, 1, 1), x.device, x.dtype)
    s = _const(tuple(std), (1, -1, 1, 1), x.device, x.dtype)
    return (x - m) / s


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float [B, C, H, W] in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


@dataclass
class ViewConfig:
    """One augmented view. Defaults: the BYOL/SimCLR recipe for small images (solo-learn CIFAR)."""

    scale: tuple = (0.08, 1.0)
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)   # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    solarize_p: float = 0.0
    flip_p: float = 0.5


def ssl_view(images: torch.Tensor, size: int, g: torch.Generator, cfg: ViewConfig, mean, std,
             part: Part | None = None) -> torch.Tensor:
    """uint8 [B, H, W, C] -> one normalised augmented view [B, 3, size, size]."""
    x = random_resized_crop(to_float(images), size, g, scale=cfg.scale, flip_p=cfg.flip_p, part=part)
    if x.shape[1] == 1:  # colour ops need RGB to be meaningful; gray stays cheap until here
        x = color_jitter(x, g, *cfg.jitter[:2], 0.0, 0.0, p=cfg.jitter_p, part=part)
    else:
        x = color_jitter(x, g, *cfg.jitter, p=cfg.jitter_p, part=part)
        x = random_grayscale(x, g, cfg.gray_p, part=part)
    x = random_solarize(x, g, cfg.solarize_p, part=part)
    return normalize(x, mean, std)


def crop_flip(images: torch.Tensor, size: int, g: torch.Generator, mean, std, scale=(0.25, 1.0),
              part: Part | None = None) -> torch.Tensor:
    """The student's (and supervised pretraining's) light augmentation: random-resized-crop + flip."""
    return normalize(random_resized_crop(to_float(images), size, g, scale=scale, part=part), mean, std)
