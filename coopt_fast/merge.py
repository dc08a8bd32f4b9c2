"""Step 4, data merging: validate every aligned upload, write RUN/merged.h5 in global order.

merged.h5 (contiguous, unfiltered datasets where the loader np.memmaps them; the small float ones
it reads through h5py, target_mean, target_std and int8-dim's target_scale, carry fletcher32):
  targets      [N', n]           row r = sample index[r]; float16, or as the uploads' target_dtype
                                 (bfloat16 as uint16 bits, int8; see coopt_fast.codec)
  target_scale float32 [N'] (int8) or [K, n] (int8-dim, row r uses participant[r]'s)
  index        int64   [N']      ascending global sample indices (all of range(N) unless --allow-missing)
  participant  int16   [N']      the row's participant: the `position` of a participants/NAME group
  target_mean, target_std  float32 [n]   from the uploads' per-dimension sums (no second pass)
  images       uint8   [N', H, W, C]     for in-memory data sets up to MAX_IMAGE_BYTES
  participants/NAME  group per participant, attrs: position, shard, round (its latest: the
               top-level aligned.h5), rows (in this store), prior, features_sha256, upload (path
               relative to the run), aligned_sha256 (the upload's sha256)
  fingerprint  group, attrs n, shape, sha256: the plan's data set
  attrs: dataset, limit, dim, target_dtype, coverage (N'/N), reference
  every dataset's attr sha256: of its bytes, taken right after writing; `verify` recomputes it
  (contiguous, unfiltered data has no HDF5 checksum, so this is what catches a changed row)
Metadata is plain HDF5 attributes, no JSON text (store.write_merged_meta; store.merged_meta reads
it back, and also the JSON attributes of stores merged before).

An upload is checked whole before anything is written (_validate: structure; _check_values: every
value merge uses). A merged.h5 already made from the same uploads is left as it is; one made from
other inputs is replaced only under --force.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from . import codec, layout, remote, store
from .errors import CooptError, disk_guard
from .plan import load_plan, plan_dataset
from .store import file_sha256
from .progress import bar

MAX_IMAGE_BYTES = 4 << 30   # hold images in the store up to 4 GiB (ImageNet-size data stays in its files)
COPY_BLOCK_ROWS = 65536


# stats/sum and stats/sumsq against the targets they summarise, relative to the column's sum of
# |y| (of y^2 for sumsq). Both sides sum the same decoded values; align's fp32 block sums differ by
# <= 2e-7 of sum |y|, so 1e-4 leaves a 500x margin, and a mean/std off by 1e-4 changes nothing the
# student sees, while a wrong or stale statistic is far off.
STATS_RTOL = 1e-4
CHECK_BLOCK_VALUES = 1 << 22  # targets decoded per step of that check: 16 MiB of float32 (of 1-64 MiB, the fastest)
MAX_ROUND = 2**31 - 1


def _text_attr(where: str, attrs, key: str) -> str:
    v = attrs[key]
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    if not isinstance(v, str):
        raise CooptError(f"{where}: attribute {key} is {store.plain(v)!r} ({type(v).__name__}), expected text")
    return v


def _int_attr(where: str, attrs, key: str, lo: int, hi: int) -> int:
    v = attrs[key]
    if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or not lo <= int(v) <= hi:
        raise CooptError(f"{where}: attribute {key} is {store.plain(v)!r}, expected an integer in [{lo}, {hi}]")
    return int(v)


def _dataset(where: str, f: h5py.File, key: str, shape: tuple, dtype: str, finite: bool = False,
             positive: bool = False) -> np.ndarray:
    """f[key], read whole, after checking its shape (None: any length) and dtype; dtype is an
    exact numpy type ("float64") or "int" for any integer type."""
    d = f.get(key)
    if not isinstance(d, h5py.Dataset):
        raise CooptError(f"{where}: missing dataset {key}")
    if len(d.shape) != len(shape) or any(w is not None and w != s for w, s in zip(shape, d.shape)):
        want = "(" + ", ".join("any" if w is None else str(w) for w in shape) + ("," if len(shape) == 1 else "") + ")"
        raise CooptError(f"{where}: {key} has shape {d.shape}, expected {want}")
    if (d.dtype.kind not in "iu") if dtype == "int" else (d.dtype != np.dtype(dtype)):
        raise CooptError(f"{where}: {key} has dtype {d.dtype}, expected {'an integer type' if dtype == 'int' else dtype}")
    v = d[()]
    if finite and not np.isfinite(v).all():
        raise CooptError(f"{where}: {key} has NaN or Inf values")
    if positive and not (v > 0).all():
        raise CooptError(f"{where}: {key} has values <= 0 (a scale must be > 0)")
    return v


def _skips(where: str, key: str, skipped: np.ndarray, idx: np.ndarray) -> None:
    if len(np.unique(skipped)) != len(skipped):
        raise CooptError(f"{where}: {key} has duplicate indices")
    if not np.isin(skipped, idx).all():
        raise CooptError(f"{where}: {key} lists samples outside its {key.split('/')[0]} set")


def _validate(run: Path, name: str, plan: dict) -> dict:
    """One upload's structure against the plan (its sha256, indices, the targets' shape and
    dtype); any fault is a CooptError naming the participant and the fault. Values: _check_values."""
    path = layout.upload_path(run, name)
    where = f"participant {name} ({path})"
    try:
        f = store.open_complete(path, "aligned targets")
    except CooptError as e:
        raise CooptError(f"{where}: {str(e).split(': ', 1)[-1]}") from None
    recorded = store.read_manifest(path.parent).get("aligned.h5")
    digest = file_sha256(path)
    if recorded is None:
        f.close()
        raise CooptError(f"{where}: no sha256 recorded in manifest.json by its participant (published but not "
                         f"recorded, e.g. align interrupted: the participant reruns align)")
    if recorded != digest:
        f.close()
        raise CooptError(f"{where}: sha256 {digest[:12]} differs from the {recorded[:12]} its participant recorded (file "
                         f"changed in transit, or align interrupted before recording it: the participant reruns align)")
    with f:
        for key in ("shard/index", "shard/skipped", "shard/targets", "stats/sum", "stats/sumsq"):
            if key not in f:
                raise CooptError(f"{where}: missing dataset {key}")
        idx = _dataset(where, f, "shard/index", (None,), "int")
        tg = f["shard/targets"]
        if tg.ndim != 2 or tg.shape[0] != len(idx):
            raise CooptError(f"{where}: shard/targets shape {tg.shape} does not match {len(idx)} indices")
        td = _text_attr(where, f.attrs, "target_dtype")
        if td not in codec.TARGET_DTYPES:
            raise CooptError(f"{where}: attribute target_dtype is {td!r}, expected one of {', '.join(codec.TARGET_DTYPES)}")
        if tg.dtype != codec.storage_dtype(td):
            raise CooptError(f"{where}: shard/targets dtype {tg.dtype} does not match target_dtype {td!r}")
        if len(np.unique(idx)) != len(idx):
            raise CooptError(f"{where}: shard/index has duplicate indices")
        n = plan["fingerprint"]["n"]
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise CooptError(f"{where}: shard/index out of range [0, {n})")
        matches = [k for k, s in enumerate(plan["shards"]) if len(s) == len(idx) and np.array_equal(s, idx)]
        if not matches:
            raise CooptError(f"{where}: shard/index is not exactly one shard of the plan")
        skipped = _dataset(where, f, "shard/skipped", (None,), "int")
        _skips(where, "shard/skipped", skipped, idx)
        return {"name": name, "path": path, "where": where, "sha256": digest, "shard": matches[0], "dim": tg.shape[1],
                "reference": _text_attr(where, f.attrs, "reference"), "target_dtype": td,
                "s_star": _text_attr(where, f.attrs, "s_star") if "s_star" in f.attrs else "",  # "": before S* was recorded
                "round": _int_attr(where, f.attrs, "round", 0, MAX_ROUND) if "round" in f.attrs else 0,
                "skipped": skipped, "keep": ~np.isin(idx, skipped)}


def _check_values(u: dict, plan: dict, ds, names: list[str]) -> None:
    """Everything else in an upload that merge or the student uses, after the uploads agree on
    dim, dtype and reference: attributes, S, the map, scales, which rows may be skipped, and the
    targets themselves (one pass: finite, skipped rows zero, sums equal to stats/sum, stats/sumsq).
    Adds the upload's statistics and scale to `u`."""
    where, dim, td = u["where"], u["dim"], u["target_dtype"]
    with h5py.File(u["path"], "r") as f:
        if _int_attr(where, f.attrs, "dim", 1, 2**31) != dim:
            raise CooptError(f"{where}: attribute dim is {int(f.attrs['dim'])}, but shard/targets has {dim} columns")
        if _text_attr(where, f.attrs, "participant") != u["name"]:
            raise CooptError(f"{where}: attribute participant is {f.attrs['participant']!r}, but the upload is "
                             f"{u['name']}'s (an upload copied from another participant?)")
        if u["reference"] not in ("consensus", "none", *names):
            raise CooptError(f"{where}: attribute reference is {u['reference']!r}: not consensus, none or a participant")
        prior = u["prior"] = _text_attr(where, f.attrs, "prior")
        u["features_sha256"] = _text_attr(where, f.attrs, "features_sha256") if "features_sha256" in f.attrs else None
        w = _dataset(where, f, "projection", (None, dim), "float32", finite=True)
        _dataset(where, f, "map", w.shape, "float32", finite=True)
        rows = _dataset(where, f, "sample/rows", (None,), "int")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(u["keep"]) or (np.diff(rows) <= 0).any()):
            raise CooptError(f"{where}: sample/rows must be ascending rows of shard/targets")
        _dataset(where, f, "sample/projected", (len(rows), dim), "float16", finite=True)
        s_idx = _dataset(where, f, "shared/index", (None,), "int")
        if not np.array_equal(s_idx, plan["shared"]):
            raise CooptError(f"{where}: shared/index is not the plan's shared set S")
        _dataset(where, f, "shared/targets", (len(s_idx), dim), "float16", finite=True)
        s_skipped = _dataset(where, f, "shared/skipped", (None,), "int")
        _skips(where, "shared/skipped", s_skipped, s_idx)
        # Only an image file can fail to decode: in-memory data (npy, Fashion-MNIST) and the
        # labels prior (no decoding at all) never skip, so a skipped row there is a lost sample.
        why = ("the labels prior decodes no images" if prior.partition(":")[0] == "labels" else
               f"{plan['dataset']} is held in memory" if ds.images is not None else None)
        for key, sk in (("shard/skipped", u["skipped"]), ("shared/skipped", s_skipped)):
            if why and len(sk):
                raise CooptError(f"{where}: {key} lists {len(sk)} samples as undecodable, but {why}: none can fail")
        n_k = len(u["keep"])
        if td == "int8":
            scale = _dataset(where, f, "shard/scale", (n_k, 1), "float32", finite=True, positive=True)[:, 0]
            u["scale"] = None
        elif td == "int8-dim":
            scale = u["scale"] = _dataset(where, f, "scale", (dim,), "float32", finite=True, positive=True)
        else:
            scale = u["scale"] = None
        u["sum"] = _dataset(where, f, "stats/sum", (dim,), "float64", finite=True)
        u["sumsq"] = _dataset(where, f, "stats/sumsq", (dim,), "float64", finite=True)
        _check_targets(u, f["shard/targets"], scale)


def _check_targets(u: dict, tg, scale) -> None:
    """One pass over an upload's targets, decoded as the loader decodes them: finite, zero on
    skipped rows, and column sums (of squares) equal to its stats/sum (stats/sumsq)."""
    where, dim, td = u["where"], u["dim"], u["target_dtype"]
    s, ss, l1 = np.zeros(dim), np.zeros(dim), np.zeros(dim)
    step = max(1, CHECK_BLOCK_VALUES // dim)
    for b in range(0, len(u["keep"]), step):
        sc = None if scale is None else torch.from_numpy(scale[b : b + step] if td == "int8" else scale)
        y = codec.decode(torch.from_numpy(tg[b : b + step]), td, sc).numpy()  # float32, as the loader decodes
        keep = u["keep"][b : b + step]
        if not keep.all() and y[~keep].any():
            raise CooptError(f"{where}: shard/targets of rows listed in shard/skipped are not zero "
                             f"(extract writes zero features there, which align maps to zero targets)")
        sq = np.square(y).sum(0, dtype=np.float64)  # fp16/bf16 values square exactly in fp32
        # A NaN or Inf makes its column's sum of squares non-finite; finite float32 squares
        # cannot overflow float64, so this is the finiteness check, without another pass.
        if not np.isfinite(sq).all():
            raise CooptError(f"{where}: shard/targets has NaN or Inf values")
        ss += sq
        s += y.sum(0, dtype=np.float64)
        l1 += np.abs(y).sum(0, dtype=np.float64)
    for key, got, mass in (("stats/sum", s, l1), ("stats/sumsq", ss, ss)):
        off = np.abs(u[key.replace("stats/", "")] - got) > STATS_RTOL * mass
        if off.any():
            j = int(np.argmax(off))
            raise CooptError(f"{where}: {key} does not match shard/targets (dimension {j}: recorded "
                             f"{u[key.replace('stats/', '')][j]:.6g}, the targets give {got[j]:.6g})")


def _changes(out: Path, inputs: dict, plan: dict) -> str:
    """How merged.h5 differs from what merge would write now, "" if it is up to date: made from
    the same uploads (sha256), hence the same shards missing, and from the same data set."""
    try:
        with store.open_complete(out, "merged store") as f:
            meta = store.merged_meta(f, out)
    except CooptError as e:
        return f"but what it was made from cannot be told ({str(e).split(': ', 1)[-1]})"
    recorded, fingerprint = meta["inputs"], meta["fingerprint"]
    diff = [f"{p} changed" for p in sorted(set(inputs) & set(recorded)) if inputs[p] != recorded[p]]
    diff += [f"{p} is new" for p in sorted(set(inputs) - set(recorded))]
    diff += [f"{p} is gone" for p in sorted(set(recorded) - set(inputs))]
    if fingerprint != {k: v for k, v in plan["fingerprint"].items() if v is not None}:  # as merged_meta gives it
        diff.append("the plan's data set differs")
    return f"made from other inputs ({'; '.join(diff)})" if diff else ""


@remote.on_platform
def merge(run: str | Path, allow_missing: bool = False, progress: bool = True, force: bool = False) -> dict:
    """Validate uploads and write RUN/merged.h5 (atomically: merged.h5.partial, then rename).

    An existing merged.h5 made from the same uploads is kept (summary "skipped": True); one made
    from other inputs is replaced only with force=True.

    Args:
        run: the run folder (or an s3:// URL: merged.h5 is written to the local mirror).
        allow_missing: merge even when some shards have no upload.
        progress: progress bars (or plain lines without a terminal) on stderr.
        force: replace a merged.h5 made from other inputs.

    Returns:
        A summary: path, rows, dim, participants, missing_shards, coverage, images, seconds, skipped.

    Raises:
        CooptError: an upload that disagrees with the plan or the others (dim, reference, dtype,
            indices, non-finite values), missing shards without allow_missing, a different
            merged.h5 without force.
    """
    run = Path(run)
    t0 = time.perf_counter()
    plan = load_plan(run)
    ups, missing = _agreeing_uploads(run, plan, allow_missing)
    ds = plan_dataset(plan)
    for u in ups:
        _check_values(u, plan, ds, layout.participants(run))  # the reference may be one whose upload is missing
    job = _plan_store(run, plan, ups, ds)
    n_total = plan["fingerprint"]["n"]
    summary = {
        "path": str(job.out), "rows": int(len(job.index)), "dim": int(job.dim), "participants": [u["name"] for u in ups],
        "missing_shards": missing, "coverage": len(job.index) / n_total, "images": job.images is not None,
        "target_dtype": job.td, "rounds": job.rounds, "skipped": False,
    }
    # Before the lock and the room check: being up to date needs neither. A merge that publishes
    # between this check and our lock was made from these same uploads: replacing it changes nothing.
    if job.out.exists() and not force:
        changed = _changes(job.out, job.inputs, plan)
        if changed:
            raise CooptError(f"{job.out}: exists, {changed}; merge --force replaces it")
        return summary | {"skipped": True, "seconds": time.perf_counter() - t0}
    # The store's size is known exactly: refuse up front rather than fail half-way (HDF5 then
    # also fails to close the file, noisily).
    image_row = job.images[:1].nbytes if job.images is not None else 0
    store.check_room(job.out, len(job.index) * (codec.bytes_per_row(job.td, job.dim) + 10 + image_row) + (1 << 20))
    with store.Lock(job.out):
        with disk_guard(job.out):
            _write(job, progress)
    return summary | {"seconds": time.perf_counter() - t0}


def _agreeing_uploads(run: Path, plan: dict, allow_missing: bool) -> tuple[list[dict], list[int]]:
    """Every upload's structure (_validate), agreeing on dim, dtype, reference and S*, one per
    shard; (the uploads, the shards without one)."""
    names = layout.uploads(run)
    if not names:
        raise CooptError(f"{run}: no aligned uploads (run align first)")
    ups = [_validate(run, nm, plan) for nm in names]
    for key, what in (("dim", "disagree on the target dim"), ("target_dtype", "use different target dtypes"),
                      ("reference", "were aligned to different references")):
        if len({u[key] for u in ups}) > 1:
            raise CooptError(f"{run}: uploads {what}: " + ", ".join(f"{u['name']}={u[key]}" for u in ups))
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
    return ups, missing


@dataclass(frozen=True, eq=False)
class Job:
    """The merged store to write, decided before any byte is: rows, owners, statistics, inputs."""
    out: Path
    plan: dict
    ups: list
    index: np.ndarray           # ascending global sample ids of the rows
    row_of: np.ndarray          # global sample id -> row (-1: not in the store)
    mean: np.ndarray
    std: np.ndarray
    td: str
    dim: int
    images: object              # the data set's in-memory images when the store holds them, else None
    members: list               # per participant, in `participant` order: store.MEMBER_ATTRS and name

    @property
    def inputs(self) -> dict:
        """upload path relative to the run -> its sha256: what merged.h5 was made from."""
        return {m["upload"]: m["aligned_sha256"] for m in self.members}

    @property
    def rounds(self) -> dict:
        return {m["name"]: m["round"] for m in self.members}


def _plan_store(run: Path, plan: dict, ups: list[dict], ds) -> Job:
    n_total = plan["fingerprint"]["n"]
    # Images skipped at extraction (unreadable) are absent from the merged store, like missing shards.
    index = np.sort(np.concatenate([np.asarray(plan["shards"][u["shard"]], dtype=np.int64)[u["keep"]]
                                    for u in sorted(ups, key=lambda u: u["shard"])]))
    if not len(index):
        raise CooptError(f"{run}: every uploaded sample is skipped; nothing to merge")
    row_of = np.full(n_total, -1, dtype=np.int64)
    row_of[index] = np.arange(len(index))
    mean = sum(u["sum"] for u in ups) / len(index)  # skipped rows are zeros (checked): they add nothing
    std = np.sqrt(np.maximum(sum(u["sumsq"] for u in ups) / len(index) - mean**2, 0.0))
    hold_images = ds.images is not None and ds.images[:1].nbytes * len(index) <= MAX_IMAGE_BYTES
    return Job(out=layout.merged_path(run), plan=plan, ups=ups, index=index, row_of=row_of, mean=mean, std=std,
               td=ups[0]["target_dtype"], dim=ups[0]["dim"], images=ds.images if hold_images else None,
               members=[{"name": u["name"], "shard": u["shard"], "round": u["round"], "rows": int(u["keep"].sum()),
                         "prior": u["prior"], "features_sha256": u["features_sha256"],
                         "upload": str(u["path"].relative_to(run)), "aligned_sha256": u["sha256"]} for u in ups])


def _fill(f: h5py.File, job: Job) -> None:
    """merged.h5's attributes and layout (contiguous datasets allocated, not yet filled), and its
    small datasets."""
    plan, ups, index, td, dim = job.plan, job.ups, job.index, job.td, job.dim
    for k, v in store.provenance(
        dataset=plan["dataset"], limit=-1 if plan.get("limit") is None else int(plan["limit"]), dim=int(dim),
        target_dtype=td, coverage=len(index) / plan["fingerprint"]["n"], reference=ups[0]["reference"],
    ).items():
        f.attrs[k] = v
    store.write_merged_meta(f, job.members, plan["fingerprint"])
    store.create_contiguous(f, "targets", (len(index), dim), codec.storage_dtype(td))
    if td == "int8":  # per row, in row order
        store.create_contiguous(f, "target_scale", (len(index),), np.float32)
    elif td == "int8-dim":  # per participant and dimension: rows pick theirs by `participant`
        store.create_checked(f, "target_scale", np.stack([u["scale"] for u in ups]).astype(np.float32))
    if job.images is not None:
        store.create_contiguous(f, "images", (len(index),) + job.images.shape[1:], np.uint8)
    owner = np.empty(len(index), dtype=np.int16)
    for pos, u in enumerate(ups):
        owner[job.row_of[np.asarray(plan["shards"][u["shard"]], dtype=np.int64)[u["keep"]]]] = pos
    f.create_dataset("index", data=index)
    f.create_dataset("participant", data=owner)
    # Read through h5py, not memory-mapped: these can carry HDF5's checksum as well as the sha256.
    store.create_checked(f, "target_mean", job.mean.astype(np.float32))
    store.create_checked(f, "target_std", job.std.astype(np.float32))


def _write(job: Job, progress: bool) -> None:
    """Layout first (h5py), then the bulk bytes through np.memmap: scattering whole rows into
    global order is one numpy fancy assignment per block, where h5py's point selections cost
    per index. Published (complete + rename) only after the bytes are flushed."""
    out = job.out
    part = store.partial_path(out)
    try:
        with h5py.File(part, "w") as f:
            _fill(f, job)
        _copy_targets(part, job, progress)
        if job.images is not None:
            im = store.memmap(part, "images", mode="r+")
            for b in range(0, len(job.index), COPY_BLOCK_ROWS):
                im[b : b + COPY_BLOCK_ROWS] = job.images[job.index[b : b + COPY_BLOCK_ROWS]]
            im.flush()
            del im
        f = h5py.File(part, "r+")
        try:  # verify recomputes these: HDF5 checksums nothing in a contiguous, unfiltered dataset
            for ds in f.values():
                if isinstance(ds, h5py.Dataset):  # the metadata groups hold attributes only
                    ds.attrs["sha256"] = store.dataset_sha256(ds)
        except BaseException:
            store.abandon(f)
            raise
        store.publish(f, out)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _copy_targets(part: Path, job: Job, progress: bool) -> None:
    """Every upload's kept rows into their global rows of the partial store (and int8 row scales)."""
    tg = store.memmap(part, "targets", mode="r+")
    row_scale = store.memmap(part, "target_scale", mode="r+") if job.td == "int8" else None
    with bar("merge", len(job.index), progress, unit="rows") as advance:
        for u in job.ups:
            rows = job.row_of[np.asarray(job.plan["shards"][u["shard"]], dtype=np.int64)]  # -1 where skipped
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
