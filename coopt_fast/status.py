"""`status`: every participant's progress, read live from files being written.

extract switches its partial file to HDF5 single-writer/multiple-reader mode once its
datasets exist, so this reader (swmr=True, see extract.open_live) sees a consistent prefix:
rows written and flushed so far, and when the current session started (for rate and ETA).

Started is counted in shards (each participant's `shard` attribute), not in folders: a shard
two participants claim counts once, with a warning naming them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import h5py

from . import layout, publish, remote, store
from .errors import CooptError
from .store import open_live, shard_of
from .plan import load_plan


def _progress_of(part: Path) -> dict:
    try:
        with open_live(part) as f:
            done = total = new = 0
            t0 = last = None
            for group in ("shared", "shard"):
                p = f.get(f"{group}/features{store.PROGRESS}")
                if p is None:
                    return {"state": "starting"}
                p.refresh()
                v = p[:]
                done += int(v[0])
                total += f[f"{group}/features"].shape[0]
                if v[2]:
                    new += int(v[0] - v[1])
                    t0 = min(t0, v[2]) if t0 else int(v[2])
                    last = max(last, v[3]) if last else int(v[3])
    except (OSError, KeyError):
        return {"state": "starting"}
    rate = new / ((last - t0) / 1000) if t0 and last and last > t0 else 0.0
    stalled = last is not None and time.time() - last / 1000 > 60
    return {"state": "stalled" if stalled else "extracting", "rows_done": done, "rows_total": total,
            "rate": rate, "eta_seconds": (total - done) / rate if rate > 0 else None}


def _record(run: Path, name: str) -> dict | None:
    try:
        return publish.read_record(run, name)
    except CooptError:
        return None  # reported (and refused) by verify, align and merge


def _round(path: Path, attr_file: str) -> int | None:
    try:
        if attr_file == layout.RECORD:
            return int(json.loads(path.read_bytes())["round"])
        with h5py.File(path, "r") as f:
            return int(f.attrs["round"])
    except (OSError, KeyError, ValueError, TypeError, UnicodeDecodeError, RecursionError):
        return None


def rounds_of(folder: Path) -> list[int]:
    """Every round a participant's folder holds: archived (rounds/R/) and the latest."""
    latest = next((r for n in (layout.RECORD, layout.UPLOAD, layout.FEATURES)
                   if (folder / n).exists() and (r := _round(folder / n, n)) is not None), None)
    return sorted(set(layout.rounds(folder)) | ({latest} if latest is not None else set()))


@remote.on_platform
def status(run: str | Path) -> dict:
    """Per participant: extraction state, rows done/total, rows/s, ETA; whether aligned; its rounds.
    A participant whose workspace is elsewhere shows what it published (record.json, aligned.h5):
    its extraction progress is visible only in its own workspace.

    Args:
        run: the run folder (read live, while extract writes).

    Returns:
        shards, shards_started, merged, and participants: [{participant, shard, state, rows_done,
        rows_total, rate, eta_seconds, aligned, rounds}].

    Raises:
        CooptError: no plan in RUN (naming a run one level down when there is one).
    """
    run = Path(run)
    plan = load_plan(run)
    pdir = run / "participants"
    rows, holders = [], {}
    for d in sorted(pdir.iterdir()) if pdir.is_dir() else []:
        feats, part = d / "features.h5", store.partial_path(d / "features.h5")
        parts = sorted(d.glob("features.rank*.h5.partial"))  # torchrun ranks
        rec = _record(run, d.name) if (d / layout.RECORD).exists() else None
        if rec is not None and not feats.exists():  # workspace elsewhere: what it published
            row = {"state": "extracted", "rows_done": rec["rows"] + rec["shared_rows"],
                   "rows_total": rec["rows"] + rec["shared_rows"], "rate": None, "eta_seconds": None}
        elif feats.exists():
            try:
                with h5py.File(feats, "r") as f:
                    n = f["shard/features"].shape[0] + f["shared/features"].shape[0]
                row = {"state": "extracted", "rows_done": n, "rows_total": n, "rate": None, "eta_seconds": None}
            except (OSError, KeyError):  # a damaged upload: reported here, refused by align/merge/verify
                row = {"state": "unreadable", "rows_done": None, "rows_total": None, "rate": None, "eta_seconds": None}
        elif part.exists() or parts:
            row = _merge_ranks([_progress_of(q) for q in ([part] if part.exists() else parts)])
        else:
            continue
        row["participant"] = d.name
        row["shard"] = rec["shard"] if rec is not None else shard_of(
            feats if feats.exists() else part if part.exists() else parts[0])
        row["aligned"] = (d / layout.UPLOAD).exists()
        row["rounds"] = rounds_of(d)
        row["round"] = row["rounds"][-1] if row["rounds"] else None
        rows.append(row)
        if row["shard"] is not None:
            holders.setdefault(row["shard"], []).append(d.name)
    warnings = [f"shard {k}: claimed by {len(v)} participants ({', '.join(v)}); merge accepts one"
                for k, v in sorted(holders.items()) if len(v) > 1]
    started = sum(0 <= k < plan["participants"] for k in holders)  # a forged shard 7 of 2 is no start
    return {"run": str(run), "participants": rows, "shards": plan["participants"], "shards_started": started,
            "merged": (run / "merged.h5").exists(), "warnings": warnings}


def _merge_ranks(ps: list[dict]) -> dict:
    if any(p["state"] == "starting" for p in ps):
        return {"state": "starting", "rows_done": None, "rows_total": None, "rate": None, "eta_seconds": None}
    done, total = sum(p["rows_done"] for p in ps), sum(p["rows_total"] for p in ps)
    rate = sum(p["rate"] for p in ps)
    return {"state": "stalled" if any(p["state"] == "stalled" for p in ps) else "extracting",
            "rows_done": done, "rows_total": total, "rate": rate,
            "eta_seconds": max((p["eta_seconds"] or 0) for p in ps) if rate else None}
