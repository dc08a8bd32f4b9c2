"""A run in an object store (s3://bucket/prefix through fsspec and s3fs): every command works on a
local mirror of it, filled by hash-checked pulls and published from by manifest-last pushes.

Object stores have no rename, so publishing is: each file's bytes to a content-addressed key,
then the manifest that names them, last. A reader trusts only what a manifest names, and checks
every object it downloads against the sha256 the manifest gives:

    RUN/plan.json                                    split
    RUN/participants/NAME/objects/<sha256>           a published file's bytes (record.json,
                                                     shared.h5, aligned.h5: layout.PUBLISHED only)
    RUN/participants/NAME/manifest.json              {file name: sha256}: the latest round
    RUN/participants/NAME/rounds/R/manifest.json     an older round's (its objects stay)
    RUN/participants/NAME/lock                       the one writer of NAME's prefix

A push killed half-way leaves objects no manifest names (unseen; a retry writes the manifest) and
the previous manifest, whose objects are untouched. One writer per participant prefix: the lock
object is created with a conditional put (If-None-Match: *), which fails when it exists; a lock
left by a dead process on this host is taken over, one from another host is refused with what
clears it. The mirror (COOPT_CACHE_DIR, default ~/.cache/coopt-fast, then runs/<hash of the URL>)
is an ordinary run folder; a participant's default workspace for a remote run is beside it
(workspaces/<hash>/NAME), so features never enter the mirror and are never pushed. merged.h5
stays in the mirror, on local disk, where the loader memory-maps it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import shutil
import socket
import time
from pathlib import Path

from . import layout, store
from .errors import CooptError, WaitingError
from .store import file_sha256


def is_remote(run) -> bool:
    s = str(run)
    return "://" in s and not s.startswith("file://")


def local_path(run) -> str | Path:
    """file://PATH is PATH; anything else unchanged."""
    s = str(run)
    return s[len("file://"):] if s.startswith("file://") else run


def _fs(url: str):
    import fsspec

    try:  # listings must not come from a cache: another machine publishes between two calls
        fs, root = fsspec.core.url_to_fs(url, use_listings_cache=False, skip_instance_cache=True)
    except TypeError:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise CooptError(f"{url}: cannot open this object store ({e})") from None
    return fs, root.rstrip("/")


def cache_dir() -> Path:
    return Path(os.environ.get("COOPT_CACHE_DIR") or Path.home() / ".cache" / "coopt-fast")


def _key(url: str) -> str:
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def mirror_of(url: str) -> Path:
    return cache_dir() / "runs" / _key(url)


def default_workspace(url: str, name: str) -> Path:
    return cache_dir() / "workspaces" / _key(url) / layout.check_name(name)


class Remote:
    """One remote run: pulls into its mirror, pushes a participant's published files."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = _fs(self.url)
        self.mirror = mirror_of(self.url)

    def _p(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _read_json(self, key: str):
        try:
            return json.loads(self.fs.cat_file(key))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            raise CooptError(f"{self.url}/{key[len(self.root) + 1:]}: not valid JSON") from None

    def names(self) -> list[str]:
        try:
            entries = self.fs.ls(self._p("participants"), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    # -- pull --------------------------------------------------------------------------------
    def pull_plan(self) -> None:
        try:
            data = self.fs.cat_file(self._p("plan.json"))
        except FileNotFoundError:
            return  # load_plan names what is missing
        self.mirror.mkdir(parents=True, exist_ok=True)
        store.write_atomic(layout.plan_path(self.mirror), data)

    def pull(self, files: dict[str, tuple[str, ...]] | None = None) -> None:
        """plan.json, then for each participant (all of them: files=None) its manifest and the
        files it names among the given ones, each checked against its sha256; archived rounds'
        manifests too. The mirror's participant folders then hold exactly what the store does."""
        self.pull_plan()
        names = self.names()
        for nm in names:
            want = layout.PUBLISHED if files is None else files.get(nm, files.get("*", ()))
            self._pull_participant(nm, want)
        root = layout.participants_root(self.mirror)
        for d in sorted(root.iterdir()) if files is None and root.is_dir() else []:
            if d.name not in names:  # the platform's view: exactly the store's participants
                shutil.rmtree(d)

    def _pull_participant(self, name: str, want: tuple[str, ...]) -> None:
        layout.check_name(name)
        folder = layout.participant_dir(self.mirror, name)
        man = self._manifest(self._p("participants", name, layout.MANIFEST))
        folder.mkdir(parents=True, exist_ok=True)
        for fname in layout.PUBLISHED:
            dest = folder / fname
            if fname not in man or fname not in want:
                dest.unlink(missing_ok=True)
                continue
            if dest.exists() and file_sha256(dest) == man[fname]:
                continue
            self._get(name, man[fname], dest)
        store.write_atomic(folder / layout.MANIFEST, json.dumps({k: man[k] for k in sorted(man) if k in want}, indent=1).encode())
        try:
            archived = self.fs.ls(self._p("participants", name, "rounds"), detail=False)
        except FileNotFoundError:
            archived = []
        for r in archived:
            r = r.rstrip("/").rsplit("/", 1)[-1]
            if r.isdigit():
                rman = self._manifest(self._p("participants", name, "rounds", r, layout.MANIFEST))
                (folder / "rounds" / r).mkdir(parents=True, exist_ok=True)
                store.write_atomic(folder / "rounds" / r / layout.MANIFEST, json.dumps(rman, indent=1).encode())

    def _manifest(self, key: str) -> dict:
        man = self._read_json(key) or {}
        # a digest names an object key: 64 hex digits, nothing that could reach another key
        if not isinstance(man, dict) or not all(k in layout.PUBLISHED and isinstance(v, str) and len(v) == 64
                                                and set(v) <= set("0123456789abcdef") for k, v in man.items()):
            raise CooptError(f"{self.url}/{key[len(self.root) + 1:]}: not a manifest of published files and sha256s")
        return man

    def _get(self, name: str, digest: str, dest: Path) -> None:
        key = self._p("participants", name, "objects", digest)
        tmp = dest.with_name(dest.name + ".download")
        try:
            self.fs.get_file(key, str(tmp))
        except FileNotFoundError:
            raise CooptError(f"{self.url}/participants/{name}/objects/{digest}: named by {name}'s manifest.json but "
                             f"missing from the store") from None
        got = file_sha256(tmp)
        if got != digest:
            tmp.unlink()
            raise CooptError(f"{self.url}/participants/{name}/objects/{digest}: content has sha256 {got[:12]}, not the "
                             f"{digest[:12]} its manifest names (changed in the store); refused")
        os.replace(tmp, dest)

    # -- push --------------------------------------------------------------------------------
    def push(self, name: str) -> dict:
        """Publish NAME's files from the mirror: archived rounds' manifests, then each published
        file's object (skipped when the store has it), then the latest manifest, last. Returns
        {file name: bytes sent} of the objects it sent."""
        folder = layout.participant_dir(self.mirror, name)
        sent: dict[str, int] = {}
        for r in layout.rounds(folder):
            rfolder = folder / "rounds" / str(r)
            rman = {k: v for k, v in store.read_manifest(rfolder).items() if k in layout.PUBLISHED}
            for fname, digest in rman.items():
                if (rfolder / fname).exists() and (n := self._put_object(name, rfolder / fname, digest)):
                    sent[f"rounds/{r}/{fname}"] = n
            key = self._p("participants", name, "rounds", str(r), layout.MANIFEST)
            if not self.fs.exists(key):
                self.fs.pipe_file(key, json.dumps(rman, indent=1, sort_keys=True).encode())
        man = {k: v for k, v in store.read_manifest(folder).items() if k in layout.PUBLISHED}
        for fname, digest in man.items():
            if file_sha256(folder / fname) != digest:
                raise CooptError(f"{folder / fname}: sha256 is not the one its manifest.json records; not pushed")
            if n := self._put_object(name, folder / fname, digest):
                sent[fname] = n
        self._put_manifest(name, json.dumps(man, indent=1, sort_keys=True).encode())
        return sent

    def _put_object(self, name: str, path: Path, digest: str) -> int:
        key = self._p("participants", name, "objects", digest)
        if self.fs.exists(key):
            return 0
        self.fs.put_file(str(path), key)
        return path.stat().st_size

    def _put_manifest(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._p("participants", name, layout.MANIFEST), data)

    def push_plan(self) -> None:
        self.fs.pipe_file(self._p("plan.json"), layout.plan_path(self.mirror).read_bytes())

    # -- lock --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str):
        """One writer per participant prefix (conditional put; see the module doc)."""
        key = self._p("participants", layout.check_name(name), "lock")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": store._proc_start(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for _ in range(3):
            try:
                self.fs.pipe_file(key, json.dumps(me).encode(), mode="create")
                break
            except FileExistsError:
                raw = self._read_json(key)
                if raw is None:  # released meanwhile: try again
                    continue
                other = store.writer_record(raw)
                if not (other and store.writer_gone(other)):
                    raise CooptError(f"{self.url}/participants/{name}/lock: another writer holds {name}'s prefix (pid "
                                     f"{other.get('pid')} on {other.get('host')} since {other.get('since')}); if "
                                     f"that process is gone, remove the lock object") from None
                self.fs.rm_file(key)
        else:
            raise CooptError(f"{self.url}/participants/{name}/lock: could not take the lock")
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(key)


@contextlib.contextmanager
def platform(run):
    """The local folder a platform command reads: `run` itself, or a remote run's mirror with
    everything its manifests name pulled (hash-checked)."""
    if not is_remote(run):
        yield Path(local_path(run))
        return
    r = Remote(str(run))
    r.pull()
    yield r.mirror


@contextlib.contextmanager
def participant(run, name: str, workspace, own: tuple[str, ...] = layout.PUBLISHED,
                others: tuple[str, ...] = (layout.RECORD,), result: dict | None = None):
    """(local run folder, workspace) for NAME's command. Remote: NAME's prefix locked, NAME's own
    published files (`own`) and the others' (`others`) pulled, and NAME's published files pushed
    when the command returns; result["pushed"] gets the bytes sent per file."""
    if not is_remote(run):
        yield Path(local_path(run)), workspace
        return
    r = Remote(str(run))
    with r.lock(name):
        r.pull({name: own, "*": others})
        try:
            yield r.mirror, Path(workspace) if workspace is not None else default_workspace(r.url, name)
        except WaitingError:  # what it could publish (its shared.h5) is what the others wait for
            r.push(name)
            raise
        if layout.participant_dir(r.mirror, name).is_dir():
            sent = r.push(name)
            if result is not None:
                result["pushed"] = sent


def on_participant(others: tuple[str, ...]):
    """Decorate a participant's command fn(run, ..., participant, ..., workspace=None): a remote
    run is locked, pulled (`others`: which of the other participants' files it reads), run on the
    mirror and pushed (see participant)."""
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            b = sig.bind(*args, **kwargs)
            b.apply_defaults()
            run = b.arguments["run"]
            if not is_remote(run):
                b.arguments["run"] = local_path(run)
                return fn(*b.args, **b.kwargs)
            name = b.arguments.get("participant")
            if name is None:
                raise CooptError(f"{run}: a remote run is aligned by each participant: give --participant NAME")
            res: dict = {}
            with participant(run, name, b.arguments["workspace"], others=others, result=res) as (mirror, ws):
                b.arguments["run"], b.arguments["workspace"] = mirror, ws
                out = fn(*b.args, **b.kwargs)
            return out | res
        return inner
    return wrap


def on_platform(fn):
    """Decorate a platform command fn(run, ...): a remote run is pulled whole (hash-checked) and the
    command runs on the mirror."""
    @functools.wraps(fn)
    def inner(run, *args, **kwargs):
        with platform(run) as local:
            return fn(local, *args, **kwargs)
    return inner
