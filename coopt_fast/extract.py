"""Step 2a: a participant turns its shard (and the shared set S) into features with its prior.

Writes RUN/participants/NAME/features.h5:
  shared/index [|S|] int64, shared/features [|S|, l] float16   (computed first: small)
  shard/index [n_k] int64,  shard/features [n_k, l] float16    (plan order)
  attrs: participant, shard, prior, checkpoint_sha256, seed, round, batch_size, feature_dim,
         uniformity (U on S, computed from the stored float16 features), dataset_sha256, ...

Resumable: rows are appended batch by batch to features.h5.partial with `rows_done` advanced
after each flush; a rerun with the same identity continues at the first missing batch. The
batches are the same as in an uninterrupted run (same batch size, same starts), so the
result is the same value for value.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch

from . import store
from .errors import CooptError
from .plan import load_plan, plan_dataset, shard_indices
from .priors import Prior, load_prior, preprocess
from .progress import bar

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    """Participant names become folder names: letters, digits, _ . - only; no traversal."""
    if not NAME_RE.match(name) or ".." in name:
        raise CooptError(f"participant name {name!r}: use 1-64 letters, digits, '_', '.', '-' (no '/', no '..')")
    return name


def participant_dir(run: str | Path, name: str) -> Path:
    return Path(run) / "participants" / check_name(name)


def _batch_features(prior: Prior, ds, idx: np.ndarray, device: torch.device) -> np.ndarray:
    if prior.model is None:  # labels prior: one-hot over the data set's classes
        out = np.zeros((len(idx), prior.dim), dtype=np.float16)
        out[np.arange(len(idx)), ds.labels[idx]] = 1
        return out
    imgs = ds.read(idx)
    if isinstance(imgs, list):  # folder data: sizes may differ, resize one by one
        x = torch.cat([preprocess(torch.from_numpy(im)[None], prior.input_size, prior.mean, prior.std) for im in imgs])
    else:
        x = preprocess(torch.from_numpy(imgs), prior.input_size, prior.mean, prior.std)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return prior.model(x).float().flatten(1).cpu().numpy().astype(np.float16)


def extract(
    run: str | Path,
    participant: str,
    shard: int,
    prior: str,
    batch_size: int = 256,
    device: str = "cpu",
    round: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Compute features of shard `shard` and of S with prior `prior`; write features.h5."""
    from .kernels import uniformity

    if batch_size < 1:
        raise CooptError(f"--batch-size must be >= 1, got {batch_size}")
    out = participant_dir(run, participant) / "features.h5"
    plan = load_plan(run)
    idx = shard_indices(plan, shard)
    if len(idx) == 0:
        raise CooptError(f"shard {shard} of {Path(run) / 'plan.json'} is empty")
    ds = plan_dataset(plan)
    if prior.partition(":")[0] == "labels" and ds.labels is None:
        raise CooptError(f"{plan['dataset']}: the labels prior needs labels, and this data set has none")
    p = load_prior(prior, seed=seed, num_classes=len(ds.classes) or None)
    dev = torch.device(device)
    if p.model is not None:
        p.model = p.model.to(dev).to(memory_format=torch.channels_last)

    identity = {
        "participant": participant, "shard": int(shard), "prior": prior, "seed": int(seed), "round": int(round),
        "batch_size": int(batch_size), "checkpoint_sha256": p.checkpoint_sha256 or "",
        "dataset_sha256": plan["fingerprint"]["sha256"],
    }
    if out.exists():
        with store.open_complete(out, "features") as f:
            same = all(store._attr_eq(f.attrs.get(k), v) for k, v in identity.items())
            if same:
                return _summary(out, f, resumed=False, skipped=True)
        raise CooptError(f"{out}: exists from another extraction (prior/shard/seed differ); remove it to re-extract")

    t0 = time.perf_counter()
    f, resumed = store.open_partial(out, identity)
    try:
        shared = np.asarray(plan["shared"], dtype=np.int64)
        for group, rows in (("shared", shared), ("shard", idx)):
            if f"{group}/index" not in f:
                f.create_dataset(f"{group}/index", data=rows)
            ds_out = store.create_rows(f, f"{group}/features", len(rows), p.dim)
            start = store.rows_done(ds_out)
            with bar(f"{participant} {group}", len(rows), progress) as advance:
                advance(start)
                for b in range(start, len(rows), batch_size):
                    block = _batch_features(p, ds, rows[b : b + batch_size], dev)
                    store.append_rows(ds_out, block)
                    advance(len(block))
        feats = torch.from_numpy(f["shared/features"][:].astype(np.float32))
        u = float(uniformity(feats)) if len(feats) >= 2 else float("nan")
        f.attrs.update({"uniformity": u, "feature_dim": p.dim, "input_size": p.input_size,
                        "arch": p.arch, "seconds": time.perf_counter() - t0})
        store.publish(f, out)
    except BaseException:
        if f.id.valid:
            f.close()
        raise
    with store.open_complete(out, "features") as f:
        return _summary(out, f, resumed=resumed, skipped=False)


def _summary(path: Path, f, resumed: bool, skipped: bool) -> dict:
    return {
        "participant": str(f.attrs["participant"]), "path": str(path), "prior": str(f.attrs["prior"]),
        "rows": int(f["shard/features"].shape[0]), "shared_rows": int(f["shared/features"].shape[0]),
        "feature_dim": int(f.attrs["feature_dim"]), "uniformity": float(f.attrs["uniformity"]),
        "seconds": float(f.attrs["seconds"]), "resumed": resumed, "skipped": skipped,
    }
