"""Label-free scores of a prior's features on the shared set S, and the reference choice they drive.

  uniformity          U = log mean exp(-2 ||f_i - f_j||^2) on L2-normalised rows (the paper's
                      score; lower = better). Biased on post-ReLU features: non-negative rows have
                      cosines >= 0, so a network's U cannot go low however good it is, while
                      one-hot labels reach U ~ -2.15 and always win (then every participant is
                      fitted into a ~9-dim space).
  uniformity-centred  U of the rows minus their mean on S (lower = better): removes the shared
                      positive offset, so U measures how the features spread, not where they sit.
  effective-rank      exp(entropy of the normalised singular values) of the centred rows (Roy &
                      Vetterli 2007; higher = more directions used); not a ranking score of its own
                      here, but the floor `align` warns about (targets span at most ~this many dims).

Which one is the default, and why, is measured by bench/paper.py (README "How the reference is
chosen, and why").
"""
from __future__ import annotations

import numpy as np

DEFAULT_SCORE = "uniformity-centred"
# name -> sign: +1 when lower is better (sorted ascending), -1 when higher is better
SCORES = {"uniformity": 1, "uniformity-centred": 1, "effective-rank": -1}


def effective_rank(x) -> float:
    """exp(entropy of the normalised singular values) of the centred rows: 1 for points on a line,
    d for isotropic points in d dims; one-hot labels over C classes give about C - 1."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        return 0.0
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    s = s[s > s.max() * 1e-12] if s.size and s.max() > 0 else s[:0]
    if not s.size:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def compute(fs: torch.Tensor, name: str, device=None, group=None) -> float:
    """One score of the features on S (rows that failed to decode already removed).

    device: where the uniformities run (through the kernels' dispatcher: Triton on CUDA, the
    blocked torch fallback on CPU); None = fs's own device. The centring and the effective rank's
    SVD stay on the CPU in fp32/fp64: the same input bits to U on every device, so the published
    scores differ across devices only by the kernels' rounding (~1e-6 on U: fp32 rows run as
    tf32x3 on CUDA). group: a torch.distributed (gloo) group whose ranks all call this with the
    same fs and split U's pairs between them (kernels.uniformity_sharded); None: this process alone.
    """
    from .kernels import uniformity_sharded  # imports torch: only when a score is computed

    if name not in SCORES:
        raise ValueError(f"unknown score {name!r}; choose from {', '.join(SCORES)}")
    if len(fs) < 2:
        return float("nan")
    fs = fs.float()
    if name == "uniformity":
        return float(uniformity_sharded(fs.to(device or fs.device), group=group))
    if name == "uniformity-centred":
        return float(uniformity_sharded((fs - fs.mean(0)).to(device or fs.device), group=group))
    return effective_rank(fs.cpu().numpy())


def all_scores(fs: torch.Tensor, device=None, group=None) -> dict[str, float]:
    return {nm: compute(fs, nm, device, group) for nm in SCORES}


def best(values: dict[str, float], name: str) -> str | None:
    """The participant with the best finite score (ties by name); None when none is finite."""
    finite = {k: v for k, v in values.items() if np.isfinite(v)}
    if not finite:
        return None
    return min(finite, key=lambda k: (SCORES[name] * finite[k], k))
