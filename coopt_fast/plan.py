"""Step 1, data distributing: K disjoint shards covering D, and a shared set S ⊂ D.

RUN/plan.json holds the dataset spec, --limit, a fingerprint of the data, the seed, the
participant count, each shard's sample indices (ascending: "plan order") and S (ascending).
Later commands load the data through `plan_dataset`, which refuses a changed data set.

A plan is written once: participants' uploads are tied to its shards, so `split` over an
existing plan.json is a no-op when it would write the same plan, and refused otherwise
(unless force=True, which names the uploads it orphans).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .data import Dataset, fingerprint, load_dataset
from .errors import CooptError

PLAN_VERSION = 1
MAX_SEED = 2**63 - 1  # seeds land in HDF5 int64 attributes and numpy/torch generators (no negatives)


def check_seed(seed, flag: str = "--seed") -> int:
    """The seed range every command accepts, [0, 2**63 - 1]; the seed as a plain int."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise CooptError(f"{flag} {seed!r}: must be an integer in [0, 2**63 - 1]")
    return int(seed)


def split(
    dataset: str,
    out: str | Path,
    participants: int = 4,
    shared_fraction: float = 0.05,
    seed: int = 0,
    sizes: list[float] | None = None,
    limit: int | None = None,
    force: bool = False,
) -> dict:
    """Write RUN/plan.json; return the plan, plus "unchanged" (an identical plan was already
    there: nothing written) and "warnings" (what a forced replacement orphaned).

    Shards are a seeded random partition of range(N), balanced or proportional to `sizes`
    (largest-remainder rounding, every shard >= 1 sample). S is round(F·N) >= 1 samples drawn
    from D independently of the shards: every participant also extracts S.
    `out` may be an object store URL (s3://bucket/prefix): the plan is written there.

    Args:
        dataset: data set spec: "fashion-mnist[:test]", "folder:PATH" or "npy:IMAGES.npy[,LABELS.npy]".
        out: the run folder to create (or an s3:// URL).
        participants: K, the number of shards.
        shared_fraction: |S|/N, the share of D drawn as the shared set S (scoring, alignment).
        seed: seeds the shards and S; the same seed and data give the same plan.
        sizes: relative shard sizes w1..wK (None: balanced).
        limit: use the first N samples of the data set only (None: all).
        force: replace an existing, different plan.json (orphans uploads made for it).

    Returns:
        The plan (dataset, fingerprint, shards, shared, seed, ...) plus "unchanged" and "warnings".

    Raises:
        CooptError: a bad option or data set, or a different plan already in `out` without force.
    """
    from . import remote

    if remote.is_remote(out):
        r = remote.Remote(str(out))
        r.pull_plan()
        plan = split(dataset, r.mirror, participants, shared_fraction, seed, sizes, limit, force)
        if not plan.get("unchanged"):
            r.push_plan()
        return plan
    out = Path(remote.local_path(out))
    seed = check_seed(seed)
    _check_options(participants, shared_fraction, sizes, limit)
    ds = load_dataset(dataset).subset(limit)
    n = len(ds)
    if participants > n:
        raise CooptError(f"--participants {participants} is larger than the data set ({n} samples)")
    shards, shared = _draw(n, participants, shared_fraction, seed, sizes)
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
    return _write_plan(out, plan, left_out_warnings(ds), force)


def _check_options(participants: int, shared_fraction: float, sizes, limit) -> None:
    if limit is not None and not 1 <= limit <= 2**63 - 1:  # the merged store records it as an int64
        raise CooptError(f"--limit must be in [1, 2**63 - 1], got {limit}")
    if participants < 1:
        raise CooptError(f"--participants must be >= 1, got {participants}")
    if not 0.0 < shared_fraction <= 1.0:
        raise CooptError(f"--shared-fraction must be in (0, 1], got {shared_fraction}")
    if sizes is not None:
        if len(sizes) != participants:
            raise CooptError(f"--sizes has {len(sizes)} weights for {participants} participants")
        if any(not np.isfinite(w) or w <= 0 for w in sizes):
            raise CooptError(f"--sizes must all be positive, got {sizes}")


def _draw(n: int, participants: int, shared_fraction: float, seed: int, sizes) -> tuple[list, list]:
    """(shards, S) as sorted index lists: one seeded generator draws the partition, then S."""
    weights = np.asarray(sizes if sizes is not None else [1.0] * participants, dtype=np.float64)
    counts = _apportion(n, weights / weights.sum())
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    shards = [np.sort(perm[bounds[k] : bounds[k + 1]]).tolist() for k in range(participants)]
    n_shared = max(1, int(round(shared_fraction * n)))
    return shards, np.sort(rng.choice(n, size=n_shared, replace=False)).tolist()


def _write_plan(out: Path, plan: dict, warnings: list[str], force: bool) -> dict:
    """plan.json, atomically; the same plan again is a no-op, another one needs force."""
    if out.exists() and not out.is_dir():
        raise CooptError(f"{out}: exists and is not a folder")
    path = out / "plan.json"
    if path.exists():
        old = _read_json(path)
        if old == plan:
            return {**plan, "unchanged": True, "warnings": warnings}
        differ = _differences(old, plan)
        if not force:
            raise CooptError(f"{path}: holds a different split ({differ}); replacing it orphans every upload "
                             f"made for it: pass --force to replace it anyway")
        orphans = _uploads(out)
        if orphans:
            warnings.append(f"{path}: replaced ({differ}); made for the old plan and now orphaned: {orphans}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "plan.json.tmp"
    tmp.write_text(json.dumps(plan))
    os.replace(tmp, path)
    return {**plan, "unchanged": False, "warnings": warnings}


def _read_json(path: Path):
    """The parsed file, or None when it is not JSON (or not readable)."""
    try:
        return json.loads(path.read_bytes().decode())
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None


def _differences(old, new: dict) -> str:
    """What differs between an existing plan and a new one, in the split's own terms."""
    if not isinstance(old, dict):
        return "not a readable plan"
    keys = [k for k in new if k not in ("shards", "shared") and old.get(k) != new[k]]
    keys = keys or [k for k in ("shards", "shared") if old.get(k) != new[k]]  # edited by hand
    short = ("dataset", "limit", "seed", "participants", "sizes", "shared_fraction", "plan_version")
    return ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" if k in short else k for k in keys)


def _uploads(out: Path) -> str:
    names = sorted(d.name for d in (out / "participants").glob("*") if d.is_dir())
    found = [f"participants {', '.join(map(repr, names))}"] if names else []
    return ", ".join(found + [n for n in ("merged.h5",) if (out / n).exists()])


def left_out_warnings(ds: Dataset) -> list[str]:
    """A folder's files that are not samples (other suffixes, hidden, not regular files), said once."""
    lo = ds.left_out
    if not lo:
        return []
    shown = "; ".join(f"{p}: {why}" for p, why in lo[:3]) + ("; ..." if len(lo) > 3 else "")
    return [f"{ds.spec}: {len(lo)} file(s) left out, not samples ({shown})"]


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
        below = sorted(p.parent for p in Path(run).glob("*/plan.json")) if Path(run).is_dir() else []
        if below:  # e.g. `make demo`'s run is runs/demo/run
            raise CooptError(f"{path}: no plan here, but {', '.join(map(str, below[:3]))} hold{'s' if len(below) == 1 else ''} "
                             f"a run: give that folder")
        raise CooptError(f"{path}: no plan; run `coopt-fast split DATASET --out {run}` first")
    try:
        plan = json.loads(path.read_bytes().decode())
    except UnicodeDecodeError as e:
        raise CooptError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CooptError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CooptError(f"{path}: not a plan (JSON nested too deeply)") from None
    if not isinstance(plan, dict):
        raise CooptError(f"{path}: not a plan (a JSON {type(plan).__name__}, expected a JSON object)")
    if plan.get("plan_version") != PLAN_VERSION or type(plan.get("plan_version")) is not int:
        raise CooptError(f"{path}: plan_version {plan.get('plan_version')!r}, expected {PLAN_VERSION}")
    _check_plan(path, plan)
    return plan


def _is_int(v) -> bool:
    return type(v) is int  # JSON's true/false and 1.5 are not indices or counts


def _indices(path: Path, name: str, v, n: int) -> np.ndarray:
    if not isinstance(v, list) or not all(map(_is_int, v)):
        raise CooptError(f"{path}: {name}: must be a list of integer sample indices")
    if v and not 0 <= min(v) <= max(v) < n:  # checked before int64: numpy would overflow or wrap
        raise CooptError(f"{path}: {name}: indices out of range [0, {n})")
    return np.asarray(v, dtype=np.int64)


def _check_plan(path: Path, plan: dict) -> None:
    """A hand-edited or damaged plan must not reach numpy indexing (which wraps negatives), nor
    any command as a field of the wrong type: every field the commands read is checked here."""
    fp = plan.get("fingerprint")
    if not isinstance(fp, dict):
        raise CooptError(f"{path}: fingerprint: must be an object, got {fp!r:.40}")
    if not _is_int(fp.get("n")) or fp["n"] < 1:
        raise CooptError(f"{path}: fingerprint.n: must be an integer >= 1, got {fp.get('n')!r:.40}")
    if not isinstance(fp.get("sha256"), str):
        raise CooptError(f"{path}: fingerprint.sha256: must be a string, got {fp.get('sha256')!r:.40}")
    if not isinstance(plan.get("dataset"), str):
        raise CooptError(f"{path}: dataset: must be a data set spec string, got {plan.get('dataset')!r:.40}")
    limit = plan.get("limit")
    if limit is not None and (not _is_int(limit) or not 1 <= limit <= 2**63 - 1):
        raise CooptError(f"{path}: limit: must be null or an integer in [1, 2**63 - 1], got {limit!r:.40}")
    if not _is_int(plan.get("seed")) or not 0 <= plan["seed"] <= MAX_SEED:
        raise CooptError(f"{path}: seed: must be an integer in [0, 2**63 - 1], got {plan.get('seed')!r:.40}")
    k = plan.get("participants")
    if not _is_int(k) or k < 1:
        raise CooptError(f"{path}: participants: must be an integer >= 1, got {k!r:.40}")
    if not isinstance(plan.get("shards"), list):
        raise CooptError(f"{path}: shards: must be a list of {k} lists of sample indices")
    n = fp["n"]
    shards = [_indices(path, f"shards[{i}]", s, n) for i, s in enumerate(plan["shards"])]
    shared = _indices(path, "shared", plan.get("shared"), n)
    if len(shards) != k:
        raise CooptError(f"{path}: shards: {len(shards)} listed for {k} participants")
    empty = [i for i, sh in enumerate(shards) if len(sh) == 0]
    if empty:
        raise CooptError(f"{path}: shard {empty[0]} is empty")
    for name, idx in [(f"shards[{i}]", s) for i, s in enumerate(shards)] + [("shared", shared)]:
        if len(np.unique(idx)) != len(idx):
            raise CooptError(f"{path}: {name}: duplicate indices")
    covered = np.concatenate(shards)
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
