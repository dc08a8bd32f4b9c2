"""Step 4, data merging: validate every aligned upload, write RUN/merged.h5 in global order.

merged.h5 (contiguous, unfiltered datasets: the loader np.memmaps them):
  targets      [N', n]           row r = sample index[r]; float16, or as the uploads' target_dtype
                                 (bfloat16 as uint16 bits, int8; see coopt_fast.codec)
  target_scale float32 [N'] (int8) or [K, n] (int8-dim, row r uses participant[r]'s)
  index        int64   [N']      ascending global sample indices (all of range(N) unless --allow-missing)
  participant  int16   [N']      position of the row's participant in attr `participants`
  target_mean, target_std  float32 [n]   from the uploads' per-dimension sums (no second pass)
  images       uint8   [N', H, W, C]     for in-memory data sets up to MAX_IMAGE_BYTES
  attrs: participants (JSON), dataset, limit, fingerprint (JSON), dim, target_dtype,
         inputs (JSON {relative path: sha256}), coverage (N'/N), reference,
         rounds (JSON {name: round}: each participant's latest, the top-level aligned.h5)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from . import codec, store
from .align import participants as list_participants
from .errors import CooptError, disk_guard
from .extract import participant_dir
from .plan import load_plan, plan_dataset
from .priors import file_sha256
from .progress import bar

MAX_IMAGE_BYTES = 4 << 30   # hold images in the store up to 4 GiB (ImageNet-size data stays in its files)
COPY_BLOCK_ROWS = 65536


def _validate(run: Path, name: str, plan: dict) -> dict:
    """One upload against the plan; any fault is a CooptError naming the participant and the fault."""
    path = participant_dir(run, name) / "aligned.h5"
    where = f"participant {name} ({path})"
    try:
        f = store.open_complete(path, "aligned targets")
    except CooptError as e:
        raise CooptError(f"{where}: {str(e).split(': ', 1)[-1]}") from None
    recorded = store.read_manifest(path.parent).get("aligned.h5")
    digest = file_sha256(path)
    if recorded is None:
        f.close()
        raise CooptError(f"{where}: no sha256 recorded in manifest.json by its participant")
    if recorded != digest:
        f.close()
        raise CooptError(f"{where}: sha256 {digest[:12]} differs from the {recorded[:12]} its participant recorded (file changed in transit)")
    with f:
        for key in ("shard/index", "shard/skipped", "shard/targets", "stats/sum", "stats/sumsq"):
            if key not in f:
                raise CooptError(f"{where}: missing dataset {key}")
        idx = f["shard/index"][:]
        tg = f["shard/targets"]
        if tg.ndim != 2 or tg.shape[0] != len(idx):
            raise CooptError(f"{where}: shard/targets shape {tg.shape} does not match {len(idx)} indices")
        td = str(f.attrs.get("target_dtype", "float16"))
        if td not in codec.TARGET_DTYPES or tg.dtype != codec.storage_dtype(td):
            raise CooptError(f"{where}: shard/targets dtype {tg.dtype} does not match target_dtype {td!r}")
        scale_key = {"int8": "shard/scale", "int8-dim": "scale"}.get(td)
        if scale_key and (scale_key not in f or not np.isfinite(f[scale_key][:]).all()):
            raise CooptError(f"{where}: {td} targets need a finite {scale_key}")
        if len(np.unique(idx)) != len(idx):
            raise CooptError(f"{where}: shard/index has duplicate indices")
        n = plan["fingerprint"]["n"]
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise CooptError(f"{where}: shard/index out of range [0, {n})")
        matches = [k for k, s in enumerate(plan["shards"]) if len(s) == len(idx) and np.array_equal(s, idx)]
        if not matches:
            raise CooptError(f"{where}: shard/index is not exactly one shard of the plan")
        if tg.dtype.kind == "f" or td == "bfloat16":
            for s in range(0, tg.shape[0], COPY_BLOCK_ROWS):
                block = codec.decode(torch.from_numpy(tg[s : s + COPY_BLOCK_ROWS]), td)
                if not torch.isfinite(block).all():
                    raise CooptError(f"{where}: shard/targets has NaN or Inf values")
        skipped = f["shard/skipped"][:]
        if not np.isin(skipped, idx).all():
            raise CooptError(f"{where}: shard/skipped lists samples outside its shard")
        return {"name": name, "path": path, "sha256": digest, "shard": matches[0], "dim": tg.shape[1],
                "reference": str(f.attrs["reference"]), "target_dtype": td,
                "s_star": str(f.attrs.get("s_star", "")),  # "": aligned before S* was recorded
                "round": int(f.attrs.get("round", 0)),  # 0: aligned before rounds were recorded there
                "scale": f[scale_key][:] if scale_key else None,
                "sum": f["stats/sum"][:], "sumsq": f["stats/sumsq"][:], "keep": ~np.isin(idx, skipped)}


def merge(run: str | Path, allow_missing: bool = False, progress: bool = True) -> dict:
    """Validate uploads and write RUN/merged.h5 (atomically: merged.h5.partial, then rename)."""
    run = Path(run)
    t0 = time.perf_counter()
    plan = load_plan(run)
    names = [nm for nm in list_participants(run) if (participant_dir(run, nm) / "aligned.h5").exists()]
    if not names:
        raise CooptError(f"{run}: no aligned uploads (run align first)")
    ups = [_validate(run, nm, plan) for nm in names]
    dims = {u["dim"] for u in ups}
    refs = {u["reference"] for u in ups}
    if len(dims) > 1:
        raise CooptError(f"{run}: uploads disagree on the target dim: " + ", ".join(f"{u['name']}={u['dim']}" for u in ups))
    tds = {u["target_dtype"] for u in ups}
    if len(tds) > 1:
        raise CooptError(f"{run}: uploads use different target dtypes: " + ", ".join(f"{u['name']}={u['target_dtype']}" for u in ups))
    td = tds.pop()
    if len(refs) > 1:
        raise CooptError(f"{run}: uploads were aligned to different references: " + ", ".join(f"{u['name']}={u['reference']}" for u in ups))
    if len({u["s_star"] for u in ups if u["s_star"]}) > 1:
        raise CooptError(f"{run}: uploads were fitted to different S* (a participant's features changed since the "
                         f"others aligned): " + ", ".join(f"{u['name']}={u['s_star'][:8]}" for u in ups)
                         + "; rerun align for every participant")
    by_shard: dict[int, dict] = {}
    for u in ups:
        if u["shard"] in by_shard:
            raise CooptError(f"participant {u['name']}: covers shard {u['shard']}, already uploaded by {by_shard[u['shard']]['name']}")
        by_shard[u["shard"]] = u
    missing = [k for k in range(plan["participants"]) if k not in by_shard]
    if missing and not allow_missing:
        raise CooptError(f"{run}: shards {missing} have no upload (use --allow-missing to merge without them)")
    ds = plan_dataset(plan)

    dim = dims.pop()
    n_total = plan["fingerprint"]["n"]
    # Images skipped at extraction (unreadable) are absent from the merged store, like missing shards.
    index = np.sort(np.concatenate([np.asarray(plan["shards"][k], dtype=np.int64)[by_shard[k]["keep"]]
                                    for k in sorted(by_shard)]))
    row_of = np.full(n_total, -1, dtype=np.int64)
    row_of[index] = np.arange(len(index))
    owner = np.empty(len(index), dtype=np.int16)
    s = sum(u["sum"] for u in ups)
    ss = sum(u["sumsq"] for u in ups)
    mean = s / len(index)  # skipped rows are zeros: they add nothing to s and ss
    std = np.sqrt(np.maximum(ss / len(index) - mean**2, 0.0))
    hold_images = ds.images is not None and ds.images[:1].nbytes * len(index) <= MAX_IMAGE_BYTES
    inputs = {str(u["path"].relative_to(run)): u["sha256"] for u in ups}
    rounds = {u["name"]: u["round"] for u in ups}

    def fill(f: h5py.File) -> None:
        for k, v in store.provenance(
            participants=json.dumps([u["name"] for u in ups]), dataset=plan["dataset"],
            limit=-1 if plan.get("limit") is None else int(plan["limit"]),
            fingerprint=json.dumps(plan["fingerprint"]), dim=int(dim), target_dtype=td,
            inputs=json.dumps(inputs), coverage=len(index) / n_total, reference=ups[0]["reference"],
            rounds=json.dumps(rounds),
        ).items():
            f.attrs[k] = v
        store.create_contiguous(f, "targets", (len(index), dim), codec.storage_dtype(td))
        if td == "int8":  # per row, in row order
            store.create_contiguous(f, "target_scale", (len(index),), np.float32)
        elif td == "int8-dim":  # per participant and dimension: rows pick theirs by `participant`
            f.create_dataset("target_scale", data=np.stack([u["scale"] for u in ups]).astype(np.float32))
        if hold_images:
            store.create_contiguous(f, "images", (len(index),) + ds.images.shape[1:], np.uint8)
        for pos, u in enumerate(ups):
            owner[row_of[np.asarray(plan["shards"][u["shard"]], dtype=np.int64)[u["keep"]]]] = pos
        f.create_dataset("index", data=index)
        f.create_dataset("participant", data=owner)
        f.create_dataset("target_mean", data=mean.astype(np.float32))
        f.create_dataset("target_std", data=std.astype(np.float32))

    out = run / "merged.h5"
    # The store's size is known exactly: refuse up front rather than fail half-way (HDF5 then
    # also fails to close the file, noisily).
    need = len(index) * (codec.bytes_per_row(td, dim) + 10 + (ds.images[:1].nbytes if hold_images else 0)) + (1 << 20)
    store.check_room(out, need)
    with store.Lock(out):
        with disk_guard(out):
            _write(out, fill, ups, plan, row_of, index, ds.images if hold_images else None, progress)
    return {
        "path": str(run / "merged.h5"), "rows": int(len(index)), "dim": int(dim), "participants": [u["name"] for u in ups],
        "missing_shards": missing, "coverage": len(index) / n_total, "images": bool(hold_images), "target_dtype": td,
        "rounds": rounds,
        "seconds": time.perf_counter() - t0,
    }


def _write(out: Path, fill, ups: list[dict], plan: dict, row_of: np.ndarray, index: np.ndarray, images, progress) -> None:
    """Layout first (h5py), then the bulk bytes through np.memmap: scattering whole rows into
    global order is one numpy fancy assignment per block, where h5py's point selections cost
    per index. Published (complete + rename) only after the bytes are flushed."""
    part = store.partial_path(out)
    try:
        with h5py.File(part, "w") as f:
            fill(f)
        tg = store.memmap(part, "targets", mode="r+")
        row_scale = store.memmap(part, "target_scale", mode="r+") if ups[0]["target_dtype"] == "int8" else None
        with bar("merge", len(index), progress, unit="rows") as advance:
            for u in ups:
                rows = row_of[np.asarray(plan["shards"][u["shard"]], dtype=np.int64)]  # -1 where skipped
                with h5py.File(u["path"], "r") as src:
                    src_t = src["shard/targets"]
                    for b in range(0, len(rows), COPY_BLOCK_ROWS):
                        keep = u["keep"][b : b + COPY_BLOCK_ROWS]
                        dst = rows[b : b + COPY_BLOCK_ROWS][keep]
                        tg[dst] = src_t[b : b + COPY_BLOCK_ROWS][keep]
                        if row_scale is not None:
                            row_scale[dst] = src["shard/scale"][b : b + COPY_BLOCK_ROWS, 0][keep]
                        advance(len(keep))
        tg.flush()
        if row_scale is not None:
            row_scale.flush()
        del tg, row_scale
        if images is not None:
            im = store.memmap(part, "images", mode="r+")
            for b in range(0, len(index), COPY_BLOCK_ROWS):
                im[b : b + COPY_BLOCK_ROWS] = images[index[b : b + COPY_BLOCK_ROWS]]
            im.flush()
            del im
        store.publish(h5py.File(part, "r+"), out)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
