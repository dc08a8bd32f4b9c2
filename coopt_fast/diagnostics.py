"""`inspect`: prior quality, fit residuals, and the target distribution inconsistency G (paper Def. 2).

G = mean over participant pairs of D_TV(T_i, T_j). D_TV between two target sets is estimated
with a held-out two-sample classifier: logistic regression on a balanced sample, trained on
one half and scored on the other; D̂_TV = max(0, 2·accuracy − 1). "Before" uses W-only
targets (features @ W_k, the common space without alignment), "after" the aligned targets.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from . import store
from .align import participants as list_participants
from .errors import CooptError
from .extract import participant_dir

SAMPLE_ROWS = 1000   # per participant and pair; the classifier's accuracy has ~1.5% std at this size


def _sample(n: int, m: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, m), replace=False))


def tv_distance(a: torch.Tensor, b: torch.Tensor, seed: int = 0, steps: int = 100) -> float:
    """D̂_TV = max(0, 2·acc − 1) of a logistic-regression two-sample test on held-out halves."""
    m = min(len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    a = a[torch.randperm(len(a), generator=g)[:m]].double()
    b = b[torch.randperm(len(b), generator=g)[:m]].double()
    x = torch.cat([a, b])
    y = torch.cat([torch.zeros(m), torch.ones(m)]).double()
    perm = torch.randperm(2 * m, generator=g)
    tr, te = perm[: m], perm[m:]
    mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[tr] @ w + c, y[tr]) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = ((x[te] @ w + c > 0).double() == y[te]).double().mean().item()
    return max(0.0, 2 * acc - 1)


def inconsistency(sets: dict[str, torch.Tensor], seed: int = 0) -> tuple[float, dict]:
    pairs = {}
    for (i, a), (j, b) in itertools.combinations(sorted(sets.items()), 2):
        pairs[f"{i}~{j}"] = tv_distance(a, b, seed)
    return (float(np.mean(list(pairs.values()))) if pairs else 0.0), pairs


def inspect(run: str | Path, plot: bool = True, seed: int = 0) -> dict:
    """U, residuals, G before/after; writes RUN/inspect.png (targets in 2-D, before vs after)."""
    run = Path(run)
    names = [nm for nm in list_participants(run) if (participant_dir(run, nm) / "aligned.h5").exists()]
    if not names:
        raise CooptError(f"{run}: no aligned participants to inspect (run align first)")
    before, after, rows = {}, {}, []
    for k, nm in enumerate(names):
        with store.open_complete(participant_dir(run, nm) / "features.h5", "features") as ff, \
                store.open_complete(participant_dir(run, nm) / "aligned.h5", "aligned targets") as fa:
            sel = _sample(ff["shard/features"].shape[0], SAMPLE_ROWS, seed + k)
            feats = torch.from_numpy(ff["shard/features"][sel].astype(np.float32))
            before[nm] = feats @ torch.from_numpy(fa["projection"][:])
            after[nm] = torch.from_numpy(fa["shard/targets"][sel].astype(np.float32))
            rows.append({"participant": nm, "prior": str(ff.attrs["prior"]), "feature_dim": int(ff.attrs["feature_dim"]),
                         "uniformity": float(ff.attrs["uniformity"]), "residual": float(fa.attrs["residual"]),
                         "reference": str(fa.attrs["reference"]) == nm})
    g0, pairs0 = inconsistency(before, seed)
    g1, pairs1 = inconsistency(after, seed)
    out = {"participants": rows, "inconsistency": {"before": g0, "after": g1},
           "pairs": {"before": pairs0, "after": pairs1}}
    if plot:
        out["plot"] = str(_plot(run / "inspect.png", before, after))
    return out


def _pca2(sets: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    x = torch.cat(list(sets.values())).double()
    mu = x.mean(0)
    _, _, v = torch.pca_lowrank(x - mu, q=2, center=False, niter=4)
    return {k: ((t.double() - mu) @ v).numpy() for k, t in sets.items()}


def _plot(path: Path, before: dict, after: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (title, sets) in zip(axes, (("before alignment (W only)", before), ("after alignment", after))):
        for nm, xy in _pca2(sets).items():
            ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.5, label=nm)
        ax.set_title(title)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[1].legend(markerscale=4, fontsize=8)
    fig.suptitle("targets by participant (PCA of pooled targets, each panel its own axes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
