"""Step 2a: a participant turns its shard (and the shared set S) into features with its prior.

Writes WORKSPACE/features.h5 (default workspace: RUN/participants/NAME; coopt_fast.layout), and
publishes RUN/participants/NAME/record.json (coopt_fast.publish) once it is whole:
  shared/index [|S|] int64, shared/features [|S|, l] float16   (computed first: small)
  shard/index [n_k] int64,  shard/features [n_k, l] float16    (plan order)
  shard/skipped, shared/skipped  int64   sample ids of images that failed to decode under
                                         --on-bad-image skip (their feature rows are zeros)
  attrs: participant, shard, prior (checkpoint path absolute), checkpoint_sha256, seed, round, feature_dim,
         uniformity (U on S, from the stored float16 features), dataset_sha256, timings

The engine: decode (coopt_fast.decode: DALI or torchvision, prefetching) overlaps the model
(channels_last, inference_mode, bf16 autocast on CUDA, optionally torch.compile'd), which
overlaps the HDF5 writes (a background thread behind a bounded queue).

Resumable: rows are appended batch by batch to features.h5.partial, `rows_done` advanced after
each flush; a rerun continues at the first missing row. Eager features do not depend on the
batch size or thread count (checked in tests; a batch of one row takes another conv algorithm,
so one-row batches are padded to two), so the datasets come out value for value the same.

One participant per shard: extract refuses a shard whose features another participant has
published or is writing (their `shard` attribute); the same name re-extracting (a resume, a
new round) is the one way to replace them.

Rounds: a participant may re-extract with an upgraded prior under a higher --round. Its published
round (layout.ROUND_FILES: aligned.h5, shared.h5, record.json, manifest.json in the run; then
features.h5 in the workspace) then moves to rounds/<old round>/ of each folder first, and
the top-level files are always the latest round, the only one align, merge and the other commands
read. features.h5 moves last, so an interrupted archive is finished by rerunning the command.

Scaling out: under torchrun (WORLD_SIZE > 1) each rank takes a contiguous slice of S and of the
shard and writes features.rankR.h5; rank 0 then stitches the parts, in plan order and
STITCH_ROWS rows at a time, into the one features.h5 (a copy rather than an HDF5 virtual dataset:
the participant uploads one self-contained, checksummed file) and removes the parts. Ranks meet
only at barriers of the gloo coordination group (coopt_fast.distributed), whatever the model runs
on; a rank that raises leaves without a barrier and exits non-zero, which ends the other ranks
(torchrun stops them; one blocked in a barrier sees the closed connection). A partial records the
world size that wrote it (rank R's rows are the R-th of WORLD_SIZE slices): an extraction with
another world size is refused while such partials exist, rather than mixing or discarding them.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from . import distributed, layout, publish, remote, store
from .store import open_live, shard_of  # noqa: F401 (status and tests read partial files with them)
from .decode import batches, choose_decoder, decode_job
from .errors import CooptError, DiskFullError
from .plan import check_seed, load_plan, plan_dataset, shard_indices
from .priors import Prior, load_prior
from .progress import bar
from .student import resolve_device

from .layout import RESERVED_NAMES, ROUND_FILES, check_name, participant_dir  # noqa: F401 (re-exported)

GROUPS = ("shared", "shard")
ROUND_WAIT_SECONDS = 120  # torchrun: how long ranks > 0 wait for rank 0 to archive the older round
MAX_ROUND = 2**31 - 1      # rounds name folders and HDF5 attributes; 2**31 rounds is beyond any use
MAX_BATCH = 65536          # one batch of 224 px images at this size is already ~40 GB as float32
STITCH_ROWS = 8192         # rows per copy when rank 0 stitches: 32 MiB at l = 2048, whatever the shard size
# torchrun: a rank that finished its part waits at a barrier for the slowest rank, which on a resume
# may have hours left (its part was the one cut short), then for rank 0's stitch. A peer that died
# is seen at once as a closed connection; this only bounds a peer that is alive but stuck.
PEER_WAIT = datetime.timedelta(days=7)


class Writer:
    """Appends blocks to an HDF5 dataset in a background thread behind a bounded queue, so the
    model never waits on the disk (and the disk never holds more than `depth` blocks in RAM)."""

    def __init__(self, ds: h5py.Dataset, skipped: h5py.Dataset, depth: int = 4):
        self.ds, self.skipped = ds, skipped
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue
            try:
                block, bad = item
                if len(bad):  # skipped ids land before rows_done moves past them
                    n = self.skipped.shape[0]
                    self.skipped.resize((n + len(bad),))
                    self.skipped[n:] = bad
                store.append_rows(self.ds, block)
            except BaseException as e:
                self.error = e

    def put(self, block: np.ndarray, bad: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((block, bad))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class ModelRunner:
    """x [b, 3, S, S] -> features [b, l] float32 on the CPU, timing compile apart from throughput."""

    def __init__(self, p: Prior, device: torch.device, compile: bool, batch_size: int):
        self.model = p.model.to(device).eval().to(memory_format=torch.channels_last)
        if compile:
            # dynamic=False, and every batch padded to batch_size: one graph, no recompiles.
            self.model = torch.compile(self.model, dynamic=False)
        self.compile, self.batch_size, self.device = compile, batch_size, device
        self.compile_seconds = self.model_seconds = 0.0
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        b = x.shape[0]
        pad = (self.batch_size - b) if self.compile else (1 if b == 1 else 0)
        if pad > 0:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            y = self.model(x.contiguous(memory_format=torch.channels_last))[:b].float().flatten(1).cpu()
        # The first call of a compiled model is mostly compilation: reported apart.
        dt = time.perf_counter() - t
        if self.calls == 0 and self.compile:
            self.compile_seconds += dt
        else:
            self.model_seconds += dt
        self.calls += 1
        return y


@remote.on_participant(others=(layout.RECORD,))
def extract(
    run: str | Path,
    participant: str,
    shard: int,
    prior: str,
    batch_size: int = 256,
    device: str = "auto",
    round: int = 0,
    seed: int = 0,
    decoder: str = "auto",
    compile: bool | None = None,
    on_bad_image: str = "fail",
    workers: int | None = None,
    progress: bool = True,
    workspace: str | Path | None = None,
) -> dict:
    """Compute features of shard `shard` and of S with prior `prior`; write features.h5 in the
    participant's workspace (default RUN/participants/NAME) and publish its record.json.

    Resumable: interrupted (even by kill -9) and called again with the same arguments, it goes
    on from the last written batch and ends with the same bytes as an uninterrupted run.

    Args:
        run: the run folder made by split (or an s3:// URL).
        participant: this participant's name (letters, digits, _ . -).
        shard: which shard of the plan is this participant's (one participant per shard).
        prior: "ARCH", "ARCH:CHECKPOINT" (.pt/.pth/.safetensors) or "labels".
        batch_size: images per model call.
        device: "auto" (cuda if present), "cpu", "cuda" or "cuda:N".
        round: collaboration round; above the published round it archives that round first.
        seed: seeds a checkpoint-less prior's random initialisation.
        decoder: "auto" (the faster one measured for this input), "dali" or "torchvision".
        compile: torch.compile the prior; None: on CUDA only.
        on_bad_image: "fail" (name the file and stop) or "skip" (record it, write a zero row).
        workers: decode threads/processes (None: min(4, cores)).
        progress: progress bars (or plain lines without a terminal) on stderr.
        workspace: the folder for features.h5 (None: RUN/participants/NAME).

    Returns:
        A summary: prior, round, archived, rows, shared_rows, skipped_images, feature_dim,
        uniformity on S, decoder, seconds, compile_seconds, model_seconds, resumed, skipped.

    Raises:
        CooptError: bad options, a shard held by someone else, a bad image (with "fail"),
            NaN/Inf features; DiskFullError (a CooptError) when the disk fills (the partial stays).
    """
    _check_options(batch_size, round, workers, on_bad_image, seed)
    job = _resolve(Path(run), participant, shard, prior, round, seed, workspace,
                   Options(batch_size, device, decoder, compile, on_bad_image, workers, progress))
    out = job.out
    created = [d for d in (out.parent.parent, out.parent) if not d.exists()]
    try:
        # Joined before any step a single rank can fail (a held lock, the wait for rank 0's
        # archive): a rank that fails later ends its peers at their next barrier, where one that
        # failed before joining would leave them waiting to join (COORD_TIMEOUT).
        with distributed.process_group(job.device, barrier_timeout=PEER_WAIT):
            s = _locked(job)
    except CooptError as e:
        if not isinstance(e, DiskFullError):  # bad input: leave the run folder as it was
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise
    if job.rank == 0:
        _publish_record(job.run, participant, out)
    return s


@dataclass(frozen=True)
class Options:
    """How to compute (none of it changes the values): extract's keyword options as given."""
    batch_size: int
    device: str
    decoder: str
    compile: bool
    on_bad_image: str
    workers: int | None
    progress: bool


@dataclass(frozen=True, eq=False)
class Job:
    """What one extract resolved before any work, passed whole down the call chain."""
    run: Path
    participant: str
    out: Path                   # the features.h5 to publish
    part: Path                  # this rank's file: out itself in one process, features.rankR.h5 under torchrun
    identity: dict              # what must match for a partial's rows to be reused
    plan: dict
    rows: dict                  # group ("shared", "shard") -> sample ids, plan order
    prior: Prior
    ds: object                  # coopt_fast.data.Dataset
    device: torch.device
    decoder: str                # resolved: "dali", "torchvision" or "none" (labels prior)
    batch_size: int
    compile: bool
    on_bad_image: str
    workers: int
    rank: int
    world: int
    progress: bool


def _check_options(batch_size: int, round: int, workers: int | None, on_bad_image: str, seed: int) -> None:
    if not 1 <= batch_size <= MAX_BATCH:
        raise CooptError(f"--batch-size must be in [1, {MAX_BATCH}], got {batch_size}")
    if round < 0:
        raise CooptError(f"--round must be >= 0, got {round}")
    if round > MAX_ROUND:
        raise CooptError(f"--round must be <= 2**31 - 1, got {round}")
    if workers is not None and workers < 1:
        raise CooptError(f"--workers must be >= 1, got {workers}")
    if on_bad_image not in ("fail", "skip"):
        raise CooptError(f"--on-bad-image {on_bad_image!r}: use fail or skip")
    check_seed(seed)


def _resolve(run: Path, participant: str, shard: int, prior: str, round: int, seed: int, workspace,
             o: Options) -> Job:
    """The plan, prior, data set, device and decoder of an extract, checked in the order their
    faults are named (the inputs' own, then the shard's holder)."""
    dev = resolve_device(o.device)
    out = layout.features_path(run, participant, workspace)
    if participant in RESERVED_NAMES:
        raise CooptError(f"participant name {participant!r}: reserved (align --reference {participant} has its own meaning)")
    plan = load_plan(run)
    idx = shard_indices(plan, shard)
    if len(idx) == 0:
        raise CooptError(f"shard {shard} of {Path(run) / 'plan.json'} is empty")
    ds = plan_dataset(plan)
    if prior.partition(":")[0] == "labels" and ds.labels is None:
        raise CooptError(f"{plan['dataset']}: the labels prior needs labels, and this data set has none")
    p = load_prior(prior, seed=seed, num_classes=len(ds.classes) or None)
    holder = shard_holder(run, shard, participant)
    if holder is not None:
        raise CooptError(f"--shard {shard}: taken by participant {holder.parent.name!r} ({holder}); one participant "
                         f"per shard: pick another shard, or remove that participant's folder")
    w = distributed.world()
    dev = distributed.rank_device(dev, w)  # cuda:LOCAL_RANK made current before NCCL starts
    rank, world = w.rank, w.size
    dec = "none" if p.model is None else choose_decoder(o.decoder, ds, dev, p.input_size)
    # None: compile on CUDA only (on the CPU, Inductor's compile time exceeds what it saves here).
    compiled = (dev.type == "cuda") if o.compile is None else bool(o.compile)
    # What must match for old rows to be reused (batch size, threads, decoder workers need not).
    identity = {
        "participant": participant, "shard": int(shard), "prior": p.spec, "seed": int(seed), "round": int(round),
        "checkpoint_sha256": p.checkpoint_sha256 or "", "dataset_sha256": plan["fingerprint"]["sha256"],
        "decoder": dec, "compile": compiled, "on_bad_image": o.on_bad_image,
    }
    return Job(run=run, participant=participant, out=out,
               part=out.with_name(f"features.rank{rank}.h5") if world > 1 else out, identity=identity, plan=plan,
               rows={"shared": np.asarray(plan["shared"], dtype=np.int64), "shard": idx}, prior=p, ds=ds, device=dev,
               decoder=dec, batch_size=o.batch_size, compile=compiled, on_bad_image=o.on_bad_image,
               workers=o.workers if o.workers is not None else min(4, os.cpu_count() or 1), rank=rank, world=world,
               progress=o.progress)


def _publish_record(run: Path, name: str, features: Path) -> None:
    """record.json of the published features, unless the published one already describes them."""
    try:
        rec = publish.read_record(run, name)
    except CooptError:
        rec = None  # a damaged record is replaced by the true one
    if rec is None or rec["features_sha256"] != store.read_manifest(features.parent).get(layout.FEATURES):
        publish.write_record(run, name, features)


def shard_holder(run: str | Path, shard: int, participant: str | None = None) -> Path | None:
    """The record or features file (published, or a partial that opens) of a participant other
    than `participant` whose `shard` is `shard`; None when the shard is free."""
    for d in sorted((Path(run) / "participants").glob("*")):
        if d.name == participant or not d.is_dir():
            continue
        feats = d / "features.h5"
        for path in [feats, store.partial_path(feats), *sorted(d.glob("features.rank*.h5.partial"))]:
            if path.is_file() and shard_of(path) == shard:
                return path
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError, RecursionError, TypeError, AttributeError):
            if json.loads((d / layout.RECORD).read_bytes()).get("shard") == shard:  # its workspace is elsewhere
                return d / layout.RECORD
    return None


def _locked(job: Job) -> dict:
    out, identity = job.out, job.identity
    with store.Lock(job.part):  # one writer per file; a kill -9'd writer's lock is stale
        archived = _retire_older_round(out, identity["round"], job.rank, job.world,
                                       layout.participant_dir(job.run, job.participant))
        summary = None
        if out.exists():
            with store.open_complete(out, "features") as f:
                if all(store._attr_eq(f.attrs.get(k), v) for k, v in identity.items()):
                    summary = _summary(out, f, resumed=False, skipped=True)
            if summary is not None:
                if "features.h5" not in store.read_manifest(out.parent):  # interrupted between publish and this
                    store.write_manifest(out.parent, out.name)
                return summary
            raise CooptError(f"{out}: exists from another extraction of round {identity['round']} (prior/shard/seed/"
                             f"decoder differ); remove it, or extract with a higher --round to archive it")
        resumed = _run(job)
    with store.open_complete(out, "features") as f:
        return _summary(out, f, resumed=resumed, skipped=False, archived=archived)


def _round_of(path: Path) -> int | None:
    """The round of a published features.h5; None when there is none (or it was just archived)."""
    try:
        with store.open_complete(path, "features") as f:
            return int(f.attrs.get("round", 0))
    except CooptError:
        if path.exists():
            raise
        return None


def _retire_older_round(out: Path, new: int, rank: int, world: int, published: Path) -> str | None:
    """Before extracting round `new`: refuse if out holds a newer round; if it holds an older one,
    archive it (rank 0) or wait until rank 0 has (ranks > 0): the published folder's files first,
    then the workspace's features. Returns the workspace's archive folder, if any."""
    old = _round_of(out)
    if old is None or old == new:
        return None
    if old > new:
        raise CooptError(f"{out}: holds round {old}, newer than --round {new}; a participant's rounds only go up")
    if rank == 0:
        with contextlib.ExitStack() as locks:
            if world > 1:  # rank 0 holds features.rank0.h5's lock; the published file has its own
                locks.enter_context(store.Lock(out))
            locks.enter_context(store.Lock(published / layout.UPLOAD))  # align must not be writing it
            if published != out.parent:
                archive_round(published, old)
            return str(archive_round(out.parent, old))
    deadline = time.monotonic() + ROUND_WAIT_SECONDS
    while (cur := _round_of(out)) is not None and cur < new:
        if time.monotonic() > deadline:
            raise CooptError(f"{out}: rank {rank} waited {ROUND_WAIT_SECONDS} s for rank 0 to archive round {cur}; "
                             f"see rank 0's error")
        time.sleep(0.2)
    return None


def archive_round(folder: Path, old: int) -> Path:
    """Move a participant's published round `old` into folder/rounds/<old>/ (ROUND_FILES, in that
    order, each with os.replace; absent ones skipped, so a rerun finishes an interrupted archive).
    Refuses to overwrite an earlier archive of the same name."""
    dest = folder / "rounds" / str(old)
    present = [n for n in ROUND_FILES if (folder / n).exists()]
    for n in present:
        if (dest / n).exists():
            raise CooptError(f"{dest / n}: round {old} is already archived there; refusing to overwrite it with "
                             f"{folder / n} (move one of the two away)")
    dest.mkdir(parents=True, exist_ok=True)
    # An unfinished align of the old features: it can never be published now.
    store.partial_path(folder / "aligned.h5").unlink(missing_ok=True)
    for n in present:
        os.replace(folder / n, dest / n)
    return dest


def _run(job: Job) -> bool:
    """Fill this rank's part, then publish features.h5 (one process: the part is it; torchrun:
    rank 0 stitches every rank's part). Returns whether a partial was resumed."""
    t0 = time.perf_counter()
    mine = {g: np.array_split(r, job.world)[job.rank] for g, r in job.rows.items()}
    out, p = job.out, job.prior
    if job.rank == 0:
        _refuse_other_world(job)
    distributed.barrier()  # no rank opens its part before rank 0 has checked them all
    runner = None if p.model is None else ModelRunner(p, job.device, job.compile, job.batch_size)
    resumed = _extract_part(job, mine, runner)
    if job.world > 1:
        distributed.barrier()  # every part whole (the slowest rank sets the pace: PEER_WAIT)
        if job.rank == 0:
            with store.Lock(out):
                _stitch(job, [out.with_name(f"features.rank{r}.h5") for r in range(job.world)], runner, t0)
    else:
        f = h5py.File(store.partial_path(out), "a")  # reopened without SWMR: attributes are writable again
        _finish(f, p, runner, t0, job.decoder)
        store.publish(f, out)
    if job.rank == 0:
        store.write_manifest(out.parent, out.name)
    distributed.barrier()  # ranks > 0 read features.h5 only once rank 0 has published it
    return resumed


def _part_identity(job: Job) -> dict:
    """What a partial must match to be resumed: the extraction's identity and the world size
    (rank R's part holds the R-th of WORLD_SIZE slices). Not part of the published file's
    identity: features.h5 is the same whatever the world size."""
    return {**job.identity, "world_size": job.world}


def _partial_world(path: Path, identity: dict) -> int | None:
    """The world size that wrote a partial of this same extraction; None for a partial of another
    extraction, one from before world sizes were recorded, or one that cannot be read (each is
    restarted by store.open_partial, as before)."""
    try:
        with store.open_live(path) as f:
            if all(store._attr_eq(f.attrs.get(k), v) for k, v in identity.items()):
                w = f.attrs.get("world_size")
                return None if w is None else int(w)
    except (OSError, KeyError, TypeError, ValueError):
        pass
    return None


def _refuse_other_world(job: Job) -> None:
    """Rank 0, before any rank opens its part: refuse while partials of this extraction written by
    another world size exist. Their rows are other slices, so they cannot be resumed; a silent
    restart would throw away hours of work for a mistyped --nproc_per_node."""
    folder = job.out.parent
    found: dict[int, list[str]] = {}
    for q in [store.partial_path(job.out), *sorted(folder.glob("features.rank*.h5.partial"))]:
        w = _partial_world(q, job.identity)
        if w is not None and w != job.world:
            found.setdefault(w, []).append(q.name)
    if found:
        w, names = min(found.items())
        raise CooptError(f"{folder}: {', '.join(names)}: partial extraction by world size {w}, and this run has world "
                         f"size {job.world} (torchrun's WORLD_SIZE; 1 without torchrun); rerun with world size {w} to "
                         f"resume it, or remove {'it' if len(names) == 1 else 'them'} to start over")


def _extract_part(job: Job, rows: dict, runner: ModelRunner | None) -> bool:
    """Fill job.part's .partial with features of `rows` (per group); leaves it unpublished."""
    f, resumed = store.open_partial(job.part, _part_identity(job))
    label = job.participant + (f"[{job.rank}]" if job.world > 1 else "")
    try:
        outs = _open_groups(f, rows, job.prior.dim)
        f.swmr_mode = True  # from here on `coopt-fast status` can read progress while we write
        for group in GROUPS:
            r, out = rows[group], outs[group]
            start = store.rows_done(out)
            if start == len(r):
                continue
            writer = Writer(out, f[f"{group}/skipped"])
            try:
                with bar(f"{label} {group}", len(r), job.progress) as advance:
                    advance(start)
                    for block, bad in _blocks(job, r, start, runner):
                        writer.put(block, bad)
                        advance(len(block))
            finally:
                writer.close()
        f.close()
    except CooptError as e:
        store.abandon(f)
        if not isinstance(e, DiskFullError):  # a bad image: no rerun will get past it, keep nothing
            store.partial_path(job.part).unlink(missing_ok=True)
        raise
    except BaseException:
        store.abandon(f)
        raise
    return resumed


def _open_groups(f: h5py.File, rows: dict, dim: int) -> dict:
    """Every dataset of a features file, created or reopened (SWMR allows writing data, not
    creating objects, so all of them exist before it is turned on); group -> features dataset."""
    outs = {}
    for group in GROUPS:
        if f"{group}/index" not in f:  # each object checked on its own: a crash may fall between
            f.create_dataset(f"{group}/index", data=rows[group])
        if f"{group}/skipped" not in f:
            f.create_dataset(f"{group}/skipped", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        outs[group] = store.create_rows(f, f"{group}/features", len(rows[group]), dim)
        store.start_session(outs[group])
    f.flush()
    return outs


def _blocks(job: Job, r: np.ndarray, start: int, runner: ModelRunner | None):
    """(float16 features, ids of images that failed to decode) of rows r[start:], batch by batch."""
    p, bs = job.prior, job.batch_size
    if runner is None:  # labels prior: one-hot, no images to decode
        for b in range(start, len(r), bs):
            block = np.zeros((len(r[b : b + bs]), p.dim), dtype=np.float16)
            block[np.arange(len(block)), job.ds.labels[r[b : b + bs]]] = 1
            yield block, np.empty(0, np.int64)
        return
    how = decode_job(job.ds, p.input_size, p.mean, p.std, bs, job.device, job.on_bad_image, job.workers)
    for batch in batches(how, r[start:], job.decoder):
        with np.errstate(over="ignore"):  # an overflow is refused below, not warned about
            y = runner(batch.x).numpy().astype(np.float16)
        y[batch.bad] = 0
        if not np.isfinite(y).all():  # float16 overflows past 65504: never publish inf
            row = r[start + batch.start + int(np.argwhere(~np.isfinite(y))[0, 0])]
            raise CooptError(f"{p.checkpoint or p.spec}: prior {p.arch} gives NaN or Inf features "
                             f"(float16 holds |x| <= 65504), first at sample {row}")
        yield y, r[start + batch.start + np.asarray(batch.bad, dtype=np.int64)]


def _finish(f: h5py.File, p: Prior, runner: ModelRunner | None, t0: float, dec: str) -> None:
    """Uniformity on S (from the stored float16 rows, skipped rows left out) and the timings."""
    from .kernels import uniformity

    feats = f["shared/features"][:].astype(np.float32)
    keep = store.decoded_on_s(f)
    feats = torch.from_numpy(feats[keep])
    f.attrs.update({
        "uniformity": float(uniformity(feats)) if len(feats) >= 2 else float("nan"),
        "feature_dim": p.dim, "input_size": p.input_size, "arch": p.arch, "decoder_used": dec,
        "seconds": time.perf_counter() - t0, "compile_seconds": runner.compile_seconds if runner else 0.0,
        "model_seconds": runner.model_seconds if runner else 0.0,
    })


def _stitch(job: Job, parts: list[Path], runner, t0: float) -> None:
    """Rank 0: concatenate the ranks' partial files, in rank (= plan) order, into features.h5."""
    out, p = job.out, job.prior
    f, _ = store.open_partial(out, _part_identity(job))
    try:
        with contextlib.ExitStack() as stack:
            srcs = [stack.enter_context(h5py.File(store.partial_path(q), "r")) for q in parts]
            for group in GROUPS:
                _stitch_group(f, group, job.rows[group], srcs, p.dim)
        _finish(f, p, runner, t0, job.decoder)
        store.publish(f, out)
    except BaseException:
        store.abandon(f)
        raise
    for q in parts:
        store.partial_path(q).unlink(missing_ok=True)


def _stitch_group(f: h5py.File, group: str, rows: np.ndarray, srcs: list, dim: int) -> None:
    """One group of features.h5 from the ranks' parts, STITCH_ROWS rows at a time: memory stays
    bounded whatever the shard size. Each part must be whole and hold its rank's slice of rows."""
    for key in ("index", "skipped"):
        if f"{group}/{key}" in f:
            del f[f"{group}/{key}"]
    f.create_dataset(f"{group}/index", data=rows)
    sk = np.concatenate([s[f"{group}/skipped"][:] for s in srcs])  # ids of bad images only: small
    f.create_dataset(f"{group}/skipped", data=sk, maxshape=(None,), chunks=(1024,))
    dst = store.create_rows(f, f"{group}/features", len(rows), dim)
    store.set_rows_done(dst, 0)
    for s, want in zip(srcs, np.array_split(rows, len(srcs))):
        src, index = s[f"{group}/features"], s[f"{group}/index"]
        if store.rows_done(src) != len(want) or index.shape != want.shape:
            raise CooptError(f"{s.filename}: holds {store.rows_done(src)} of its {len(want)} rows of {group}; "
                             f"rerun the extraction to finish it")
        for b in range(0, len(want), STITCH_ROWS):
            if not np.array_equal(index[b : b + STITCH_ROWS], want[b : b + STITCH_ROWS]):
                raise CooptError(f"{s.filename}: its {group} rows are not its rank's slice of the plan (the plan "
                                 f"changed since it was written?); remove it and rerun the extraction")
            store.append_rows(dst, src[b : b + STITCH_ROWS])


def _summary(path: Path, f, resumed: bool, skipped: bool, archived: str | None = None) -> dict:
    return {
        "participant": str(f.attrs["participant"]), "path": str(path), "prior": str(f.attrs["prior"]),
        "round": int(f.attrs.get("round", 0)),
        "rows": int(f["shard/features"].shape[0]), "shared_rows": int(f["shared/features"].shape[0]),
        "skipped_images": int(f["shard/skipped"].shape[0] + f["shared/skipped"].shape[0]),
        "feature_dim": int(f.attrs["feature_dim"]), "uniformity": float(f.attrs["uniformity"]),
        "decoder": str(f.attrs["decoder_used"]), "seconds": float(f.attrs["seconds"]),
        "compile_seconds": float(f.attrs["compile_seconds"]), "model_seconds": float(f.attrs["model_seconds"]),
        "resumed": resumed, "skipped": skipped, "archived": archived,  # where the previous round went
    }
