"""What a participant publishes to everyone, besides its upload (coopt_fast.layout for where):

  record.json  written by extract once features.h5 is whole: round, shard, prior, feature dim,
               rows, the sha256 of the features it describes, uniformity and every score on S
               (coopt_fast.scores). `score` and `align --reference best` rank participants by it.
  shared.h5    written by align: `values` [|S|, n] = the participant's features on S projected to
               the target dim, F(S) W (float32, kind "projected": what the consensus is computed
               from), or, for a single reference, its stored targets on S, S* (float16, kind
               "s_star"); `index` and `skipped` say which rows of S it decoded.

Both are recorded in the participant's manifest.json; a reader takes one only when its sha256 is
the recorded one, and the record only when it describes the features of the round it names.
Values read back are the bits computed from the features, so a participant aligning from the
others' published files gets the same targets as one process reading every features.h5.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from . import layout, store
from . import scores as prior_scores
from .errors import CooptError, disk_guard
from .store import file_sha256

RECORD_VERSION = 1
RECORD_KEYS = {"participant": str, "round": int, "shard": int, "prior": str, "feature_dim": int, "rows": int,
               "shared_rows": int, "skipped_images": int, "dataset_sha256": str, "features_sha256": str,
               "uniformity": (float, type(None)), "scores": dict}


def record_of(features: Path, digest: str, device=None, group=None) -> dict:
    """The record of a whole features.h5 whose sha256 is `digest` (scores from its rows of S,
    computed on `device`, their pairs split across `group`'s ranks: scores.compute)."""
    import torch  # here, not at the top: status and verify read records without torch

    with store.open_complete(features, "features") as f:
        ok = store.decoded_on_s(f)
        fs = torch.from_numpy(f["shared/features"][:][ok].astype(np.float32))
        return {
            "record_version": RECORD_VERSION, "participant": store.plain(f.attrs["participant"]),
            "round": int(f.attrs["round"]), "shard": int(f.attrs["shard"]), "prior": str(store.plain(f.attrs["prior"])),
            "feature_dim": int(f.attrs["feature_dim"]), "rows": int(f["shard/features"].shape[0]),
            "shared_rows": int(f["shared/features"].shape[0]),
            "skipped_images": int(f["shard/skipped"].shape[0] + f["shared/skipped"].shape[0]),
            "dataset_sha256": str(store.plain(f.attrs["dataset_sha256"])), "features_sha256": digest,
            "uniformity": _finite(float(f.attrs["uniformity"])),
            "scores": {k: _finite(v) for k, v in prior_scores.all_scores(fs, device, group).items()},
            "created": store.provenance()["created"],
        }


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None  # JSON has no NaN: null, read back as NaN


def write_record(run: str | Path, name: str, features: Path) -> dict:
    """Publish NAME's record of `features` (atomically: a temporary file renamed), then its manifest."""
    rec = record_of(features, file_sha256(features))
    path = layout.record_path(run, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_atomic(path, json.dumps(rec, indent=1, sort_keys=True, allow_nan=False).encode())
    store.write_manifest(path.parent, layout.RECORD)
    return rec


def read_record(run: str | Path, name: str) -> dict | None:
    """NAME's published record, or None when it has published none. One line naming the file
    for one its manifest does not vouch for, or one that is not a record of NAME."""
    path = layout.record_path(run, name)
    if not path.exists():
        return None
    recorded = store.read_manifest(path.parent).get(layout.RECORD)
    if recorded is None:
        raise CooptError(f"{path}: not recorded in {path.parent / layout.MANIFEST} (extract records what it publishes)")
    if file_sha256(path) != recorded:
        raise CooptError(f"{path}: sha256 differs from the one {path.parent / layout.MANIFEST} records (changed since published)")
    try:
        rec = json.loads(path.read_bytes().decode())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CooptError(f"{path}: not a JSON record") from None
    if not isinstance(rec, dict):
        raise CooptError(f"{path}: not a JSON object")
    for key, kind in RECORD_KEYS.items():
        if key not in rec or not isinstance(rec[key], kind) or isinstance(rec[key], bool):
            raise CooptError(f"{path}: field {key!r} missing or not {getattr(kind, '__name__', 'a number')}")
    if rec["participant"] != name:
        raise CooptError(f"{path}: a record of participant {rec['participant']!r}, published in {name!r}'s folder")
    for k, v in rec["scores"].items():
        if k not in prior_scores.SCORES or not (v is None or isinstance(v, (int, float))):
            raise CooptError(f"{path}: scores.{k} is not one of {', '.join(prior_scores.SCORES)} with a number")
    rec["uniformity"] = float("nan") if rec["uniformity"] is None else float(rec["uniformity"])
    rec["scores"] = {k: float("nan") if v is None else float(v) for k, v in rec["scores"].items()}
    return rec


def write_shared(run: str | Path, name: str, identity: dict, index: np.ndarray, skipped: np.ndarray,
                 values: torch.Tensor) -> None:
    """Publish NAME's shared.h5 (identity: what it is; see the module doc), then its manifest."""
    path = layout.shared_path(run, name)
    # Room first: HDF5 failing to write (or close) a file half-way is noisy, and leaves nothing useful.
    store.check_room(path, values.numpy().nbytes + index.nbytes + skipped.nbytes + (256 << 10))
    with store.Lock(path), disk_guard(path):
        f, _ = store.open_partial(path, identity)
        try:
            for key in ("index", "skipped", "values"):
                if key in f:  # a partial of the same identity, left by a crash
                    del f[key]
            f.create_dataset("index", data=index)
            f.create_dataset("skipped", data=skipped)
            store.create_checked(f, "values", values.numpy())
            store.publish(f, path)
        except BaseException:
            store.abandon(f)
            raise
        store.write_manifest(path.parent, layout.SHARED)


def read_shared(run: str | Path, name: str, identity: dict) -> tuple["torch.Tensor", "torch.Tensor"] | None:
    """(values, rows of S decoded) of NAME's published shared.h5 when it is exactly `identity`
    (and its manifest vouches for it); None when there is none or it is another one (another
    dim, round or kind: not what this alignment needs)."""
    path = layout.shared_path(run, name)
    if not path.exists():
        return None
    with store.open_complete(path, "shared") as f:
        if not all(store._attr_eq(f.attrs.get(k), v) for k, v in identity.items()):
            return None
        if store.read_manifest(path.parent).get(layout.SHARED) != file_sha256(path):
            raise CooptError(f"{path}: sha256 is not the one {path.parent / layout.MANIFEST} records (changed since "
                             f"published, or its align was interrupted: {name} reruns align --participant {name})")
        v = f["values"][:]
        rows, dim = f["index"].shape[0], int(identity["dim"])
        if v.shape != (rows, dim) or not np.isfinite(v).all():
            raise CooptError(f"{path}: values must be finite with shape ({rows}, {dim}), got {v.shape}")
        ok = ~np.isin(f["index"][:], f["skipped"][:])
        import torch

        return torch.from_numpy(v.astype(np.float32)), torch.from_numpy(ok)
