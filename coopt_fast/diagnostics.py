"""`inspect`: prior quality, fit residuals, and the target distribution inconsistency G (paper Def. 2).

G = mean over participant pairs of D_TV(T_i, T_j). Each D_TV is bounded from below by a held-out
two-sample test (`tv_lower_bound`): with balanced classes any classifier's accuracy is at most
(1 + TV) / 2, so 2·accuracy − 1 on held-out rows is a lower bound, and a Wilson interval on that
accuracy gives its 95% interval. The classifier is a small MLP (one hidden layer of 64) on
standardised rows, which sees differences in covariance and shape, not only in means: a
least-squares alignment matches the means by construction, so the linear logistic test used
before read "after" ≈ 0 whatever remained. kNN (also available, with "linear", for comparison)
sees a rotated covariance but hardly a change of scale in many dims: the far points of the wider
sample have the narrow sample's dense core as their nearest neighbours (tests/test_targets.py
measures all three on Gaussians). The halves are
stratified (each holds the same count from both samples) and the bound is not clipped at 0, so
noise reads on both sides of it. "Before" uses W-only targets (features @ W_k, the common space
without alignment), "after" the aligned targets.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import torch

from . import codec, layout, remote, store
from .align import INSPECT_ROWS as SAMPLE_ROWS, number_attr
from .errors import CooptError

KNN_K = 15           # odd, so no ties; small enough to follow local density at ~500 rows per class
MLP_HIDDEN, MLP_STEPS = 64, 300  # full-batch Adam: ~0.5 s per pair of 1,000-row samples in 256 dims
CLASSIFIERS = ("mlp", "knn", "linear")


def _wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = correct / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return mid - half, mid + half


def _knn_predict(xtr, ytr, xte, k: int) -> torch.Tensor:
    idx = torch.cdist(xte, xtr).topk(min(k, len(ytr)), largest=False).indices
    return (ytr[idx].mean(1) > 0.5).double()


def _mlp_predict(xtr, ytr, xte, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(xtr.shape[1], MLP_HIDDEN, generator=g, dtype=torch.float64) / xtr.shape[1] ** 0.5).requires_grad_()
    b1 = torch.zeros(MLP_HIDDEN, dtype=torch.float64, requires_grad=True)
    w2 = (torch.randn(MLP_HIDDEN, generator=g, dtype=torch.float64) / MLP_HIDDEN ** 0.5).requires_grad_()
    b2 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    params = [w1, b1, w2, b2]
    opt = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3)

    def logits(x):
        return torch.relu(x @ w1 + b1) @ w2 + b2

    for _ in range(MLP_STEPS):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(logits(xtr), ytr).backward()
        opt.step()
    with torch.no_grad():
        return (logits(xte) > 0).double()


def _linear_predict(xtr, ytr, xte, steps: int = 100) -> torch.Tensor:
    w = torch.zeros(xtr.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xtr @ w + c, ytr) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xte @ w + c > 0).double()


def tv_lower_bound(a: torch.Tensor, b: torch.Tensor, seed: int = 0, classifier: str = "mlp") -> dict:
    """Held-out two-sample test of rows `a` against rows `b`: {estimate, ci95, accuracy, n_test}.

    Both samples are cut to the same size m, each split in half on its own (stratified), the
    classifier fits on the two train halves and is scored on the two test halves (m rows or m+1).
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
    m = min(len(a), len(b))
    if m < 4:
        raise ValueError(f"a two-sample test needs at least 4 rows per sample, got {m}")
    g = torch.Generator().manual_seed(seed)
    a = a[torch.randperm(len(a), generator=g)[:m]].double()
    b = b[torch.randperm(len(b), generator=g)[:m]].double()
    h = m // 2  # rows [0, h) of each sample train, [h, m) test
    xtr, xte = torch.cat([a[:h], b[:h]]), torch.cat([a[h:], b[h:]])
    ytr = torch.cat([torch.zeros(h), torch.ones(h)]).double()
    yte = torch.cat([torch.zeros(m - h), torch.ones(m - h)]).double()
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    if classifier == "mlp":
        pred = _mlp_predict(xtr, ytr, xte, seed)
    elif classifier == "knn":
        pred = _knn_predict(xtr, ytr, xte, KNN_K)
    else:
        pred = _linear_predict(xtr, ytr, xte)
    correct, n = int((pred == yte).sum()), len(yte)
    lo, hi = _wilson(correct, n)
    lo, hi = min(lo, correct / n), max(hi, correct / n)  # contains the estimate despite rounding
    return {"estimate": 2 * correct / n - 1, "ci95": [2 * lo - 1, 2 * hi - 1], "accuracy": correct / n, "n_test": n}


def inconsistency(sets: dict[str, torch.Tensor], seed: int = 0, classifier: str = "mlp") -> tuple[dict, dict]:
    """G over all pairs: {estimate, ci95} (the CI averages the pairs' intervals: conservative,
    as the pairs share samples), and the per-pair results."""
    pairs = {}
    for (i, a), (j, b) in itertools.combinations(sorted(sets.items()), 2):
        pairs[f"{i}~{j}"] = tv_lower_bound(a, b, seed, classifier)
    if not pairs:
        return {"estimate": 0.0, "ci95": [0.0, 0.0]}, pairs
    v = list(pairs.values())
    return {"estimate": float(np.mean([p["estimate"] for p in v])),
            "ci95": [float(np.mean([p["ci95"][k] for p in v])) for k in (0, 1)]}, pairs


@remote.on_platform
def inspect(run: str | Path, plot: bool = True, seed: int = 0, classifier: str = "mlp") -> dict:
    """U, residuals, G before/after (tv_lower_bound, 95% CI); writes RUN/inspect.png (targets in 2-D).

    Reads the uploads alone (no features.h5): each carries the W-only targets of a seeded sample
    of its shard rows (sample/projected, "before") beside its aligned targets ("after").

    Args:
        run: the run folder.
        plot: write RUN/inspect.png.
        seed: seeds the classifier behind G and its train/test split.
        classifier: "mlp", "knn" or "linear", the two-sample classifier behind G.

    Returns:
        participants (U on S, residual, reference), inconsistency {before, after} and
        inconsistency_ci95, and plot (the PNG's path, or None).

    Raises:
        CooptError: no aligned participant yet, or an upload that fails its checks.
    """
    run = Path(run)
    names = layout.uploads(run)
    if not names:
        raise CooptError(f"{run}: no aligned participants to inspect (run align first)")
    before, after, rows = {}, {}, []
    for nm in names:
        apath = layout.upload_path(run, nm)
        with store.open_complete(apath, "aligned targets") as fa:
            sel = _check_upload(fa, apath)
            before[nm] = torch.from_numpy(fa["sample/projected"][:].astype(np.float32))
            td = str(store.plain(fa.attrs["target_dtype"]))
            scale = (torch.from_numpy(fa["shard/scale"][:][sel, 0]) if td == "int8" else
                     torch.from_numpy(fa["scale"][:]) if td == "int8-dim" else None)
            after[nm] = codec.decode(torch.from_numpy(fa["shard/targets"][sel]), td, scale).float()
            rows.append({"participant": nm, "prior": str(store.plain(fa.attrs["prior"])),
                         "feature_dim": int(fa["projection"].shape[0]),
                         "uniformity": float(fa.attrs["uniformity"]), "residual": float(fa.attrs["residual"]),
                         "reference": str(store.plain(fa.attrs["reference"])) == nm})
    g0, pairs0 = inconsistency(before, seed, classifier)
    g1, pairs1 = inconsistency(after, seed, classifier)
    out = {"participants": rows, "inconsistency": {"before": g0["estimate"], "after": g1["estimate"]},
           "inconsistency_ci95": {"before": g0["ci95"], "after": g1["ci95"]},
           "estimator": f"tv_lower_bound ({classifier} two-sample test, up to {SAMPLE_ROWS} rows per participant)",
           "pairs": {"before": pairs0, "after": pairs1}}
    if plot:
        out["plot"] = str(_plot(run / "inspect.png", before, after, out))
    return out


def _check_upload(fa, apath: Path) -> np.ndarray:
    """The sample rows of an upload whose shapes agree (what inspect reads), so a hand-edited
    file is one line naming it, not a shape error deep in torch."""
    dim = number_attr(fa, apath, "dim", int)
    number_attr(fa, apath, "residual")
    number_attr(fa, apath, "uniformity")
    n = fa["shard/targets"].shape[0]
    sel = fa["sample/rows"][:]
    if fa["shard/targets"].ndim != 2 or fa["shard/targets"].shape[1] != dim:
        raise CooptError(f"{apath}: shard/targets has shape {fa['shard/targets'].shape}, expected (rows, {dim}) (attribute dim)")
    if sel.ndim != 1 or sel.dtype.kind not in "iu" or (len(sel) and (sel.min() < 0 or sel.max() >= n
                                                                     or (np.diff(sel) <= 0).any())):
        raise CooptError(f"{apath}: sample/rows must be ascending rows of shard/targets")
    if fa["sample/projected"].shape != (len(sel), dim) or fa["projection"].ndim != 2:
        raise CooptError(f"{apath}: sample/projected has shape {fa['sample/projected'].shape}, expected ({len(sel)}, {dim})")
    return sel


def _pca2(sets: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    x = torch.cat(list(sets.values())).double()
    mu = x.mean(0)
    _, _, v = torch.pca_lowrank(x - mu, q=2, center=False, niter=4)
    return {k: ((t.double() - mu) @ v).numpy() for k, t in sets.items()}


def _plot(path: Path, before: dict, after: dict, g: dict | None = None) -> Path:
    """Targets in 2-D (PCA of the pooled targets), before and after alignment, with G on each
    panel. Larger sets are drawn first and fainter, so a small participant stays visible on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, (when, sets) in zip(axes, (("before", before), ("after", after))):
        xy = _pca2(sets)
        for nm in sorted(xy, key=lambda k: -len(xy[k])):  # largest first: underneath
            ax.scatter(xy[nm][:, 0], xy[nm][:, 1], s=5, alpha=0.35 if len(xy[nm]) >= 500 else 0.8,
                       label=f"{nm} ({len(xy[nm])} rows)", linewidths=0)
        title = "before alignment (W only)" if when == "before" else "after alignment"
        if g is not None:
            est, ci = g["inconsistency"][when], g["inconsistency_ci95"][when]
            title += f"\nG = {est:.3f}, 95% CI [{ci[0]:.3f}, {ci[1]:.3f}]"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[1].legend(markerscale=3, fontsize=8)
    fig.suptitle("targets by participant (PCA of pooled targets, each panel its own axes; G: mean pairwise "
                 "two-sample TV lower bound, lower = more consistent)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
