"""Crash safety, proven: SIGKILL `extract`, `align`, `merge` and `train` at seeded random moments,
rerun, and check that the outputs equal an uninterrupted run's.

    python bench/crash_harness.py                 # the CI-sized campaign (what tests/test_crash.py runs)
    python bench/crash_harness.py --full          # more kill points, larger data
    python bench/crash_harness.py --seed 3 --json bench/results/crash.json

Method. Every command runs as a real process, `python -m coopt_fast CMD ... --quiet`.
  1. An uninterrupted reference pipeline (split -> extract a, b -> align -> merge -> train) runs
     once; for each command it measures the moment the process starts working (its lock file
     holds its pid; train: merged.h5 is mapped into it) and its work time W: until its outputs
     are published, plus 15% (train: until it exits). Interpreter shutdown after the work
     (~0.5 s with torch loaded) would otherwise take most of the kills.
  2. Each command then gets a campaign in a copy of the run folder as it was before that step.
     A *sequence*: start the command, wait for its start marker, wait a seeded uniform delay in
     [0, W] (reruns: [0, W/2], since a resumed run has less left), SIGSTOP it, note which of
     its open files or mappings are `.partial`/`.tmp` files ("mid-write"), SIGKILL it. Only
     kills that land while the process still runs count as kill points. After each kill every
     final-named file must be whole (store.open_complete; train: state.pt/student.pt load).
     After 1-3 kills the same command reruns to completion; its outputs must then equal the
     reference's: every HDF5 dataset's dtype, shape and bytes, the attributes that do not
     record time/host (see VOLATILE), manifest.json entries that match the files, and
     `coopt-fast verify` clean. For train: model and optimizer tensors of state.pt, the loop
     position, student.pt's tensors and train.jsonl's losses, at the same (final) step.
  3. A sequence whose command finished before its kill ends there (still compared).
SIGSTOP before SIGKILL freezes the process so "what was it writing" is read from /proc without
a race; a stopped process dies on SIGKILL without running another instruction, so the kill is
the same as a bare SIGKILL at the SIGSTOP.

An upload killed half-way ("upload", UPLOAD_CASES): windows too narrow for a random kill, hit
exactly by a child that runs the real CLI with one library call replaced by SIGKILL (KILL_CHILD):
align --participant b killed between aligned.h5's rename and its manifest.json record (a first
upload, and a realignment), and while manifest.json's new text is half written; manifest.json torn
in transfer; merge killed with merged.h5.partial written but not renamed (fresh, and replacing an
older store under --force). After each: every final-named file is whole, merge refuses the run with
one line naming the fault and changes nothing (a dead writer's .partial/.lock may go), then the
participant does what the line asks (rerun align, resend manifest.json) and merge equals the
uncrashed run's merged.h5. Only the kills need processes (5, started together); the refusals, fixes
and merges run in this process (a CooptError is the CLI's one line: cli/app.py), one torch thread
like the processes, so that their targets have the same bits.

Workloads write large files fast: the `labels` prior on an npy data set with many rows and
many classes (one-hot float16 rows), small extract batches (many flushed appends), align to
--dim 512, and a convnet student on a few hundred 16 px images for a few epochs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
UPLOAD = "upload"  # the upload-killed-half-way scenarios (not a command: align and merge together)
COMMANDS = ("extract", "align", "merge", "train", UPLOAD)

# Attributes that record when/where a file was written (or hash files that hold such
# attributes): they legitimately differ between a killed-and-rerun output and the reference.
VOLATILE = {"created", "completed", "host", "seconds", "compile_seconds", "model_seconds",
            "features_sha256", "inputs", "aligned_sha256"}


@dataclass
class Config:
    n: int = 30_000            # npy rows for extract/align/merge
    classes: int = 256         # labels prior: one-hot width (float16 -> 512 B per row)
    extract_batch: int = 32    # rows per flushed append: many small appends, many kill points
    dim: int = 512             # align/merge target dim
    train_n: int = 128         # rows of the student's store
    train_epochs: int = 3
    train_batch: int = 16
    kills: dict = field(default_factory=lambda: {"extract": 6, "align": 6, "merge": 5, "train": 5})
    max_attempts: int = 14     # per command, counted or not
    max_kills_per_sequence: int = 3
    parallel: int = 2          # campaigns run side by side (each is mostly waiting on its process)
    upload_n: int = 2000       # the upload scenarios' data set: small, every kill point is exact
    upload_dim: int = 32

    @classmethod
    def full(cls) -> "Config":
        return cls(n=200_000, classes=512, extract_batch=64, train_n=1024, train_epochs=4,
                   kills={"extract": 25, "align": 25, "merge": 20, "train": 20}, max_attempts=60,
                   max_kills_per_sequence=4, upload_n=50_000, upload_dim=256)


@dataclass
class Result:
    command: str
    kills: int = 0               # SIGKILLs that landed while the process ran
    mid_write: int = 0           # ... while it held a .partial/.tmp file open or mapped
    left_state: int = 0          # ... and left a .partial or state.pt on disk for the rerun
    late: int = 0                # the process had finished before its kill moment (not counted)
    sequences: int = 0           # kill..kill-rerun-to-completion sequences, each compared
    attempts: int = 0
    work_seconds: float = 0.0    # W: kill delays are drawn from [0, W] after the start marker
    failures: list = field(default_factory=list)
    kill_log: list = field(default_factory=list)  # (delay after start marker, mid-write files)

    @property
    def ok(self) -> bool:
        return not self.failures


# ---- data and commands -------------------------------------------------------------------

def cli(*args) -> list[str]:
    return [PY, "-m", "coopt_fast", *map(str, args)]


def env() -> dict:
    # Deterministic settings: one thread, so no reduction is split differently between the
    # reference and a rerun (and two campaigns share 2 cores without oversubscription).
    return dict(os.environ, COOPT_PROGRESS="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def make_npy(folder: Path, n: int, hw: int, classes: int, seed: int) -> str:
    """uint8 N x hw x hw images and labels covering every class; returns the npy: spec."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(folder / "x.npy", rng.integers(0, 256, size=(n, hw, hw), dtype=np.uint8))
    y = rng.integers(0, classes, size=n)
    y[: min(n, classes)] = np.arange(min(n, classes))
    np.save(folder / "y.npy", y)
    return f"npy:{folder / 'x.npy'},{folder / 'y.npy'}"


# ---- what a process is doing -------------------------------------------------------------

def _lock_marker(locks: list[Path]):
    def started(pid: int) -> bool:
        for lock in locks:
            try:
                if f'"pid": {pid}' in lock.read_text():
                    return True
            except OSError:
                pass
        return False
    return started


def _maps_marker(name: str):
    def started(pid: int) -> bool:
        try:
            return name in Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return False
    return started


def open_partials(pid: int) -> list[str]:
    """.partial/.tmp files the (stopped) process has open or memory-mapped."""
    found = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.endswith((".partial", ".tmp", ".tmp.png")):
                found.add(Path(target).name)
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].endswith((".partial", ".tmp")):
                found.add(Path(parts[5]).name)
    except OSError:
        pass
    return sorted(found)


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_marker(p: subprocess.Popen, started, timeout: float = 120) -> float | None:
    """Seconds until the process reports it is working; None if it exited first."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if p.poll() is not None:
            return None
        if started(p.pid):
            return time.perf_counter() - t0
        time.sleep(0.003)
    raise TimeoutError(f"process {p.pid} showed no start marker in {timeout} s")


def measure(argv: list[str], started, done: list[Path] | None = None) -> tuple[float, float]:
    """(time to start marker, work seconds W) of one uninterrupted run.

    W runs from the start marker to the moment every `done` file exists (the outputs are
    published), plus 15% so that some kills land after the publish (the manifest, the
    rename of the next file); without `done`, to the process's exit. Interpreter shutdown
    after the work (~0.5 s with torch loaded) would otherwise take most of the kills."""
    t = time.perf_counter()
    p = start(argv)
    t_mark = wait_marker(p, started)
    t_done = None
    while p.poll() is None:
        if t_done is None and done and all(d.exists() for d in done):
            t_done = time.perf_counter() - t
        time.sleep(0.002)
    _, err = p.communicate(timeout=600)
    d = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {err[-2000:]}")
    if t_mark is None:
        raise RuntimeError(f"{' '.join(argv)}: finished before its start marker was seen")
    if done and t_done is not None:
        return t_mark, 1.15 * (t_done - t_mark)
    return t_mark, d - t_mark


def kill_at(p: subprocess.Popen, started, delay: float) -> tuple[bool, list[str], str]:
    """Wait for the start marker, then `delay` s; SIGSTOP, read open partials, SIGKILL.
    Returns (landed while running, mid-write files, stderr of a process that exited by itself)."""
    if wait_marker(p, started) is not None:
        deadline = time.perf_counter() + delay
        while time.perf_counter() < deadline and p.poll() is None:
            time.sleep(min(0.002, max(0.0, deadline - time.perf_counter())))
    try:
        os.killpg(p.pid, signal.SIGSTOP)
    except ProcessLookupError:
        pass
    # A zombie (exited, not yet reaped) also takes signals: only a live process is a kill point.
    alive = p.poll() is None and _state(p.pid) not in ("Z", "X", "")
    files = open_partials(p.pid) if alive else []
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, err = p.communicate()
    if p.returncode not in (-signal.SIGKILL,):
        alive = False  # it exited on its own before the signal
        return alive, [], err
    return alive, files, ""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


# ---- checks ------------------------------------------------------------------------------

def _attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def h5_digest(path: Path) -> dict:
    """{dataset: (dtype, shape, sha256 of its bytes)}, {object/attr: value} minus VOLATILE."""
    import h5py

    sets, attrs = {}, {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            for k, v in obj.attrs.items():
                if k not in VOLATILE:
                    attrs[f"{name}@{k}"] = _attr(v)
            if isinstance(obj, h5py.Dataset):
                h = hashlib.sha256()
                step = max(1, (64 << 20) // max(1, obj.dtype.itemsize * int(np.prod(obj.shape[1:], dtype=np.int64))))
                if obj.shape == ():
                    h.update(np.ascontiguousarray(obj[()]).tobytes())
                else:
                    for b in range(0, obj.shape[0], step):
                        h.update(np.ascontiguousarray(obj[b : b + step]).tobytes())
                sets[name] = (str(obj.dtype), tuple(obj.shape), h.hexdigest())

        for k, v in f.attrs.items():
            if k not in VOLATILE:
                attrs[f"/@{k}"] = _attr(v)
        f.visititems(visit)
    return {"datasets": sets, "attrs": attrs}


def compare_h5(ref: Path, got: Path) -> list[str]:
    a, b = h5_digest(ref), h5_digest(got)
    out = []
    for key in sorted(set(a["datasets"]) | set(b["datasets"])):
        if a["datasets"].get(key) != b["datasets"].get(key):
            out.append(f"{got.name}:{key}: {b['datasets'].get(key)} != reference {a['datasets'].get(key)}")
    for key in sorted(set(a["attrs"]) | set(b["attrs"])):
        va, vb = a["attrs"].get(key), b["attrs"].get(key)
        if va != vb and not (isinstance(va, float) and isinstance(vb, float) and np.isnan(va) and np.isnan(vb)):
            out.append(f"{got.name} attr {key}: {vb!r} != reference {va!r}")
    return out


def check_whole(folder: Path) -> list[str]:
    """Every final-named file under `folder` is whole: what a kill must never leave behind."""
    import torch

    from coopt_fast import store
    from coopt_fast.errors import CooptError
    from coopt_fast.priors import read_checkpoint

    bad = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".h5":
                store.open_complete(path, path.name).close()
            elif path.name == "state.pt":
                torch.load(path, map_location="cpu", weights_only=True)
            elif path.name == "student.pt":
                read_checkpoint(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".jsonl":
                [json.loads(line) for line in path.read_text().splitlines()]
        except (CooptError, ValueError, RuntimeError, OSError, EOFError) as e:
            bad.append(f"{path.relative_to(folder)}: final-named file is not whole ({str(e)[:200]})")
        except Exception as e:  # noqa: BLE001  (torch.load raises pickle errors too)
            bad.append(f"{path.relative_to(folder)}: final-named file is not whole ({type(e).__name__}: {str(e)[:200]})")
    return bad


def check_manifests(ref_run: Path, run: Path, names: list[str], files: list[str]) -> list[str]:
    """Each participant's manifest.json records the same files as the reference's, with the
    sha256 of the files actually there."""
    from coopt_fast.priors import file_sha256

    out = []
    for nm in names:
        d, rd = run / "participants" / nm, ref_run / "participants" / nm
        man = json.loads((d / "manifest.json").read_text()) if (d / "manifest.json").exists() else {}
        rman = json.loads((rd / "manifest.json").read_text()) if (rd / "manifest.json").exists() else {}
        want = sorted(k for k in rman if k in files)
        got = sorted(k for k in man if k in files)
        if got != want:
            out.append(f"participants/{nm}/manifest.json records {got}, reference records {want}")
        for k in got:
            if (d / k).exists() and man[k] != file_sha256(d / k):
                out.append(f"participants/{nm}/manifest.json: {k} sha256 does not match the file")
    return out


def check_verify(run: Path) -> list[str]:
    from coopt_fast.verify import verify

    return [f"verify: {c['file']} {c['check']}: {c['detail']}" for c in verify(run)["checks"] if not c["ok"]]


def compare_train(ref: Path, got: Path) -> list[str]:
    import torch

    from coopt_fast.priors import read_checkpoint

    out = []
    a = torch.load(ref / "state.pt", map_location="cpu", weights_only=True)
    b = torch.load(got / "state.pt", map_location="cpu", weights_only=True)
    for k in ("epoch", "batch", "step"):
        if a["loop"][k] != b["loop"][k]:
            out.append(f"state.pt loop.{k}: {b['loop'][k]} != reference {a['loop'][k]}")
    for k, v in a["model"].items():
        if k not in b["model"] or not torch.equal(v, b["model"][k]):
            out.append(f"state.pt model[{k}] differs")
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in oa:
        for k, v in oa[i].items():
            if i not in ob or not torch.equal(v, ob[i][k]):
                out.append(f"state.pt optimizer state {i}.{k} differs")
    if not torch.equal(a["aug_rng"], b["aug_rng"]):
        out.append("state.pt aug_rng differs")
    sa, ma = read_checkpoint(ref / "student.pt")
    sb, mb = read_checkpoint(got / "student.pt")
    for k, v in sa.items():
        if k not in sb or not torch.equal(v, sb[k]):
            out.append(f"student.pt[{k}] differs")
    if (ma.get("epochs"), ma.get("steps")) != (mb.get("epochs"), mb.get("steps")):
        out.append(f"student.pt meta epochs/steps {(mb.get('epochs'), mb.get('steps'))} != reference "
                   f"{(ma.get('epochs'), ma.get('steps'))}")
    la = [(r["epoch"], r["loss"], r["steps"]) for r in map(json.loads, (ref / "train.jsonl").read_text().splitlines())]
    lb = [(r["epoch"], r["loss"], r["steps"]) for r in map(json.loads, (got / "train.jsonl").read_text().splitlines())]
    if la != lb:
        out.append(f"train.jsonl (epoch, loss, steps) {lb} != reference {la}")
    return out


# ---- the campaign ------------------------------------------------------------------------

@dataclass
class Stage:
    command: str
    pre: Path                     # the run folder as it was before this step (copied per sequence)
    argv: callable                # (work folder) -> argv
    started: callable             # (work folder) -> (pid -> bool)
    compare: callable             # (work folder) -> list of differences from the reference
    work_seconds: float = 0.0


# A kill between the lock file's O_EXCL create and its JSON write leaves an empty lock, which
# store.Lock treats as live for 5 s (it cannot tell a torn lock from one being written): the
# documented answer is to rerun after that, which is what the harness does.
TORN_LOCK_WAIT = 5.5


def torn_lock(code: int, err: str) -> bool:
    return code == 2 and "another writer holds this file (pid None" in err


def campaign(stage: Stage, target: int, cfg: Config, seed: int, scratch: Path) -> Result:
    rng = random.Random(f"{seed}:{stage.command}")
    res = Result(stage.command, work_seconds=stage.work_seconds)
    w = max(stage.work_seconds, 0.05)
    seq = 0
    while res.kills < target and res.attempts < cfg.max_attempts and len(res.failures) < 5:
        seq += 1
        work = scratch / f"{stage.command}-{seq}"
        shutil.copytree(stage.pre, work)
        argv, started = stage.argv(work), stage.started(work)
        planned = rng.randint(1, cfg.max_kills_per_sequence)
        finished = False
        i = 0
        while i < planned and res.attempts < cfg.max_attempts:
            res.attempts += 1
            delay = rng.uniform(0, w if i == 0 else w / 2)
            p = start(argv)
            landed, files, err = kill_at(p, started, delay)
            if not landed:
                if torn_lock(p.returncode, err):
                    time.sleep(TORN_LOCK_WAIT)
                    continue
                if p.returncode != 0:
                    res.failures.append(f"seq {seq}: rerun exited {p.returncode}: {err.strip()[-500:]}")
                res.late += 1
                finished = True
                break
            i += 1
            res.kills += 1
            res.mid_write += bool(files)
            res.left_state += any(p.name.endswith(".partial") or p.name == "state.pt" for p in work.rglob("*"))
            res.kill_log.append((round(delay, 3), files))
            res.failures += [f"seq {seq} after kill {i + 1}: {m}" for m in check_whole(work)]
        if not finished:  # the final clean rerun
            r = subprocess.run(argv, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
            if torn_lock(r.returncode, r.stderr):
                time.sleep(TORN_LOCK_WAIT)
                r = subprocess.run(argv, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                res.failures.append(f"seq {seq}: clean rerun exited {r.returncode}: {r.stderr.strip()[-500:]}")
                continue
        res.sequences += 1
        res.failures += [f"seq {seq}: {m}" for m in stage.compare(work)]
        shutil.rmtree(work, ignore_errors=True)
    return res


def build(cfg: Config, root: Path, seed: int = 0) -> list[Stage]:
    """Data, the reference pipeline (uninterrupted, timed) and one Stage per command."""
    import coopt_fast

    spec = make_npy(root / "data", cfg.n, 8, cfg.classes, seed)
    ref = root / "ref"
    coopt_fast.split(spec, ref, participants=2, shared_fraction=0.02, seed=seed)
    pre_extract = root / "pre-extract"
    shutil.copytree(ref, pre_extract)

    def extract_argv(run, name="a", shard=0):
        return cli("extract", run, "--participant", name, "--shard", shard, "--prior", "labels",
                   "--batch-size", cfg.extract_batch, "--quiet")

    def extract_marker(run):
        return _lock_marker([run / "participants" / "a" / "features.h5.lock"])

    _, w_extract = measure(extract_argv(ref), extract_marker(ref), [ref / "participants/a/features.h5"])
    coopt_fast.extract(ref, "b", 1, "labels", batch_size=cfg.extract_batch, progress=False)
    pre_align = root / "pre-align"
    shutil.copytree(ref, pre_align)

    def align_argv(run):
        return cli("align", run, "--dim", cfg.dim, "--quiet")

    def align_marker(run):
        return _lock_marker([run / "participants" / nm / "aligned.h5.lock" for nm in ("a", "b")])

    _, w_align = measure(align_argv(ref), align_marker(ref),
                         [ref / "participants" / nm / "aligned.h5" for nm in ("a", "b")])
    pre_merge = root / "pre-merge"
    shutil.copytree(ref, pre_merge)

    def merge_argv(run):
        return cli("merge", run, "--quiet")

    def merge_marker(run):
        return _lock_marker([run / "merged.h5.lock"])

    _, w_merge = measure(merge_argv(ref), merge_marker(ref), [ref / "merged.h5"])

    # The student's store: a small data set of its own, 16 px images, through the library.
    tspec = make_npy(root / "tdata", cfg.train_n, 16, 10, seed + 1)
    tref = root / "tref"
    coopt_fast.split(tspec, tref, participants=2, shared_fraction=0.1, seed=seed)
    for k, nm in enumerate(("a", "b")):
        coopt_fast.extract(tref, nm, k, "labels", progress=False)
    coopt_fast.align(tref, dim=32, progress=False)
    coopt_fast.merge(tref, progress=False)
    pre_train = root / "pre-train"
    pre_train.mkdir()
    shutil.copy(tref / "merged.h5", pre_train / "merged.h5")

    def train_argv(run):
        return cli("train", run / "merged.h5", "--student", "convnet", "--epochs", cfg.train_epochs,
                   "--out", run / "out", "--batch-size", cfg.train_batch, "--input-size", 16, "--device", "cpu",
                   "--no-compile", "--seed", seed, "--resume", "--quiet")

    def train_marker(run):
        return _maps_marker(str(run / "merged.h5"))

    tref_out = root / "train-ref"
    shutil.copytree(pre_train, tref_out)
    _, w_train = measure(train_argv(tref_out), train_marker(tref_out))

    names = ["a", "b"]
    return [
        Stage("extract", pre_extract, extract_argv, extract_marker,
              lambda run: compare_h5(ref / "participants/a/features.h5", run / "participants/a/features.h5")
              + check_manifests(ref, run, ["a"], ["features.h5"]) + check_verify(run), w_extract),
        Stage("align", pre_align, align_argv, align_marker,
              lambda run: [m for nm in names for m in compare_h5(ref / f"participants/{nm}/aligned.h5",
                                                                  run / f"participants/{nm}/aligned.h5")]
              + check_manifests(ref, run, names, ["features.h5", "aligned.h5"]) + check_verify(run), w_align),
        Stage("merge", pre_merge, merge_argv, merge_marker,
              lambda run: compare_h5(ref / "merged.h5", run / "merged.h5") + check_verify(run), w_merge),
        Stage("train", pre_train, train_argv, train_marker,
              lambda run: compare_train(tref_out / "out", run / "out") + check_whole(run), w_train),
    ]


# ---- an upload killed half-way -------------------------------------------------------------

# Runs the real CLI (argv[2:]) with one library call replaced by SIGKILL at the moment argv[1]
# names: a window of microseconds that a random kill would almost never hit.
KILL_CHILD = r"""
import os, signal, sys
from pathlib import Path
from coopt_fast import store

point = sys.argv[1]

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "before-manifest":  # aligned.h5 renamed into place; manifest.json not yet touched for it
    write_manifest = store.write_manifest
    def record(folder, filename):  # shared.h5 (published by align before the upload) is recorded
        if filename == "aligned.h5":
            die()
        return write_manifest(folder, filename)
    store.write_manifest = record
elif point == "mid-manifest":  # half of manifest.json's new text (the one naming aligned.h5) written
    write_text = Path.write_text
    def torn(self, data, *a, **k):
        if self.name.startswith("manifest.json") and '"aligned.h5"' in data:
            with open(self, "w") as f:
                f.write(data[: len(data) // 2])
            die()
        return write_text(self, data, *a, **k)
    Path.write_text = torn
elif point == "before-publish":  # merged.h5.partial whole (digests included), not yet renamed
    store.publish = die
else:
    raise SystemExit(f"unknown kill point {point}")
sys.argv = ["coopt-fast", *sys.argv[2:]]
from coopt_fast.cli import main
main()
"""

# (scenario, the run as it was before, the killed command: (kill point, CLI args after the run
# folder) or None, what merge's one line must say, what the participant then does)
UPLOAD_CASES = (
    ("align killed between publishing aligned.h5 and recording it", "a-aligned",
     ("before-manifest", "align", "--participant", "b"), "no sha256 recorded in manifest.json", "align"),
    ("realign killed between publishing aligned.h5 and recording it", "aligned",
     ("before-manifest", "align", "--participant", "b", "--force"), "differs from the", "align --force"),
    ("align killed while writing manifest.json", "a-aligned",
     ("mid-manifest", "align", "--participant", "b"), "no sha256 recorded in manifest.json", "align"),
    ("manifest.json torn in transfer", "aligned", None, "not valid JSON", "resend manifest.json"),
    ("merge killed before publishing merged.h5", "aligned", ("before-publish", "merge"), None, None),
    ("merge --force killed before replacing merged.h5", "merged, b realigned", ("before-publish", "merge", "--force"),
     "made from other inputs", None),
)


class one_thread:
    """In-process steps computed as the harness's processes compute them (OMP_NUM_THREADS=1)."""

    def __enter__(self):
        import torch

        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.n)


def _files(folder: Path) -> dict[str, str]:
    from coopt_fast.priors import file_sha256

    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def merge_refusal(run: Path, expect: str) -> tuple[str, list[str]]:
    """Merge `run`, which must be refused: (the error line, faults). The line must be one line
    holding `expect`; no file may appear or change (a dead writer's .partial/.lock may be cleared)."""
    import coopt_fast
    from coopt_fast.errors import CooptError

    before = _files(run)
    try:
        coopt_fast.merge(run, progress=False)
        line, faults = "", [f"merge accepted it; expected a refusal saying {expect!r}"]
    except CooptError as e:
        line = str(e)
        faults = [] if expect in line and "\n" not in line else [f"refusal is not one line saying {expect!r}: {line}"]
    except Exception as e:  # noqa: BLE001  (a traceback is the failure being looked for)
        line, faults = "", [f"merge failed with {type(e).__name__}: {e} (not a one-line refusal)"]
    after = _files(run)
    faults += [f"merge's refusal changed {k}" for k in after if before.get(k) != after[k]]
    faults += [f"merge's refusal removed {k}" for k in before if k not in after and not k.endswith((".partial", ".lock"))]
    return line, faults


def upload_campaign(cfg: Config, root: Path, seed: int = 0) -> Result:
    """Every UPLOAD_CASES scenario once, its kill made by a KILL_CHILD process (all at once)."""
    import coopt_fast

    res = Result(UPLOAD)
    spec = make_npy(root / "data", cfg.upload_n, 8, 16, seed)
    pre = {"a-aligned": root / "a-aligned", "aligned": root / "aligned", "merged": root / "merged"}
    coopt_fast.split(spec, pre["a-aligned"], participants=2, shared_fraction=0.05, seed=seed)
    for k, nm in enumerate(("a", "b")):
        coopt_fast.extract(pre["a-aligned"], nm, k, "labels", progress=False)
    with one_thread():
        coopt_fast.align(pre["a-aligned"], dim=cfg.upload_dim, participant="a", progress=False)
        shutil.copytree(pre["a-aligned"], pre["aligned"])
        coopt_fast.align(pre["aligned"], dim=cfg.upload_dim, participant="b", progress=False)
    shutil.copytree(pre["aligned"], pre["merged"])
    coopt_fast.merge(pre["merged"], progress=False)  # the uncrashed run's store
    ref = pre["merged"]

    work, procs = {}, {}
    for i, (case, state, kill, _, _) in enumerate(UPLOAD_CASES):
        run = work[case] = root / f"case{i}"
        shutil.copytree(pre[state.split(",")[0]], run)
        if state == "merged, b realigned":  # the uploads changed since the store was made
            with one_thread():
                coopt_fast.align(run, dim=cfg.upload_dim, participant="b", force=True, progress=False)
        if kill is not None:
            point, cmd, *rest = kill
            args = [cmd, run, *rest, "--quiet"] + (["--dim", cfg.upload_dim] if cmd == "align" else [])
            procs[case] = start([PY, "-c", KILL_CHILD, point, *map(str, args)])
    missed = set()
    for case, p in procs.items():
        _, err = p.communicate(timeout=600)
        if p.returncode != -signal.SIGKILL:
            res.failures.append(f"{case}: the kill point was never reached (exit {p.returncode}): {err.strip()[-300:]}")
            missed.add(case)
            continue
        res.kills += 1
        left = sorted(q.name for q in work[case].rglob("*") if q.name.endswith((".partial", ".tmp")))
        res.mid_write += bool(left)
        res.left_state += bool(left)
        res.kill_log.append((case, left))

    for case, state, kill, expect, fix in UPLOAD_CASES:
        run, bad = work[case], []
        if case in missed:
            continue
        bad += check_whole(run)
        man = run / "participants/b/manifest.json"
        if fix == "resend manifest.json":
            sent = man.read_bytes()
            man.write_bytes(sent[: len(sent) // 2])
        if state == "merged, b realigned" and _files(run)["merged.h5"] != _files(ref)["merged.h5"]:
            bad.append("the killed merge --force changed the published merged.h5")
        if expect is not None:
            line, faults = merge_refusal(run, expect)
            bad += faults
            res.kill_log.append((case, line))
        with one_thread():
            if fix == "align":
                coopt_fast.align(run, dim=cfg.upload_dim, participant="b", progress=False)
            elif fix == "align --force":
                coopt_fast.align(run, dim=cfg.upload_dim, participant="b", force=True, progress=False)
        if fix == "resend manifest.json":
            man.write_bytes(sent)
        try:
            coopt_fast.merge(run, progress=False, force=state == "merged, b realigned")
        except Exception as e:  # noqa: BLE001
            bad.append(f"merge after the fix failed: {type(e).__name__}: {e}")
        else:
            bad += compare_h5(ref / "merged.h5", run / "merged.h5")
            bad += check_manifests(ref, run, ["a", "b"], ["features.h5", "aligned.h5"]) + check_verify(run)
        res.sequences += 1
        res.failures += [f"{case}: {m}" for m in bad]
        if not bad:
            shutil.rmtree(run, ignore_errors=True)
    return res


def run_all(cfg: Config, root: Path, seed: int = 0, commands=COMMANDS) -> list[Result]:
    stages = {s.command: s for s in build(cfg, root, seed)} if set(commands) - {UPLOAD} else {}
    results: dict[str, Result] = {}
    todo = sorted(commands, key=lambda c: c != UPLOAD)  # one long job: first, so campaigns run beside it
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                c = todo.pop(0)
            scratch = root / "work"
            scratch.mkdir(exist_ok=True)
            try:
                results[c] = (upload_campaign(cfg, root / "upload", seed) if c == UPLOAD else
                              campaign(stages[c], cfg.kills[c], cfg, seed, scratch))
            except Exception as e:  # noqa: BLE001  (reported in the table, not lost in a thread)
                results[c] = Result(c, failures=[f"harness error: {type(e).__name__}: {e}"])

    threads = [threading.Thread(target=worker) for _ in range(max(1, cfg.parallel))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[c] for c in commands]


def table(results: list[Result]) -> str:
    rows = [("command", "kill points", "mid-write", "left partial/state", "late (uncounted)", "sequences", "W s",
             "result")]
    for r in results:
        rows.append((r.command, str(r.kills), str(r.mid_write), str(r.left_state), str(r.late), str(r.sequences),
                     f"{r.work_seconds:.2f}", "pass" if r.ok else "FAIL"))
    rows.append(("total", str(sum(r.kills for r in results)), str(sum(r.mid_write for r in results)),
                 str(sum(r.left_state for r in results)), str(sum(r.late for r in results)),
                 str(sum(r.sequences for r in results)), "",
                 "pass" if all(r.ok for r in results) else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        for f in r.failures:
            lines.append(f"{r.command}: {f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="more kill points, larger data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--workdir", type=Path, default=None, help="keep the run folders here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    a = ap.parse_args()
    cfg = Config.full() if a.full else Config()
    sys.path.insert(0, str(ROOT))
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crash-") as tmp:
        root = a.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        results = run_all(cfg, root, a.seed, [c for c in a.commands.split(",") if c])
    print(table(results))
    print(f"{'full' if a.full else 'ci'} mode, seed {a.seed}, {time.perf_counter() - t:.0f} s, "
          f"{os.cpu_count()} CPUs")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"mode": "full" if a.full else "ci", "seed": a.seed, "config": asdict(cfg),
                                      "results": [asdict(r) | {"ok": r.ok} for r in results]}, indent=1))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
