"""Where everything lives: the platform's run folder and each participant's own workspace.

    RUN/                          the platform's (a folder, or s3://bucket/prefix: coopt_fast.remote)
      plan.json                   split
      participants/NAME/          what NAME publishes; the platform reads nothing else of NAME's
        record.json               extract: round, shard, prior, feature dim, scores on S, features' sha256
        shared.h5                 align: NAME's features on S projected to the target dim (consensus
                                  input), or, when NAME is the reference, S* (its targets on S)
        aligned.h5                align: the upload (targets of NAME's shard)
        manifest.json             sha256 of each file above: readers trust only what it names
        rounds/R/                 an older round's files, moved there by extract --round
      merged.h5                   merge (always on local disk: the loader memory-maps it)
    WORKSPACE/                    NAME's own (default: RUN/participants/NAME, one machine for all)
      features.h5                 extract: raw features of the shard and of S; never published
      manifest.json, rounds/R/    its sha256; older rounds' features

With the default workspace both live in one folder, as on a single shared disk. With
`--workspace DIR` (extract and align) the features stay in DIR and the run folder holds only what
crosses the boundary (PUBLISHED).
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import CooptError

# Words align's --reference gives a meaning to: a participant of that name would make them ambiguous.
RESERVED_NAMES = ("consensus", "best", "none")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # fullmatch: "$" would let a final newline through

FEATURES, RECORD, SHARED, UPLOAD, MANIFEST = "features.h5", "record.json", "shared.h5", "aligned.h5", "manifest.json"
# What a participant publishes: the only files that may leave its workspace (coopt_fast.remote
# uploads exactly these, and the manifest naming them).
PUBLISHED = (RECORD, SHARED, UPLOAD)
# A round's files, in the order they are archived: features.h5 last, because its round attr is
# what says "this round is still here" (a crash mid-archive leaves it behind, and a rerun
# finishes the move). aligned.h5 first: it must never outlive the features it was made from.
ROUND_FILES = (UPLOAD, SHARED, RECORD, MANIFEST, FEATURES)


def check_name(name: str) -> str:
    """Participant names become folder names: letters, digits, _ . - only; no traversal."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise CooptError(f"participant name {name!r}: use 1-64 letters, digits, '_', '.', '-' (no '/', no '..')")
    return name


def plan_path(run: str | Path) -> Path:
    return Path(run) / "plan.json"


def merged_path(run: str | Path) -> Path:
    return Path(run) / "merged.h5"


def participants_root(run: str | Path) -> Path:
    return Path(run) / "participants"


def participant_dir(run: str | Path, name: str) -> Path:
    """NAME's published folder in the run."""
    return participants_root(run) / check_name(name)


def workspace(run: str | Path, name: str, ws: str | Path | None = None) -> Path:
    """NAME's workspace: `ws` when given, else its published folder (one machine)."""
    return Path(ws) if ws is not None else participant_dir(run, name)


def features_path(run: str | Path, name: str, ws: str | Path | None = None) -> Path:
    return workspace(run, name, ws) / FEATURES


def record_path(run: str | Path, name: str) -> Path:
    return participant_dir(run, name) / RECORD


def shared_path(run: str | Path, name: str) -> Path:
    return participant_dir(run, name) / SHARED


def upload_path(run: str | Path, name: str) -> Path:
    return participant_dir(run, name) / UPLOAD


def _folders(run: str | Path) -> list[Path]:
    root = participants_root(run)
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def participants(run: str | Path) -> list[str]:
    """Names that have published anything of their latest round: a record (extract), an upload
    (align), or features in the default workspace (runs made before records existed).
    Archived rounds live one level down and are not listed."""
    return [p.name for p in _folders(run) if any((p / n).exists() for n in (RECORD, UPLOAD, FEATURES))]


def uploads(run: str | Path) -> list[str]:
    """Names with an upload (aligned.h5) of their latest round."""
    return [p.name for p in _folders(run) if (p / UPLOAD).exists()]


def rounds(folder: Path) -> list[int]:
    """The archived rounds under a participant's folder (rounds/R/), ascending."""
    d = folder / "rounds"
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []
