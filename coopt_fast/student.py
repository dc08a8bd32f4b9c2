"""train: a student backbone + linear head regresses the merged targets (cosine loss).

    loss = 1 - cos(head(backbone(aug(x))), (y - mean) / std)      mean/std: the store's, per dim

Data comes from `StoreLoader` (memory-mapped merged store); the augmentation (random-resized
crop + flip, `augment.crop_flip`) runs batched on the training device and leaves the target
as it is. AdamW, linear warmup then cosine decay, no weight decay on norms and biases.

Device paths: CUDA runs bf16 autocast, channels_last and torch.compile on the model's forward
(`compile=False` to skip it); the CPU runs eager fp32, channels_last (oneDNN's faster conv
layout) with denormals flushed.

Checkpoints, every epoch (and when a step or time budget ends a run mid-epoch):
  OUT/student.pt    the backbone alone (save_checkpoint; arch, input_size, mean, std, provenance):
                    what `probe` and `extract --prior ARCH:OUT/student.pt` load
  OUT/state.pt      everything resume needs: model + head, optimizer, augmentation generator
                    state, epoch/batch position, log. Plain tensors and containers only
                    (torch.load(weights_only=True)), written to a tmp file and renamed.
  OUT/train.jsonl   one line per epoch: loss, seconds, samples/s, lr
  OUT/curve.png     the loss curve
Every random draw comes from a torch.Generator (model init: build_backbone's seed; order:
loader.epoch_permutation(seed, epoch); augmentation: a saved generator), so on the CPU a
resumed run is bitwise equal to an uninterrupted one.

Under torchrun (`torchrun --nproc_per_node=G -m coopt_fast train ...`): DDP, batch_size is the
global batch and each rank trains on its share of it (loader, augment.Part); every rank loads
the same state on --resume, only rank 0 writes OUT. The world size is recorded in each
train.jsonl row, the checkpoints and state.pt, and is not part of what --resume checks: any
world size that divides the batch continues a run (the order and the augmentation draws are
the same whatever it is).

The device handling, the `fit` loop (budgets, progress, resume bookkeeping) and the state I/O
are training.py's, shared with ssl.pretrain; train adds the student and its outputs.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import augment
from .configs import TrainConfig, options_of  # noqa: F401 (defined apart: the CLI reads its defaults without torch)
from .distributed import World, barrier, process_group, rank_device, world
from .errors import CooptError
from .loader import StoreLoader, resolve_store
from .priors import build_backbone, save_checkpoint
from .store import VERSION
from .training import (FitOptions, autocast, check_budget, check_out, check_same_start, check_world, clear_out,
                       default_input_size, default_norm, fit, last_loss, lr_factor, maybe_compile, param_groups,
                       plot_curve, resolve_device, resume, rng_state, save_state, wrap_ddp, write_log)
# The toolkit's other names, still importable from here (cli, extract, demo, bench and tests import from student).
from .training import MAX_SEED, WARMUP_FRACTION, check_resume, load_state  # noqa: F401


class Student(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int, target_dim: int, seed: int):
        super().__init__()
        self.backbone = backbone
        with torch.random.fork_rng(devices=[]):  # head init from the seed, not the global RNG
            torch.manual_seed(seed + 1)
            self.head = nn.Linear(dim, target_dim)

    def forward(self, x):
        return self.head(self.backbone(x))


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over the batch of 1 - cos(pred_i, target_i); in fp32 whatever the autocast dtype."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=1, eps=1e-8)).mean()


@options_of(TrainConfig, ("run", "student", "epochs", "out"))
def train(run, student: str = "convnet", epochs: int = 10, out="student", **options) -> dict:
    """Train a student to regress the merged targets (what `coopt-fast train` runs).

    Cosine loss on z-scored targets, AdamW with warmup then cosine decay. Under torchrun: DDP,
    `batch_size` is the global batch, rank 0 writes OUT.

    Args:
        run: the run folder holding merged.h5, or the path of a merged .h5.
        student: "convnet", "linear" (trivial, for measuring) or a torchvision classifier (resnet18, ...).
        epochs: passes over the merged store.
        out: output folder: student.pt (the backbone), state.pt (for resume), train.jsonl, curve.png.
        batch_size: the global batch (default 128); under torchrun every rank takes batch_size / W.
        lr: AdamW peak learning rate (1e-3).
        wd: AdamW weight decay (0.01; not on norms and biases).
        seed: seeds the student's initialisation, the data order and the augmentations (0).
        resume: continue from OUT/state.pt.
        force: start over in an OUT that holds a run.
        device: "auto" (cuda if present), "cpu", "cuda" or "cuda:N".
        compile: torch.compile the model; None (default): on CUDA only.
        store_on_device: keep the merged store in device memory; None (default): when it fits in
            half the free GPU memory (never on the CPU, where the page cache already holds it).
        max_seconds: wall-clock budget; stop after the step that exceeds it.
        max_steps: stop after this many optimizer steps.
        input_size: image side (None: convnet the image side rounded up to 32, others 224).
        crop_scale: random-resized-crop scale range ((0.25, 1.0): the target describes the whole image).
        snapshots: also save N copies of the backbone at evenly spaced points.
        progress: progress bars (or plain lines without a terminal) on stderr.

    Returns:
        checkpoint, rows, target_dim, input_size, device, compiled, epochs, steps, stopped,
        store_on_device, resumed, trained_now, loss, seconds, train_seconds, samples_per_s,
        world_size.

    Raises:
        CooptError: a bad option, a missing or broken merged store, an OUT that holds another run
            (without resume or force), a world size that does not divide the batch.
        TypeError: an unknown option name.
    """
    cfg = TrainConfig(run=str(run), student=student, epochs=epochs, out=str(out), **options)
    w = world()
    _check(cfg, w)
    dev = rank_device(resolve_device(cfg.device), w)
    with process_group(dev, w):
        # The job ends inside the group: its DDP wrapper holds the group, and freed after the
        # teardown it would destroy gloo's group with the peers gone (seen once: SIGABRT at exit).
        return _run(cfg, dev, w)


def _run(cfg: TrainConfig, dev: torch.device, w: World) -> dict:
    job = _build(cfg, dev, w)
    loop = _start(job)
    job.model.train()
    opts = FitOptions(what="train", epochs=cfg.epochs, steps_per_epoch=len(job.loader), batch_size=job.batch,
                      max_seconds=cfg.max_seconds, max_steps=cfg.max_steps, progress=cfg.progress and w.main,
                      snapshots=cfg.snapshots, world_size=w.size)
    resumed = loop is not None
    loop = fit(opts, functools.partial(_batches, job.loader), functools.partial(_step, job),
               functools.partial(_save, job), loop, functools.partial(_snapshot, job))
    if w.main and not job.ckpt_path.exists():  # resumed a finished run: fit saved nothing
        _save(job, loop)
    if w.main:
        plot_curve(job.out_dir / "curve.png", loop["trace"], loop["log"], len(job.loader),
                   f"coopt student {cfg.student} on {job.store.name}",
                   loss_label="cosine loss 1 - cos(head(backbone(aug(x))), z-scored y)", peak_lr=cfg.lr)
    return _summary(job, loop, resumed)


def _check(cfg: TrainConfig, w: World) -> None:
    """Bad options, and an OUT that holds a run without --resume or --force, are refused before any
    work (under torchrun by every rank alike: they read the same files and options)."""
    check_budget(cfg)
    if cfg.epochs < 1:
        raise CooptError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise CooptError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    check_world(cfg.batch_size, w)
    out_dir = Path(cfg.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CooptError(f"{out_dir}: --out must be a folder, this is a file")
    check_out([out_dir / "state.pt", out_dir / "student.pt"], cfg.resume, cfg.force)


@dataclass(frozen=True)
class _Job:
    """One train call, resolved once: the data, the model and its optimiser, what the outputs record."""
    cfg: TrainConfig
    dev: torch.device
    world: World
    store: Path
    loader: StoreLoader
    part: augment.Part | None   # torchrun: this rank's share of each global batch
    size: int                   # input side, px
    norm: tuple                 # the images' (mean, std)
    targets: tuple              # the targets' (mean, std) on the device
    model: Student
    forward: nn.Module          # the model: DDP-wrapped under torchrun, compiled on CUDA
    opt: torch.optim.Optimizer
    gen: torch.Generator        # the augmentation's draws; state.pt saves it
    identity: dict              # the settings --resume must find unchanged
    meta: dict                  # recorded in every checkpoint

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def batch(self) -> int:
        """Rows per (global) step: the batch size, or every row when the store has fewer."""
        return min(self.cfg.batch_size, self.loader.n)

    @property
    def state_path(self) -> Path:
        return self.out_dir / "state.pt"

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "student.pt"


def _build(cfg: TrainConfig, dev: torch.device, w: World) -> _Job:
    store = resolve_store(cfg.run)
    loader, size = _open_loader(cfg, store, dev, w)
    mean, std = default_norm(cfg.student)
    t_mean = (loader.target_mean if loader.target_mean is not None else torch.zeros(loader.dim)).to(dev)
    t_std = (loader.target_std if loader.target_std is not None else torch.ones(loader.dim)).to(dev)
    t_std = torch.where(t_std > 0, t_std, torch.ones_like(t_std))  # a constant dimension stays 0

    backbone, dim, _ = build_backbone(cfg.student, size, cfg.seed)
    model = Student(backbone, dim, loader.dim, cfg.seed).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups([model], cfg.wd), lr=cfg.lr)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    forward = maybe_compile(wrap_ddp(model, dev, w), dev, cfg.compile)

    identity = {"student": cfg.student, "batch_size": cfg.batch_size, "seed": cfg.seed, "input_size": size,
                "lr": cfg.lr, "wd": cfg.wd, "rows": loader.n, "target_dim": loader.dim}
    meta = {"arch": cfg.student, "input_size": size, "mean": list(mean), "std": list(std),
            "method": "coopt-student", "data": loader.attrs.get("dataset", ""), "store": str(store),
            "participants": loader.participants, "target_dim": loader.dim, "seed": cfg.seed,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "wd": cfg.wd, "coopt_version": VERSION,
            "world_size": w.size}
    bs = min(cfg.batch_size, loader.n)
    part = augment.Part(bs, w.share(bs)) if w.multi else None
    return _Job(cfg, dev, w, store, loader, part, size, (mean, std), (t_mean, t_std), model, forward, opt, gen,
                identity, meta)


def _open_loader(cfg: TrainConfig, store: Path, dev: torch.device, w: World) -> tuple[StoreLoader, int]:
    """The merged store's loader (this rank's shares of the global batches), and the input side
    its images are resized to."""
    loader = StoreLoader(store, cfg.batch_size, fields=("images", "targets"), seed=cfg.seed, device=dev,
                         resident=cfg.store_on_device, world=w)
    size = cfg.input_size or default_input_size(cfg.student, loader.image_shape)
    loader.image_size = size  # folder images of mixed size are resized to it
    loader.drop_last = loader.n >= cfg.batch_size  # static shapes (no recompiles), no 1-sample BN batch
    if len(loader) == 0:
        raise CooptError(f"{store}: no rows to train on")
    if loader.n < cfg.batch_size:  # the one batch is every row
        check_world(loader.n, w, f"{store}: fewer rows than --batch-size, so the batch is all")
    return loader, size


def _start(job: _Job) -> dict | None:
    """Rank 0 prepares OUT (--force: the old run's files go first); then every rank loads the same
    resume state, so weights, optimiser and augmentation generator agree. The saved loop, or None."""
    cfg = job.cfg
    if job.world.main:
        if cfg.force:
            clear_out([job.state_path, job.ckpt_path, job.out_dir / "train.jsonl", job.out_dir / "curve.png",
                       *(job.out_dir / "snapshots").glob("student-*.pt")])
        job.out_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    loop = resume(job.state_path, job.identity, job.model, job.opt, job.gen) if cfg.resume else None
    check_same_start(job.state_path, loop)
    return loop


def _batches(loader: StoreLoader, epoch: int, start: int) -> StoreLoader:
    loader.set_epoch(epoch, start)
    return loader


def _step(job: _Job, batch: dict, p: float) -> torch.Tensor:
    """One optimizer step at schedule position p; the detached loss."""
    (mean, std), (t_mean, t_std) = job.norm, job.targets
    for gr in job.opt.param_groups:
        gr["lr"] = job.cfg.lr * lr_factor(p)
    x = augment.crop_flip(batch["images"], job.size, job.gen, mean, std, job.cfg.crop_scale, part=job.part)
    x = x.contiguous(memory_format=torch.channels_last)
    y = (batch["targets"].float() - t_mean) / t_std
    with autocast(job.dev):
        pred = job.forward(x)
    loss = cosine_loss(pred, y)
    job.opt.zero_grad(set_to_none=True)
    loss.backward()
    job.opt.step()
    return loss.detach()


def _save(job: _Job, loop: dict) -> None:
    # Rank 0 only: the ranks' weights, optimiser and generator states are equal (same averaged
    # gradients, same draws). No collective in here: fit calls it on every rank.
    if not job.world.main:
        return
    # state.pt last: it is the commit point. Interrupted before it, --resume redoes the epoch
    # from the previous state and rewrites the checkpoint and log; after it, all three agree.
    save_checkpoint(job.ckpt_path, job.model.backbone, {**job.meta, "epochs": loop["epoch"], "steps": loop["step"]})
    write_log(job.out_dir / "train.jsonl", loop["log"])
    save_state(job.state_path, {"identity": job.identity, "model": job.model.state_dict(),
                                "optimizer": job.opt.state_dict(), "aug_rng": rng_state(job.gen), "loop": loop,
                                "world_size": job.world.size})


def _snapshot(job: _Job, k: int, loop: dict) -> Path:
    path = job.out_dir / "snapshots" / f"student-{k}.pt"
    if job.world.main:  # the other ranks only record its path
        save_checkpoint(path, job.model.backbone,
                        {**job.meta, "snapshot": k, "epochs": loop["epoch"], "steps": loop["step"]})
    return path


def _summary(job: _Job, loop: dict, resumed: bool) -> dict:
    cfg, loader, out_dir = job.cfg, job.loader, job.out_dir
    log = loop["log"]
    if loop["run_samples"]:  # this call trained: its own rate
        rate = loop["run_samples"] / max(1e-9, loop["run_seconds"])
    else:  # resumed a finished run: the whole run's rate, from its epochs
        rate = sum(r["samples_per_s"] * r["seconds"] for r in log) / max(1e-9, sum(r["seconds"] for r in log)) if log else 0.0
    return {
        "checkpoint": str(job.ckpt_path), "state": str(job.state_path), "log": str(out_dir / "train.jsonl"),
        "curve": str(out_dir / "curve.png"), "student": cfg.student, "input_size": job.size, "device": str(job.dev),
        "compiled": hasattr(job.forward, "_orig_mod"),  # torch.compile's wrapper
        "store_on_device": loader.resident, "rows": loader.n, "world_size": job.world.size,
        "data_parallel": job.world.multi,  # DDP over a process group (also a forced world of one)
        "target_dim": loader.dim, "epochs": loop["epoch"], "steps": loop["step"], "stopped": loop["stopped"],
        "resumed": resumed, "trained_now": bool(loop["run_samples"]), "seconds": loop["run_seconds"],
        "train_seconds": loop["elapsed"], "samples_per_s": rate,
        "loss": last_loss(loop), "snapshots": loop["snapshots"],
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("run", "out", "progress")},
    }
