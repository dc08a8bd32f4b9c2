"""The HDF5 store: format version, provenance, resumable chunked appends, atomic publish.

Every file is written as `NAME.partial` and renamed to `NAME` only after its writer has set
the root attribute `complete = True` and closed it, so a file under its final name is always
whole. A partial file carries `rows_done` on each appended dataset, updated after the rows
are flushed: a rerun reopens it and continues from there (kill -9 included; a partial that
HDF5 can no longer open is discarded and started over).

Feature/target datasets (and every other float array a participant publishes) are chunked
along rows (`chunk_rows`) with the fletcher32 checksum filter (`create_rows`, `create_checked`),
so a flipped bit is an HDF5 read error rather than a silent wrong number. The merged store is the
exception: contiguous and unfiltered, so the loader can np.memmap it; merge records a sha256 on
each of its datasets instead, which `verify` recomputes.

Metadata is plain HDF5: scalar attributes and groups of them, never JSON text, so h5ls/h5dump
show it as it is (merged.h5's participants and data set fingerprint: `write_merged_meta`).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import h5py
import numpy as np

from .errors import CooptError, DiskFullError, is_disk_full

FORMAT_VERSION = 1
VERSION = "0.1.0"

# Chunk rule: aim for 256 KiB per chunk, always within [10 KiB, 1 MiB] along the row axis.
# 256 KiB amortises HDF5's per-chunk overhead and checksum while a resume loses little work.
CHUNK_TARGET_BYTES = 256 << 10
CHUNK_MIN_BYTES, CHUNK_MAX_BYTES = 10 << 10, 1 << 20


def chunk_rows(row_bytes: int, total_rows: int | None = None) -> int:
    rows = max(1, CHUNK_TARGET_BYTES // max(1, row_bytes))
    rows = max(rows, -(-CHUNK_MIN_BYTES // max(1, row_bytes)))
    rows = min(rows, max(1, CHUNK_MAX_BYTES // max(1, row_bytes)))
    return max(1, min(rows, total_rows)) if total_rows else rows


def provenance(**attrs) -> dict:
    base = {
        "format_version": FORMAT_VERSION,
        "coopt_version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
    }
    base.update({k: ("" if v is None else v) for k, v in attrs.items()})
    return base


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def open_partial(path: Path, identity: dict) -> tuple[h5py.File, bool]:
    """Open `path.partial` to resume if it was started with the same `identity`, else start fresh.

    identity: attributes that must match for the old rows to be reusable (prior, seed,
    batch size, plan fingerprint, ...). Returns (file, resumed).
    """
    part = partial_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if part.exists():
        try:
            f = h5py.File(part, "a", libver="latest")
            same = all(_attr_eq(f.attrs.get(k), v) for k, v in identity.items())
            if same:
                return f, True
            f.close()
        except (OSError, KeyError):
            pass  # unreadable after a crash mid-metadata-write: start over
        part.unlink()
    f = h5py.File(part, "w", libver="latest")  # "latest": needed for SWMR (extract turns it on)
    for k, v in provenance(**identity).items():
        f.attrs[k] = v
    f.attrs["complete"] = False
    return f, False


def plain(v):
    """An HDF5 attribute value as Python: bytes decoded, numpy scalars unwrapped."""
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return v.item() if isinstance(v, np.generic) else v


def _attr_eq(a, b) -> bool:
    return plain(a) == b


def create_rows(f: h5py.File, name: str, total: int, width: int, dtype=np.float16) -> h5py.Dataset:
    """A chunked, checksummed [total, width] dataset filled by `append_rows`; reused on resume.

    Its progress lives in a small dataset beside it, `NAME_progress` = [rows_done, rows at
    session start, session start ms, last update ms]: a dataset rather than an attribute,
    because under HDF5 SWMR a writer may update datasets but not attributes, and `status`
    reads it live. `finalize` drops it before publishing.
    """
    if name in f:
        ds = f[name]
        if ds.shape != (total, width) or ds.dtype != np.dtype(dtype):
            raise CooptError(f"{f.filename}:{name}: partial has shape {ds.shape}, expected {(total, width)}")
        return ds
    rows = chunk_rows(width * np.dtype(dtype).itemsize, total)
    ds = f.create_dataset(name, shape=(total, width), dtype=dtype, chunks=(rows, width) if total else None,
                          fletcher32=bool(total))
    f.create_dataset(name + PROGRESS, data=np.zeros(4, dtype=np.int64))
    return ds


def create_checked(f: h5py.Group, name: str, data) -> h5py.Dataset:
    """A dataset holding `data` whole, chunked along rows (`chunk_rows`) with the fletcher32
    checksum, like `create_rows`'s. HDF5 takes no filter on an empty (or scalar) dataset: those
    are stored plain, having no byte to check."""
    data = np.asarray(data)
    if data.ndim == 0 or data.size == 0:
        return f.create_dataset(name, data=data)
    row = data.dtype.itemsize * int(np.prod(data.shape[1:], dtype=np.int64))
    return f.create_dataset(name, data=data, chunks=(chunk_rows(row, data.shape[0]), *data.shape[1:]),
                            fletcher32=True)


PROGRESS = "_progress"


def _progress(ds: h5py.Dataset) -> h5py.Dataset | None:
    return ds.file.get(ds.name + PROGRESS)


def decoded_on_s(f) -> np.ndarray:
    """Mask of the rows of S a features.h5 (or aligned.h5) could decode: index minus skipped."""
    return ~np.isin(f["shared/index"][:], f["shared/skipped"][:])


def rows_done(ds: h5py.Dataset) -> int:
    """Rows written so far; a published file (no progress dataset) is whole."""
    p = _progress(ds)
    return int(p[0]) if p is not None else ds.shape[0]


def set_rows_done(ds: h5py.Dataset, n: int) -> None:
    p = _progress(ds)
    p[0], p[3] = n, int(time.time() * 1000)


def start_session(ds: h5py.Dataset) -> None:
    """Mark where this run (first or resumed) began, for status's rate and ETA."""
    p = _progress(ds)
    p[1], p[2], p[3] = p[0], int(time.time() * 1000), int(time.time() * 1000)


def finalize(f: h5py.File) -> None:
    """Drop the progress datasets (the file is about to be published whole)."""
    names = []
    f.visit(lambda n: names.append(n) if n.endswith(PROGRESS) else None)
    for n in names:
        del f[n]


def append_rows(ds: h5py.Dataset, block: np.ndarray) -> None:
    """Write `block` at rows_done, flush the data, then advance rows_done (in that order)."""
    start = rows_done(ds)
    try:
        ds[start : start + len(block)] = block
        ds.file.flush()
        set_rows_done(ds, start + len(block))
        ds.file.flush()
    except (OSError, RuntimeError) as e:  # h5py reports failed writes as RuntimeError
        if is_disk_full(e):
            raise DiskFullError(f"{ds.file.filename}: disk full or file size limit reached after {start} rows") from None
        raise


def publish(f: h5py.File, path: Path) -> None:
    """Drop progress datasets, mark complete, close, and atomically rename NAME.partial -> NAME."""
    finalize(f)
    f.attrs["complete"] = True
    f.attrs["completed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    f.close()
    os.replace(partial_path(path), path)


# What each kind of published file must hold before any command reads it: a file missing one
# (hand-edited, or written by something else) is one clear error, not a KeyError deep inside a step.
SCHEMA = {
    "features": (
        ("participant", "shard", "prior", "seed", "round", "dataset_sha256", "feature_dim", "uniformity",
         "decoder_used", "seconds", "compile_seconds", "model_seconds", "created"),
        ("shared/index", "shared/features", "shared/skipped", "shard/index", "shard/features", "shard/skipped")),
    "aligned targets": (
        ("participant", "reference", "dim", "ridge", "projection_seed", "target_dtype", "prior", "uniformity",
         "residual", "round"),
        ("shard/index", "shard/targets", "shard/skipped", "shared/index", "shared/targets", "shared/skipped",
         "projection", "map", "stats/sum", "stats/sumsq", "sample/rows", "sample/projected")),
    "shared": (
        ("participant", "kind", "dim", "projection_seed", "round", "features_sha256"),
        ("index", "skipped", "values")),
    # Its participants and fingerprint groups (or, written before them, JSON attributes): merged_meta.
    "merged store": (
        ("dataset", "dim", "target_dtype"),
        ("targets", "index", "participant", "target_mean", "target_std")),
}


def check_schema(f: h5py.File, path: Path, what: str) -> None:
    """CooptError naming the first attribute or dataset a `what` file lacks (see SCHEMA)."""
    attrs, datasets = SCHEMA.get(what, ((), ()))
    for a in attrs:
        if a not in f.attrs:
            raise CooptError(f"{path}: missing attribute {a} (not a {what} file written by coopt-fast)")
    for d in datasets:
        if not isinstance(f.get(d), h5py.Dataset):
            raise CooptError(f"{path}: missing dataset {d} (not a {what} file written by coopt-fast)")


def open_complete(path: Path, what: str) -> h5py.File:
    """Open a published store file read-only; one clear error for every way it can be wrong
    (missing, not HDF5, another format version, incomplete, lacking what SCHEMA[what] names)."""
    path = Path(path)
    if not path.exists():
        hint = " (a partial file exists: its writer has not finished)" if partial_path(path).exists() else ""
        raise CooptError(f"{path}: {what} not found{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise CooptError(f"{path}: not a readable HDF5 file (truncated or not HDF5)") from None
    version = f.attrs.get("format_version")
    if version != FORMAT_VERSION:
        f.close()
        raise CooptError(f"{path}: format_version is {version}, this coopt-fast reads {FORMAT_VERSION}")
    if not bool(f.attrs.get("complete", False)):
        f.close()
        raise CooptError(f"{path}: marked incomplete")
    try:
        check_schema(f, path, what)
    except CooptError:
        f.close()
        raise
    return f


# merged.h5's per-participant group attributes, in the order h5ls lists them (written in this order).
MEMBER_ATTRS = ("position", "shard", "round", "rows", "prior", "features_sha256", "upload", "aligned_sha256")


def write_merged_meta(f: h5py.File, members: list[dict], fingerprint: dict) -> None:
    """merged.h5's metadata as groups an h5ls/h5dump user reads without parsing anything:
    participants/NAME (one per participant, in `participant`'s order, and `position` says which
    code of that dataset it is) with MEMBER_ATTRS, and fingerprint (the plan's data set: n, shape,
    sha256) as attributes. A None value is left out (HDF5 has no null)."""
    group = f.create_group("participants", track_order=True)
    for pos, m in enumerate(members):
        g = group.create_group(m["name"])
        for k in MEMBER_ATTRS:
            v = pos if k == "position" else m.get(k)
            if v is not None:
                g.attrs[k] = v
    fp = f.create_group("fingerprint")
    for k, v in fingerprint.items():
        if v is not None:
            fp.attrs[k] = v


def merged_meta(f: h5py.File, path: Path | str) -> dict:
    """What merged.h5 records about its making, as the code uses it: participants [names, in
    `participant`'s order], inputs {upload path relative to the run: sha256}, rounds {name: round},
    fingerprint {n, shape, sha256} (None values left out). Reads the groups write_merged_meta
    writes and, from stores merged before them, the JSON-text attributes, so a store copied to a
    training machine without the uploads it was merged from still trains. CooptError if neither."""
    if isinstance(f.get("participants"), h5py.Group) and isinstance(f.get("fingerprint"), h5py.Group):
        members = sorted((_values(g.attrs) | {"name": n} for n, g in f["participants"].items()),
                         key=lambda m: m.get("position", 0))
        return {"participants": [m["name"] for m in members],
                "inputs": {m["upload"]: m["aligned_sha256"] for m in members if "upload" in m},
                "rounds": {m["name"]: m.get("round", 0) for m in members},
                "fingerprint": _values(f["fingerprint"].attrs)}
    return _legacy_meta(f, path)


def _legacy_meta(f: h5py.File, path: Path | str) -> dict:
    """merged_meta of a store merged before the groups: JSON text in attributes."""
    kinds = {"participants": list, "inputs": dict, "fingerprint": dict, "rounds": dict}
    try:
        old = {k: json.loads(plain(f.attrs[k])) for k in kinds if k in f.attrs or k != "rounds"}
    except (KeyError, TypeError, ValueError, RecursionError):
        old = None
    if old is None or not all(isinstance(old.get(k, {}), t) for k, t in kinds.items()):
        raise CooptError(f"{path}: no readable participants and fingerprint groups (not a merged store written "
                         f"by coopt-fast; rerun merge --force)")
    old["fingerprint"] = {k: v for k, v in old["fingerprint"].items() if v is not None}
    return {"rounds": {}} | old


def _values(attrs) -> dict:
    """HDF5 attributes as plain Python (arrays as lists), for comparing with JSON-born dicts."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else plain(v)) for k, v in attrs.items()}


def create_contiguous(f: h5py.File, name: str, shape: tuple, dtype) -> h5py.Dataset:
    """A contiguous, unfiltered dataset whose file space is allocated now (not at first write),
    so its byte offset is known and it can be filled and read through np.memmap."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # every byte is written by the filler
    return f.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)


def memmap_dataset(path: Path, ds: h5py.Dataset, mode: str = "r") -> np.ndarray:
    """np.memmap over a contiguous, unfiltered HDF5 dataset of an open file (zero-copy)."""
    if ds.chunks is not None or ds.compression is not None:
        raise CooptError(
            f"{path}:{ds.name}: dataset is chunked{' and ' + ds.compression + '-compressed' if ds.compression else ''}"
            f" (chunks {ds.chunks}); the loader memory-maps contiguous uncompressed data — rewrite it with `coopt-fast merge`"
        )
    if ds.size == 0:
        return np.empty(ds.shape, ds.dtype)
    offset = ds.id.get_offset()
    if offset is None:  # contiguous but never written and not allocated early: no storage yet
        raise CooptError(f"{path}:{ds.name}: dataset has no data written")
    return np.memmap(path, dtype=ds.dtype, mode=mode, offset=offset, shape=ds.shape)


def memmap(path: Path, name: str, mode: str = "r") -> np.memmap:
    """memmap_dataset by file path and dataset name."""
    with h5py.File(path, "r") as f:
        return memmap_dataset(path, f[name], mode)


def check_room(path: Path, need: int) -> None:
    """DiskFullError unless `need` bytes fit on path's file system and under the file size limit."""
    import resource
    import shutil

    free = shutil.disk_usage(path.parent).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    room = min(free, limit) if limit != resource.RLIM_INFINITY else free
    if need > room:
        raise DiskFullError(f"{path}: disk full: needs {need / 2**20:.1f} MiB, only {room / 2**20:.1f} MiB of disk or file size limit left")


def open_live(path: Path) -> h5py.File:
    """Open a features file another process may be writing, without its lock. Plainly first: a
    damaged file fails at once. In SWMR read mode only where HDF5 says an SWMR writer has it open
    (or had, before a kill -9): SWMR reads retry a bad checksum for minutes, not once."""
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        if "already open for write" not in str(e):  # HDF5's words for the SWMR writer's flag
            raise
    return h5py.File(path, "r", libver="latest", swmr=True, locking=False)


def shard_of(path: Path) -> int | None:
    """The `shard` attribute of a features file, or None if it cannot be read (a partial that its
    writer holds open before SWMR, or a damaged file, is skipped)."""
    try:
        with open_live(path) as f:
            return int(f.attrs["shard"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _proc_start(pid: int) -> str:
    """Process start time (Linux /proc), so a recycled pid is not mistaken for the writer."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def writer_record(other) -> dict:
    """A lock's record (pid, host, start), or {} when it is not one coopt-fast wrote (a pid from 1
    to 2**31 - 1 and a host name): a hand-edited pid must never reach os.kill (0 and -1 signal groups)."""
    ok = (isinstance(other, dict) and type(other.get("pid")) is int and 0 < other["pid"] < 2**31
          and isinstance(other.get("host"), str))
    return other if ok else {}


def writer_gone(other: dict) -> bool:
    """The writer of a (valid) lock record is a process of this host that is gone (kill -9, or its
    pid recycled): its lock is stale. One on another host cannot be checked from here."""
    if other["host"] != socket.gethostname():
        return False
    pid = other["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _proc_start(pid) != other.get("start", "")


class Lock:
    """One writer per output file: NAME.lock holds pid, host and start time (O_EXCL create).

    A lock left by a dead process on this host (kill -9) is stale and taken over; a lock from
    another host cannot be checked from here and is refused with what is needed to clear it.
    A lock that cannot be parsed (empty, torn, not JSON, no usable pid or host) is treated as
    torn: its writer died between create and write, so it is stale once 5 s old.
    """

    TORN_SECONDS = 5

    def __init__(self, path: Path):
        self.path = Path(path).with_name(Path(path).name + ".lock")

    def __enter__(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():  # unlink cannot take it over
            raise CooptError(f"{self.path}: is a folder, not a lock file; remove it")
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    other = self._read()
                    if not other:  # "(pid None" is what bench/crash_harness.py's torn_lock matches
                        raise CooptError(f"{self.path}: another writer holds this file (pid None: the lock is unreadable "
                                         f"and under {self.TORN_SECONDS} s old, so its writer may be starting); retry, "
                                         f"or remove the lock file") from None
                    raise CooptError(
                        f"{self.path}: another writer holds this file (pid {other.get('pid')} on {other.get('host')} "
                        f"since {other.get('since')}); if that process is gone, remove the lock file"
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise CooptError(f"{self.path}: could not take the lock")

    def _read(self) -> dict:
        try:
            return writer_record(json.loads(self.path.read_bytes().decode()))
        except (OSError, ValueError, RecursionError):
            return {}

    def _stale(self) -> bool:
        other = self._read()
        if not other:  # empty or torn: its writer died between create and write
            try:
                return time.time() - self.path.stat().st_mtime > self.TORN_SECONDS
            except FileNotFoundError:  # removed meanwhile: free
                return True
        return writer_gone(other)

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` whole: a temporary file beside it, renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(folder: Path, filename: str) -> str:
    """Record sha256 of a published file in folder/manifest.json (atomically); returns it.

    The participant writes it; merge and verify check uploads against it.
    """
    digest = file_sha256(folder / filename)
    man = folder / "manifest.json"
    data = read_manifest(folder)
    data[filename] = digest
    tmp = man.with_name("manifest.json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, man)
    return digest


def read_manifest(folder: Path) -> dict:
    """A participant's manifest.json as {file name: sha256}; one line naming it when it is anything else."""
    man = folder / "manifest.json"
    if not man.exists():
        return {}
    try:
        data = json.loads(man.read_text())
    except ValueError:
        raise CooptError(f"{man}: not valid JSON") from None
    except OSError as e:
        raise CooptError(f"{man}: unreadable ({e.strerror})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise CooptError(f"{man}: not a JSON object of file name -> sha256 strings")
    return data


def abandon(f: h5py.File) -> None:
    """Close a file on the way out of an error. After a failed write its close fails too
    (dirty metadata it cannot flush); that second error would hide the first, so drop it."""
    try:
        if f.id.valid:
            f.close()
    except (OSError, RuntimeError):
        pass


DIGEST_BLOCK_BYTES = 64 << 20  # rows read per step when hashing: bounded memory for any row width


def dataset_blocks(ds: h5py.Dataset):
    """A dataset's values in row blocks of at most ~64 MiB (a scalar dataset: once, whole)."""
    if ds.shape == ():
        yield ds[()]
        return
    row = ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
    step = max(1, DIGEST_BLOCK_BYTES // max(1, row))
    for b in range(0, ds.shape[0], step):
        yield ds[b : b + step]


def dataset_sha256(ds: h5py.Dataset) -> str:
    """sha256 of a dataset's bytes in C order (its values, whatever the file layout): merge
    records it on each dataset of merged.h5, verify recomputes it."""
    h = hashlib.sha256()
    for block in dataset_blocks(ds):
        h.update(np.ascontiguousarray(block).data)
    return h.hexdigest()
