"""One process or a torchrun world: who am I, which device, the process groups, failing together.

Every multi-rank step (extract, train, pretrain, score/align at large n) goes through `world()`
and `process_group()`, so the rules live in one place:
  - the world comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it,
    rank 0 of 1 and nothing is initialised;
  - on CUDA each rank pins cuda:LOCAL_RANK *before* NCCL starts (else every rank's NCCL
    communicator lands on cuda:0);
  - the model's collectives run on NCCL (CUDA) or gloo (CPU), while coordination (barriers,
    small decisions) always runs on a gloo group: a rank that died is seen by gloo peers as a
    closed connection within seconds, where NCCL would wait out its timeout;
  - a rank that raises leaves the group without a barrier and exits non-zero; torchrun's agent
    then stops the other ranks of its node, and any peer blocked in a gloo barrier fails at once;
  - across nodes (each node's agent stops only its own ranks) a rank that raises also posts why
    in the rendezvous store, and every rank's watchdog thread polls that key: a rank on another
    node stops within seconds (WATCH_SECONDS), saying which rank failed and why, instead of
    working on until its next barrier.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
import threading
from dataclasses import dataclass

from .errors import CooptError

# torch is imported inside the functions: `coopt-fast --help` and `status` import this module
# (a command asks world() whether it is rank 0) and must not pay torch's ~2 s.

# Coordination waits (rank 0 stitching, archiving) are bounded by this; a dead peer is seen much
# sooner, as a closed connection.
COORD_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    forced: bool = False  # a world of one that still brings up the process group (see world())

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return self.size > 1 or self.forced

    def share(self, n: int) -> slice:
        """This rank's contiguous share of the n rows of a global batch. The shares of ranks
        0..size-1 are the n rows in order, for any n: the union is the one-process batch."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)


def world() -> World:
    """This process's place in a torchrun world (rank 0 of 1 outside torchrun).

    COOPT_PROCESS_GROUP=always under torchrun makes even one rank take the multi-rank path
    (process group, DDP wrapper, collectives): the smoke test of that path on a machine with one
    GPU (bench/gpu_check.sh), where NCCL cannot put two ranks on the same device."""
    forced = os.environ.get("COOPT_PROCESS_GROUP") == "always" and "MASTER_ADDR" in os.environ
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)), forced)


def rank_device(dev: torch.device, w: World) -> torch.device:
    """Under torchrun a CUDA device means this rank's GPU, cuda:LOCAL_RANK, made current."""
    if dev.type == "cuda" and w.multi:
        import torch

        dev = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(dev)
    return dev


_coord = None  # the gloo group for coordination while a process group is up
FAILED_KEY = "coopt/failed"  # in the rendezvous store: "rank R: why", posted by a rank that raised
WATCH_SECONDS = 2.0           # how often each rank's watchdog looks for it
STORE_MISSES = 3              # polls that cannot reach the store (its host node ended) before stopping


@contextlib.contextmanager
def process_group(dev: torch.device, w: World | None = None, barrier_timeout: datetime.timedelta = COORD_TIMEOUT):
    """Bring up the default process group (NCCL on CUDA, gloo on CPU) plus a gloo group for
    coordination; yields the World. A no-op in one process. On an exception the group is torn
    down without a barrier (a barrier would wait for the peers this rank just abandoned).
    `barrier_timeout` bounds the coordination group's barriers: a step whose ranks may wait on
    each other longer than COORD_TIMEOUT (extract: a resumed rank with hours left) passes more.
    Joining stays bounded by COORD_TIMEOUT (a rank that failed before joining never arrives)."""
    global _coord
    w = w or world()
    if not w.multi:
        yield w
        return
    import torch.distributed as dist

    backend = "nccl" if dev.type == "cuda" else "gloo"
    kw = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=COORD_TIMEOUT, **kw)
    own = backend == "nccl" or barrier_timeout != COORD_TIMEOUT  # else gloo's default group coordinates
    coord = _coord = dist.new_group(backend="gloo", timeout=barrier_timeout) if own else dist.group.WORLD
    store = dist.distributed_c10d._get_default_store()  # the rendezvous store every node reaches
    stop = threading.Event()
    watch = threading.Thread(target=_watch, args=(store, stop, w.rank), daemon=True, name="coopt-peer-watch")
    watch.start()
    try:
        yield w
    except BaseException as e:
        _end_watch(stop, watch)
        with contextlib.suppress(Exception):  # best effort: the store may be gone already
            store.set(FAILED_KEY, f"rank {w.rank}: {_first_line(e)}")
        _coord = None
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        raise
    _end_watch(stop, watch)
    _coord = None
    _wait(coord)  # nobody tears down while a peer still sends
    dist.destroy_process_group()


def _end_watch(stop: threading.Event, watch: threading.Thread) -> None:
    """Stop the watchdog and wait for it: a thread left inside a store call while the group is
    destroyed and the interpreter exits can abort the process."""
    stop.set()
    watch.join(timeout=10)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _watch(store, stop: threading.Event, rank: int) -> None:
    """Until `stop`: end this process when another rank has posted a failure, or when the store
    stays unreachable. os._exit, as a kill would: every file this project writes survives kill -9
    (partials resume), and a rank blocked in a collective can be ended no other way."""
    misses = 0
    while not stop.wait(WATCH_SECONDS):
        try:
            why = store.get(FAILED_KEY).decode() if store.check([FAILED_KEY]) else None
            misses = 0
        except Exception as e:  # noqa: BLE001 - any store error counts as a miss
            misses += 1
            why = f"the rendezvous store is unreachable ({_first_line(e)})" if misses >= STORE_MISSES else None
        if why is not None and not stop.is_set():
            print(f"error: rank {rank}: stopping, another rank failed: {why}", file=sys.stderr, flush=True)
            os._exit(1)


def barrier() -> None:
    """Wait for every rank, over gloo (a dead peer fails it fast). No-op in one process."""
    if _coord is not None:
        _wait(_coord)


def _wait(group) -> None:
    """A gloo barrier. A peer that left (it failed, or torchrun stopped it) fails it as a closed
    connection: that becomes one line naming this rank, not a traceback, so the failing rank's
    own one-line error stays the one to read."""
    import torch.distributed as dist

    try:
        dist.barrier(group=group)
    except RuntimeError as e:  # gloo: "[.../pair.cc:N] Connection closed by peer ...", or a timeout
        why = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip() or type(e).__name__).splitlines()[0]).split(". ")[0]
        raise CooptError(f"rank {world().rank}: stopped waiting for the other ranks ({why[:200]}); "
                         f"another rank failed or stalled: its own error says why") from None


def coord_group():
    """The gloo group for small CPU-tensor collectives (None in one process)."""
    return _coord


def active() -> bool:
    """Whether a multi-rank process group is up (process_group entered under torchrun)."""
    return _coord is not None


def from_rank0(value: float) -> float:
    """Rank 0's `value` on every rank (over gloo); the value itself in one process. For decisions
    read from a clock (a time budget, a time-based schedule): each rank's own clock would stop
    ranks at different steps, and a rank that stopped leaves the others in the next all-reduce."""
    if _coord is None:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=0, group=_coord)
    return float(t.item())


def mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over the ranks, on t's device (NCCL or gloo); `t` itself in one process.
    Each rank gets the same value (what rank 0 logs is the global mean, and every rank's check
    of it agrees)."""
    if _coord is None:
        return t
    import torch.distributed as dist

    t = t.detach().clone()
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return t / dist.get_world_size()


def every_rank(value: float) -> list[float]:
    """Each rank's `value`, in rank order, on every rank (over gloo); [value] in one process. For
    checks that the ranks start from the same place (the same resume state)."""
    if _coord is None:
        return [value]
    import torch
    import torch.distributed as dist

    out = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64), group=_coord)
    return [float(t.item()) for t in out]
