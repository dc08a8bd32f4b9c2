"""`verify`: check every file of a run and say what is fine and what is wrong.

Checks: plan.json parses and its data set still has the recorded fingerprint; each file opens,
has this format_version and complete = True; every dataset reads back in full (HDF5 verifies
the fletcher32 checksum of each chunk as it reads); indices match the plan; values are finite;
each upload's sha256 matches its participant's manifest.json; merged.h5's recorded input hashes
match the uploads; each merged.h5 dataset's bytes still have the sha256 merge recorded on it
(contiguous and unfiltered for np.memmap, the merged store has no HDF5 checksum: this is what
sees a changed row); leftover .partial and .lock files are reported (work in progress or a crash).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from . import layout, publish, remote, store
from .errors import CooptError
from .plan import load_plan, plan_dataset
from .store import file_sha256

def _read_all(f: h5py.File, digests: dict | None = None) -> list[str]:
    """Read every dataset in blocks (checksums verified by HDF5); names of non-finite float datasets.
    digests: filled with {dataset name: sha256 of its bytes}, taken in the same read."""
    bad = []

    def visit(name, obj):
        if not isinstance(obj, h5py.Dataset):
            return
        h = hashlib.sha256() if digests is not None else None
        finite = True
        for block in store.dataset_blocks(obj):
            if finite and obj.dtype.kind == "f" and not np.isfinite(block).all():
                bad.append(name)
                finite = False
                if h is None:
                    return
            if h is not None:
                h.update(np.ascontiguousarray(block).data)
        if h is not None:
            digests[name] = h.hexdigest()

    f.visititems(visit)
    return bad


def _check_file(path: Path, what: str, plan: dict | None, shard: int | None) -> list[tuple[str, bool, str]]:
    rows = []
    try:
        f = store.open_complete(path, what)
    except CooptError as e:
        return [("open", False, str(e).split(": ", 1)[-1])]
    digests = {} if what == "merged store" else None
    with f:
        rows.append(("format/complete", True, f"format_version {f.attrs['format_version']}"))
        try:
            nonfinite = _read_all(f, digests)
            rows.append(("checksums", True, "every chunk read back"))
        except OSError as e:
            return rows + [("checksums", False, str(e).splitlines()[0][:120])]
        rows.append(("finite", not nonfinite, "all values finite" if not nonfinite else f"NaN/Inf in {', '.join(nonfinite)}"))
        for name, digest in (digests or {}).items():
            rec = f[name].attrs.get("sha256")
            rec = rec.decode() if isinstance(rec, bytes) else rec
            rows.append((f"sha256 {name}", rec == digest, "matches the digest recorded at merge" if rec == digest else
                         "no digest recorded (merged by an older coopt-fast: rerun merge --force)" if rec is None else
                         f"bytes changed since merge ({digest[:12]}, merge recorded {str(rec)[:12]})"))
        if plan is not None and "shard/index" in f:
            k = _int(f.attrs.get("shard", shard if shard is not None else -1))
            ok = 0 <= k < plan["participants"] and np.array_equal(f["shard/index"][:], plan["shards"][k])
            ok = ok and np.array_equal(f["shared/index"][:], plan["shared"])
            rows.append(("plan", ok, f"shard {k} and S match the plan" if ok else "indices differ from the plan"))
    return rows


@remote.on_platform
def verify(run: str | Path) -> dict:
    """A table of checks for every file in RUN; `ok` is False if any check failed.

    Args:
        run: the run folder.

    Returns:
        {"ok": bool, "checks": [{"file", "check", "ok", "detail"}, ...]}: checksums, completion,
        format version, plan agreement, manifest hashes, finite values.

    Raises:
        Nothing for faults in RUN: each is a failed check (a missing or unreadable plan too).
    """
    run = Path(run)
    checks: list[dict] = []

    def add(file, check, ok, detail):
        checks.append({"file": str(file), "check": check, "ok": bool(ok), "detail": detail})

    plan = _check_plan_file(run, add)
    pdir = layout.participants_root(run)
    for d in sorted(pdir.iterdir()) if pdir.is_dir() else []:
        _check_participant(run, d, plan, add)
    if layout.merged_path(run).exists():
        _check_merged(run, add)
    for leftover in sorted(run.rglob("*.partial")) + sorted(run.rglob("*.lock")):
        add(leftover.relative_to(run), "leftover", True, "in progress, or left by a crash: rerun the command to finish")
    return {"run": str(run), "ok": all(c["ok"] for c in checks), "checks": checks}


def _why(e: CooptError) -> str:
    return str(e).split(": ", 1)[-1]  # the fault, without the path the table already names


def _check_plan_file(run: Path, add) -> dict | None:
    try:
        plan = load_plan(run)
    except CooptError as e:
        add("plan.json", "parse", False, _why(e))
        return None
    add("plan.json", "parse", True, f"{plan['participants']} shards, |S| = {len(plan['shared'])}")
    try:
        plan_dataset(plan)
        add("plan.json", "fingerprint", True, "data set unchanged since split")
    except CooptError as e:
        add("plan.json", "fingerprint", False, _why(e))
    return plan


def _check_participant(run: Path, d: Path, plan: dict | None, add) -> None:
    """A participant's folder: its manifest, record and every store file against both."""
    try:
        man = store.read_manifest(d)
    except CooptError as e:
        add(d.relative_to(run) / "manifest.json", "parse", False, _why(e))
        man = {}
    shard = _shard_of(d)
    if (d / layout.RECORD).exists():
        try:
            rec = publish.read_record(run, d.name)
            add(d.relative_to(run) / layout.RECORD, "record", True,
                f"round {rec['round']}, shard {rec['shard']}, {rec['prior']}, recorded in manifest.json")
        except CooptError as e:
            add(d.relative_to(run) / layout.RECORD, "record", False, _why(e))
    for name in (layout.FEATURES, layout.SHARED, layout.UPLOAD):
        path = d / name
        rel = path.relative_to(run)
        if not path.exists():
            continue
        for check, ok, detail in _check_file(path, name, plan, shard):
            add(rel, check, ok, detail)
        digest = file_sha256(path)
        if name in man:
            add(rel, "sha256", man[name] == digest, "matches manifest.json" if man[name] == digest
                else f"{digest[:12]} but manifest.json records {man[name][:12]}")
        else:
            add(rel, "sha256", False, "not recorded in manifest.json")


def _check_merged(run: Path, add) -> None:
    """merged.h5 read back whole, its datasets' digests, and the uploads it was made from."""
    merged = layout.merged_path(run)
    for check, ok, detail in _check_file(merged, "merged store", None, None):
        add("merged.h5", check, ok, detail)
    try:
        with h5py.File(merged, "r") as f:
            inputs = store.merged_meta(f, merged)["inputs"]
        for rel, digest in inputs.items():
            cur = file_sha256(run / rel) if (run / rel).exists() else None
            add("merged.h5", f"input {rel}", cur == digest,
                "unchanged since merge" if cur == digest else "changed or missing since merge")
    except (OSError, CooptError) as e:
        add("merged.h5", "inputs", False, f"cannot read the recorded inputs ({e})")


def _shard_of(folder: Path) -> int | None:
    """The shard a participant holds, from its record or features (aligned.h5 does not repeat it)."""
    try:
        return _int(json.loads((folder / layout.RECORD).read_bytes())["shard"])
    except (OSError, KeyError, ValueError, TypeError, UnicodeDecodeError, RecursionError):
        pass
    try:
        with h5py.File(folder / layout.FEATURES, "r") as f:
            return _int(f.attrs["shard"])
    except (OSError, KeyError):
        return None


def _int(v) -> int:
    """An integer attribute, or -1 (no shard) when it is not one: a fault for the plan check to name."""
    try:
        return int(v)
    except (TypeError, ValueError):
        return -1
