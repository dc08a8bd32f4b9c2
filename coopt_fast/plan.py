"""Step 1, data distributing: K disjoint shards covering D, and a shared set S ⊂ D.

RUN/plan.json holds the dataset spec, --limit, a fingerprint of the data, the seed, the
participant count, each shard's sample indices (ascending: "plan order") and S (ascending).
Later commands load the data through `plan_dataset`, which refuses a changed data set.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .data import Dataset, fingerprint, load_dataset
from .errors import CooptError

PLAN_VERSION = 1


def split(
    dataset: str,
    out: str | Path,
    participants: int = 4,
    shared_fraction: float = 0.05,
    seed: int = 0,
    sizes: list[float] | None = None,
    limit: int | None = None,
) -> dict:
    """Write RUN/plan.json; return the plan.

    Shards are a seeded random partition of range(N), balanced or proportional to `sizes`
    (largest-remainder rounding, every shard >= 1 sample). S is round(F·N) >= 1 samples drawn
    from D independently of the shards: every participant also extracts S.
    """
    if participants < 1:
        raise CooptError(f"--participants must be >= 1, got {participants}")
    if not 0.0 < shared_fraction <= 1.0:
        raise CooptError(f"--shared-fraction must be in (0, 1], got {shared_fraction}")
    if sizes is not None:
        if len(sizes) != participants:
            raise CooptError(f"--sizes has {len(sizes)} weights for {participants} participants")
        if any(not np.isfinite(w) or w <= 0 for w in sizes):
            raise CooptError(f"--sizes must all be positive, got {sizes}")
    ds = load_dataset(dataset).subset(limit)
    n = len(ds)
    if participants > n:
        raise CooptError(f"--participants {participants} is larger than the data set ({n} samples)")

    weights = np.asarray(sizes if sizes is not None else [1.0] * participants, dtype=np.float64)
    counts = _apportion(n, weights / weights.sum())
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    shards = [np.sort(perm[bounds[k] : bounds[k + 1]]).tolist() for k in range(participants)]
    n_shared = max(1, int(round(shared_fraction * n)))
    shared = np.sort(rng.choice(n, size=n_shared, replace=False)).tolist()

    plan = {
        "plan_version": PLAN_VERSION,
        "dataset": dataset,
        "limit": limit,
        "fingerprint": fingerprint(ds),
        "seed": seed,
        "participants": participants,
        "sizes": None if sizes is None else list(map(float, sizes)),
        "shared_fraction": shared_fraction,
        "shards": shards,
        "shared": shared,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "plan.json.tmp"
    tmp.write_text(json.dumps(plan))
    os.replace(tmp, out / "plan.json")
    return plan


def _apportion(n: int, p: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, proportional to p (largest remainder), each >= 1."""
    raw = p * n
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    while (counts == 0).any():  # a tiny weight still gets one sample, taken from the largest shard
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return counts


def load_plan(run: str | Path) -> dict:
    path = Path(run) / "plan.json"
    if not path.is_file():
        raise CooptError(f"{path}: no plan; run `coopt-fast split DATASET --out {run}` first")
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CooptError(f"{path}: not valid JSON ({e})") from None
    if plan.get("plan_version") != PLAN_VERSION:
        raise CooptError(f"{path}: plan_version {plan.get('plan_version')}, expected {PLAN_VERSION}")
    _check_plan(path, plan)
    return plan


def _check_plan(path: Path, plan: dict) -> None:
    """A hand-edited or damaged plan must not reach numpy indexing (which wraps negatives)."""
    try:
        n = int(plan["fingerprint"]["n"])
        shards = [np.asarray(s, dtype=np.int64) for s in plan["shards"]]
        shared = np.asarray(plan["shared"], dtype=np.int64)
        k = int(plan["participants"])
    except (KeyError, TypeError, ValueError) as e:
        raise CooptError(f"{path}: malformed plan ({e})") from None
    if len(shards) != k:
        raise CooptError(f"{path}: shards: {len(shards)} listed for {k} participants")
    empty = [i for i, sh in enumerate(shards) if len(sh) == 0]
    if empty:
        raise CooptError(f"{path}: shard {empty[0]} is empty")
    for name, idx in [(f"shards[{i}]", s) for i, s in enumerate(shards)] + [("shared", shared)]:
        if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= n)):
            raise CooptError(f"{path}: {name}: indices out of range [0, {n})")
        if len(np.unique(idx)) != len(idx):
            raise CooptError(f"{path}: {name}: duplicate indices")
    covered = np.concatenate(shards) if shards else np.empty(0, np.int64)
    if len(covered) != n or len(np.unique(covered)) != n:
        raise CooptError(f"{path}: shards: must partition all {n} samples exactly once")
    if len(shared) < 1:
        raise CooptError(f"{path}: shared: the shared set is empty")


def plan_dataset(plan: dict, verify: bool = True) -> Dataset:
    """The plan's data set, refusing one whose fingerprint changed since `split`."""
    ds = load_dataset(plan["dataset"]).subset(plan.get("limit"))
    if verify:
        fp = fingerprint(ds)
        if fp != plan["fingerprint"]:
            raise CooptError(
                f"{plan['dataset']}: data set changed since split (fingerprint {fp['sha256'][:12]}, "
                f"N={fp['n']}; plan has {plan['fingerprint']['sha256'][:12]}, N={plan['fingerprint']['n']})"
            )
    return ds


def shard_indices(plan: dict, shard: int) -> np.ndarray:
    if not 0 <= shard < plan["participants"]:
        raise CooptError(f"--shard {shard} out of range: the plan has shards 0..{plan['participants'] - 1}")
    return np.asarray(plan["shards"][shard], dtype=np.int64)
