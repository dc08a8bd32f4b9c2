"""The training toolkit shared by student.train, ssl.pretrain and evaluate.probe.

  device      resolve_device ('auto', cuda checks, CPU denormals), autocast, maybe_compile
  torchrun    check_world (the global batch splits over the ranks), wrap_ddp
  options     check_budget (sizes, budgets, seed, lr, wd), default input size and normalisation
  optimiser   param_groups (no decay on norms and biases), lr_factor (warmup + cosine)
  output      check_out / clear_out (--resume, --force), save_state / load_state / resume
              (OUT's resume state, written to a tmp file and renamed), write_log, plot_curve
  fit         the epoch/step loop: budgets, progress, snapshots and resume bookkeeping

Every random draw comes from a torch.Generator that the state saves, so on the CPU a resumed run
is bitwise equal to an uninterrupted one.

Under torchrun (distributed.py) the same loop runs on every rank: the batch size is the global
batch, each rank steps on its share, DDP averages the gradients, and only rank 0 writes. What
fit must keep equal across ranks it does here: the logged loss is the mean over ranks (so a
non-finite loss stops every rank), and time-based decisions use rank 0's clock.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from . import distributed
from .distributed import World
from .errors import CooptError, disk_guard
from .priors import (CONVNET_MEAN, CONVNET_STD, DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, MAX_INPUT_SIZE,
                     MIN_INPUT_SIZE, SMALL_ARCHS)
from .progress import bar

WARMUP_FRACTION = 0.05  # of all planned steps; short runs need a short warmup
MAX_SEED = 2**32 - 1    # epoch_permutation seeds with seed * 1_000_003 + epoch: stays inside torch's 64-bit range


# ---- device --------------------------------------------------------------------------------

def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if present; refuses cuda without a GPU. CPU: flush denormals (BN/Adam
    produce them late in training, and x86 runs them ~100x slower)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CooptError(f"--device {device!r}: unknown device (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CooptError(f"--device {device!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise CooptError(f"--device {device!r}: unsupported device (use cpu, cuda, cuda:N or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CooptError(f"--device {device!r}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0.."
                         f"cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "cpu":
        torch.set_flush_denormal(True)
    return dev


def autocast(dev: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()


def maybe_compile(module: nn.Module, dev: torch.device, compile: bool | None):
    """compile None (the default): torch.compile on CUDA only, since on the CPU Inductor's compile
    time (~1 min for a ResNet-18) exceeds what it saves; True: compile anywhere; False: never."""
    return torch.compile(module) if (dev.type == "cuda" if compile is None else compile) else module


# ---- torchrun -------------------------------------------------------------------------------

def check_world(batch: int, w: World, what: str = "--batch-size") -> None:
    """The global batch must split evenly over the ranks: with equal shares, DDP's average of the
    ranks' mean gradients is the mean gradient over the global batch."""
    if batch % w.size:
        raise CooptError(f"{what} {batch}: the global batch must split evenly over the {w.size} ranks "
                         f"(WORLD_SIZE); use a multiple of {w.size}")


def wrap_ddp(model: nn.Module, dev: torch.device, w: World) -> nn.Module:
    """DistributedDataParallel under torchrun (the model itself in one process). Parameters that
    need no gradient (BYOL's EMA target) are left out of the all-reduce; buffers (BatchNorm's
    running statistics) are rank 0's at each forward. BatchNorm normalises each rank's share on
    its own (no SyncBatchNorm): see README "Multi-GPU and multi-node"."""
    if not w.multi:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


# ---- options -------------------------------------------------------------------------------

def default_input_size(arch: str, image_shape) -> int:
    """convnet, linear: the images' side rounded up to a multiple of 32 (28 -> 32); others: priors default."""
    if arch in SMALL_ARCHS and image_shape:
        return max(32, -(-max(image_shape[:2]) // 32) * 32)
    return DEFAULT_INPUT_SIZE.get(arch, 224)


def default_norm(arch: str) -> tuple[tuple, tuple]:
    return (CONVNET_MEAN, CONVNET_STD) if arch in SMALL_ARCHS else (IMAGENET_MEAN, IMAGENET_STD)


def check_budget(cfg) -> None:
    """Options shared by train and pretrain: sizes and budgets, when set, positive and finite;
    the seed and the input size within what the generators and memory take."""
    for flag, v in (("--input-size", cfg.input_size), ("--max-steps", cfg.max_steps), ("--max-seconds", cfg.max_seconds)):
        if v is not None and (v <= 0 or not math.isfinite(v)):
            raise CooptError(f"{flag} must be > 0, got {v}")
    if cfg.input_size is not None and not MIN_INPUT_SIZE <= cfg.input_size <= MAX_INPUT_SIZE:
        raise CooptError(f"--input-size must be in [{MIN_INPUT_SIZE}, {MAX_INPUT_SIZE}] px, got {cfg.input_size}")
    if not 0 <= cfg.snapshots <= 1000:
        raise CooptError(f"--snapshots must be in [0, 1000], got {cfg.snapshots}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise CooptError(f"--seed must be in [0, {MAX_SEED}], got {cfg.seed}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise CooptError(f"--lr must be a finite number > 0, got {cfg.lr}")
    if cfg.wd is not None and not (math.isfinite(cfg.wd) and cfg.wd >= 0):
        raise CooptError(f"--wd must be a finite number >= 0, got {cfg.wd}")


# ---- optimiser -----------------------------------------------------------------------------

def param_groups(modules: Iterable[nn.Module], wd: float) -> list[dict]:
    """Weight decay on weight matrices/kernels only: decaying BN scales and biases only hurts."""
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(progress: float, warmup: float = WARMUP_FRACTION) -> float:
    """Linear warmup over the first `warmup` of training, then cosine decay to 0."""
    if progress < warmup:
        return (progress + 1e-9) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


# ---- output: OUT's files and the resume state ------------------------------------------------

def check_out(marks: list[Path], resume: bool, force: bool) -> None:
    """An output that already holds a started or finished run (any of `marks`: the checkpoint, the
    resume state) is only continued (--resume) or started over (--force), never overwritten by
    accident."""
    if resume and force:
        raise CooptError("--resume and --force: choose one (continue the run in the output, or start it over)")
    found = next((p for p in marks if p.exists()), None)
    if found is not None and not (resume or force):
        raise CooptError(f"{found}: holds a started or finished run; use --resume to continue it or --force to start over")


def clear_out(paths: Iterable[Path]) -> None:
    """--force: remove the old run's files before training, so that a crash before the first save
    cannot leave its state for --resume to continue, nor its snapshots beside the new ones."""
    for p in paths:
        p.unlink(missing_ok=True)


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with disk_guard(path):
            torch.save(state, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)  # atomic: a crash leaves the previous epoch's state


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CooptError(f"{path}: unreadable training state ({str(e).strip().splitlines()[0][:200]})") from None


def check_resume(path: Path, saved: dict, current: dict) -> None:
    """Resume must continue the same run: refuse changed settings, naming them."""
    diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diff:
        raise CooptError(f"{path}: cannot resume, settings differ ({'; '.join(diff)}); drop --resume to start over")


def resume(state_path: Path, identity: dict, model: nn.Module, opt, gen: torch.Generator) -> dict | None:
    """Restore model, optimizer and augmentation RNG from state_path; the saved loop, or None."""
    if not state_path.exists():
        return None
    st = load_state(state_path)
    check_resume(state_path, st["identity"], identity)
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    gen.set_state(st["aug_rng"])
    return st["loop"]


def check_same_start(state_path: Path, loop: dict | None) -> None:
    """Under torchrun every rank must have resumed from the same state (a rank that starts over
    while the others continue would train a different model, or wait forever): ranks on other
    nodes read OUT too, so it must be the same folder there (a shared file system)."""
    steps = distributed.every_rank(-1 if loop is None else loop["step"])
    if len(set(steps)) > 1:
        seen = ", ".join(f"rank {r}: {'no state' if s < 0 else f'step {int(s)}'}" for r, s in enumerate(steps))
        raise CooptError(f"{state_path}: the ranks do not see the same resume state ({seen}); every rank must "
                         "read the same output folder (on several nodes: a shared file system)")


def rng_state(g: torch.Generator) -> torch.Tensor:
    return g.get_state().cpu()


def write_log(path: Path, log: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in log))
    os.replace(tmp, path)


def plot_curve(path: Path, trace: list, log: list[dict], steps_per_epoch: int, title: str,
               loss_label: str = "loss", peak_lr: float | None = None) -> None:
    """Loss vs epoch, and the learning rate on a second axis (peak_lr x each epoch's recorded
    schedule factor). Agg canvas, no pyplot: no global backend state, safe in threads and tests."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if trace:
        ax.plot([s / steps_per_epoch for s, _ in trace], [v for _, v in trace], lw=1, alpha=0.6, label="loss (steps)")
    if log:
        ax.plot([r["epoch"] for r in log], [r["loss"] for r in log], "o-", label="loss (epoch mean)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(loss_label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if peak_lr is not None and any("lr_factor" in r for r in log):
        lr_ax = ax.twinx()
        pts = [(r["epoch"], peak_lr * r["lr_factor"]) for r in log if "lr_factor" in r]
        lr_ax.plot([0] + [e for e, _ in pts], [0.0] + [v for _, v in pts], "s--", color="tab:red", ms=3,
                   lw=1, label="learning rate (end of epoch)")
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_ylim(bottom=0)
        h2, l2 = lr_ax.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="upper right")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


# ---- fit: the epoch/step loop --------------------------------------------------------------

@dataclass(frozen=True)
class FitOptions:
    what: str                          # names the run in the progress bar and in errors
    epochs: int
    steps_per_epoch: int
    batch_size: int                    # samples per step (counts samples; batches come from `batches`)
    max_seconds: float | None = None   # wall-clock budget of this call; the schedule anneals within it
    max_steps: int | None = None       # optimizer steps in all, over resumed calls too
    progress: bool = True
    sync_every: int = 10               # steps between host syncs (loss .item())
    snapshots: int = 0                 # N backbone copies at evenly spaced points of the schedule
    world_size: int = 1                # torchrun ranks sharing each batch: recorded in every log row

    @property
    def total_steps(self) -> int:
        return max(1, self.epochs * self.steps_per_epoch)


@dataclass
class _Clock:
    """This call's training time: snapshot saving is moved off it (and so off max_seconds)."""
    elapsed0: float  # training seconds of earlier (resumed) calls
    start: float = field(default_factory=time.perf_counter)
    agreed: tuple | None = None  # torchrun: (step, rank 0's seconds at that step)

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def decided(self, step: int) -> float:
        """seconds() for the budget and the time-based schedule. Under torchrun rank 0's, read
        once per step and broadcast: ranks must stop at the same step (else the others wait in
        the next all-reduce) and anneal the learning rate alike (else their weights part)."""
        if not distributed.active():
            return self.seconds()
        if self.agreed is None or self.agreed[0] != step:
            self.agreed = (step, distributed.from_rank0(self.seconds()))
        return self.agreed[1]


def _new_part() -> dict:
    return {"loss": 0.0, "steps": 0, "seconds": 0.0, "samples": 0}


def fit(opts: FitOptions, batches: Callable[[int, int], Iterable], step: Callable[[object, float], torch.Tensor],
        save: Callable[[dict], None], loop: dict | None = None,
        snapshot: Callable[[int, dict], str] | None = None) -> dict:
    """The epoch/step loop shared by train and pretrain.

    batches(epoch, start_batch) yields the epoch's batches from start_batch on; step(batch, p)
    runs one optimizer step at schedule position p in [0, 1] and returns the detached loss;
    save(loop) persists model + loop state (at each epoch end, and when a budget stops the run).
    With max_seconds, p = max(step fraction, time fraction) so the schedule anneals within the
    budget. With snapshots = N, snapshot(k, loop) saves a copy of the backbone when p first
    reaches k/N (k < N) and once more when the run ends (k = N): accuracy-vs-time curves from
    one run. Snapshot saving is kept off the clock (it is measurement, not training).
    Returns the loop dict: epoch, batch, step, log, trace, snapshots, elapsed (training seconds
    over all calls), stopped, run_seconds, run_samples.
    """
    loop = dict(loop or {"epoch": 0, "batch": 0, "step": 0, "log": [], "trace": [], "part": _new_part()})
    loop.setdefault("snapshots", [])
    clock, step0 = _Clock(loop.get("elapsed", 0.0)), loop["step"]
    take_snapshot = functools.partial(_take_snapshot, opts, loop, clock, snapshot)  # k -> None
    stopped = "max_steps" if opts.max_steps is not None and loop["step"] >= opts.max_steps else "epochs"
    remaining = max(0, opts.total_steps - loop["step"]) * opts.batch_size
    with bar(opts.what, remaining, enabled=opts.progress) as advance:
        while loop["epoch"] < opts.epochs and stopped == "epochs":
            t_epoch = time.perf_counter()
            stopped = _run_epoch(opts, loop, clock, batches(loop["epoch"], loop["batch"]), step, advance, take_snapshot)
            loop["part"]["seconds"] += time.perf_counter() - t_epoch
            if loop["batch"] >= opts.steps_per_epoch:
                _end_epoch(opts, loop)
            # The run's end is snapshot N: all epochs done, or the time budget (the schedule annealed
            # within it). A max_steps stop is a cut that --resume continues, so it is not an end.
            last = loop["epoch"] >= opts.epochs or stopped == "max_seconds"
            if last and opts.snapshots and len(loop["snapshots"]) < opts.snapshots:
                take_snapshot(opts.snapshots)
            loop["elapsed"] = clock.elapsed0 + clock.seconds()
            save(loop)
    if opts.snapshots and len(loop["snapshots"]) < opts.snapshots and loop["epoch"] >= opts.epochs:
        take_snapshot(opts.snapshots)  # resumed a finished run that was trained without snapshots
    loop["stopped"] = stopped
    loop["run_seconds"] = clock.seconds()
    loop["elapsed"] = clock.elapsed0 + loop["run_seconds"]
    loop["run_samples"] = (loop["step"] - step0) * opts.batch_size
    return loop


def _run_epoch(opts: FitOptions, loop: dict, clock: _Clock, batches: Iterable, step, advance, take_snapshot) -> str:
    """Steps through the epoch's batches from loop["batch"] on; returns why it stopped: "epochs"
    (the epoch ran out), "max_steps" or "max_seconds"."""
    acc, window, stopped = None, 0, "epochs"
    for batch in batches:
        loss = step(batch, min(1.0, _schedule(opts, loop, clock)))
        acc = loss if acc is None else acc + loss
        window += 1
        loop["step"] += 1
        loop["batch"] += 1
        loop["part"]["samples"] += opts.batch_size
        if window == opts.sync_every or loop["batch"] == opts.steps_per_epoch:
            _sync(opts, loop, acc, window, advance)
            acc, window = None, 0
        k = len(loop["snapshots"]) + 1
        if opts.snapshots and k < opts.snapshots and _schedule(opts, loop, clock) >= k / opts.snapshots:
            take_snapshot(k)
        if opts.max_steps is not None and loop["step"] >= opts.max_steps:
            stopped = "max_steps"
        elif opts.max_seconds and clock.decided(loop["step"]) >= opts.max_seconds:
            stopped = "max_seconds"
        if stopped != "epochs":
            break
    if acc is not None:  # the steps since the last sync
        _record(loop, distributed.mean(acc).item(), window)
    return stopped


def _schedule(opts: FitOptions, loop: dict, clock: _Clock) -> float:
    """Training progress: the step fraction, or the time fraction of max_seconds when that is ahead."""
    p = loop["step"] / opts.total_steps
    if opts.max_seconds:
        p = max(p, clock.decided(loop["step"]) / opts.max_seconds)
    return p


def _sync(opts: FitOptions, loop: dict, acc: torch.Tensor, window: int, advance) -> None:
    v = distributed.mean(acc).item()  # the only host sync: every sync_every steps
    if not math.isfinite(v):
        raise CooptError(f"{opts.what}: loss became {v} at step {loop['step']} (non-finite inputs or "
                         "targets, or a learning rate too high); nothing more was saved")
    _record(loop, v, window)
    advance(window * opts.batch_size, info=f"epoch {loop['epoch'] + 1}/{opts.epochs} loss {v / window:.4f}")


def _record(loop: dict, v: float, window: int) -> None:
    """Adds `window` steps whose losses sum to v to the epoch's mean and to the loss trace."""
    part = loop["part"]
    part["loss"] += v
    part["steps"] += window
    loop["trace"].append([loop["step"], v / window])


def _end_epoch(opts: FitOptions, loop: dict) -> None:
    """A complete epoch: its line in the log, and the position moves to the next epoch's start."""
    e, part = loop["epoch"], loop["part"]
    loop["log"].append({
        "epoch": e + 1, "loss": part["loss"] / max(1, part["steps"]), "seconds": part["seconds"],
        "samples_per_s": part["samples"] / max(1e-9, part["seconds"]), "steps": loop["step"],
        "lr_factor": lr_factor(min(1.0, loop["step"] / opts.total_steps)), "world_size": opts.world_size,
    })
    loop.update(epoch=e + 1, batch=0, part=_new_part())


def _take_snapshot(opts: FitOptions, loop: dict, clock: _Clock, snapshot, k: int) -> None:
    t = time.perf_counter()
    seconds = clock.elapsed0 + t - clock.start
    path = snapshot(k, loop)
    loop["snapshots"].append({"k": k, "of": opts.snapshots, "step": loop["step"], "seconds": seconds,
                              "samples": loop["step"] * opts.batch_size, "path": str(path)})
    clock.start += time.perf_counter() - t  # off the clock, and off the max_seconds budget


def last_loss(loop: dict) -> float:
    """The last epoch's mean loss; before the first complete epoch, the last logged window's."""
    return loop["log"][-1]["loss"] if loop["log"] else (loop["trace"][-1][1] if loop["trace"] else float("nan"))
