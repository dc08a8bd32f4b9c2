"""pretrain: prior models and baselines — supervised, BYOL, SimCLR — on a data set spec.

  supervised  cross-entropy on labels; `labeled_fraction` trains on a seeded random subset
              (a participant with a small labelled set of its own)
  byol        online backbone -> projector -> predictor regresses the EMA target network's
              projection of the other view; symmetric loss sum_v (2 - 2 cos(p_v, z'_other));
              the EMA rate tau follows 1 - (1 - tau_base)(cos(pi p) + 1)/2, p = training progress
  simclr      NT-Xent over the 2B views of a batch: each view's positive is its partner, the
              other 2B - 2 views are negatives, temperature 0.2

Sizes and augmentations are solo-learn's CIFAR recipes, the standard for small images:
BYOL projector 4096 -> 256 and predictor 4096 -> 256, tau_base 0.99, solarisation 0 / 0.2 on
the two views; SimCLR projector 2048 -> 256; both views random-resized-crop (0.08-1), colour
jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, flip. The optimiser is not theirs: AdamW
with warmup + cosine (LARS at lr 1.0 is tuned for ~1000-epoch runs; the runs here are short,
often cut by a wall-clock budget, where Adam is the robust choice). Both views go through
the network as one concatenated batch (one big matmul per layer instead of two).

The losses are written here (about 20 lines) rather than taken from lightly or solo-learn:
both pull in pytorch-lightning, hydra and more for a few lines of math.

Output: OUT is the backbone checkpoint (save_checkpoint, meta: arch, input_size, mean, std,
method, epochs, data, seed, ...), usable as `extract --prior ARCH:OUT` and by `probe`.
OUT.state.pt holds what --resume needs; OUT.log.jsonl one line per epoch. The loop, device
handling, budgets and bitwise-exact resume are training.py's (fit).

Under torchrun: DDP over the online network (BYOL's EMA target needs no gradient; each rank
updates it from the same synchronised weights with the same tau, so it stays equal), each
rank takes its share of every global batch, only rank 0 writes. SimCLR gathers every rank's
projections (with their gradients) so that a view's negatives are the whole global batch, as
in one process, not just its rank's share.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import augment
from .data import Dataset, load_dataset
from .distributed import World, barrier, process_group, rank_device, world
from .configs import PretrainConfig, options_of  # noqa: F401 (defined apart: the CLI reads its defaults without torch)
from .errors import CooptError
from .loader import epoch_permutation, read_images
from .priors import MAX_INPUT_SIZE, MIN_INPUT_SIZE, build_backbone, save_checkpoint
from .store import VERSION
from .training import (FitOptions, autocast, check_budget, check_out, check_same_start, check_world, clear_out,
                       default_input_size, default_norm, fit, last_loss, lr_factor, maybe_compile, param_groups,
                       resolve_device, resume, rng_state, save_state, wrap_ddp, write_log)

METHODS = ("supervised", "byol", "simclr")


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z) averaged over the batch; z is the target network's output (no gradient)."""
    return 2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over 2B views (row i's positive: its partner)."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))  # a view is not its own negative
    target = torch.arange(2 * b, device=z.device).roll(b)  # [b..2b-1, 0..b-1], made on the device
    return F.cross_entropy(sim, target)


def nt_xent_gathered(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """nt_xent under torchrun, for this rank's share (z1, z2: [b, d]) of a global batch of B = b x
    world views per side: every rank's projections are gathered (autograd's all_gather sends each
    view's gradient back to the rank that made it), this rank's 2b views are the anchors, the
    other 2B - 1 the candidates. Averaged over ranks (DDP) it is nt_xent of the global batch."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    b, r = z1.shape[0], dist.get_rank()
    n = b * dist.get_world_size()  # ranks hold equal, contiguous shares (World.share, check_world)
    z = F.normalize(torch.cat([*all_gather(z1), *all_gather(z2)]).float(), dim=1)  # the one-process layout
    own = torch.arange(r * b, (r + 1) * b, device=z.device)
    mine = torch.cat([own, own + n])  # this rank's views among the 2n
    sim = z[mine] @ z.T / temperature
    self_mask = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, mine[:, None], True)
    sim = sim.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(sim, (mine + n) % (2 * n))


def snapshot_path(out: Path, k: int) -> Path:
    """OUT = prior.safetensors -> prior.snap3.safetensors (same format as OUT)."""
    return out.with_name(f"{out.stem}.snap{k}{out.suffix}")


class Supervised(nn.Module):
    def __init__(self, backbone, dim, num_classes):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(dim, num_classes)

    def forward(self, x, y):
        return F.cross_entropy(self.head(self.backbone(x)).float(), y)


class SimCLR(nn.Module):
    def __init__(self, backbone, dim, hidden=2048, out=256, temperature=0.2, gather=False):
        super().__init__()
        self.backbone, self.projector, self.temperature = backbone, mlp(dim, hidden, out), temperature
        self.gather = gather  # torchrun: negatives from every rank (nt_xent_gathered)

    def forward(self, v1, v2):
        z = self.projector(self.backbone(torch.cat([v1, v2])))
        return (nt_xent_gathered if self.gather else nt_xent)(*z.chunk(2), self.temperature)


class BYOL(nn.Module):
    def __init__(self, backbone, dim, hidden=4096, out=256, pred_hidden=4096):
        super().__init__()
        self.backbone, self.projector = backbone, mlp(dim, hidden, out)
        self.predictor = mlp(out, pred_hidden, out)
        self.target_backbone, self.target_projector = copy.deepcopy(backbone), copy.deepcopy(self.projector)
        for p in [*self.target_backbone.parameters(), *self.target_projector.parameters()]:
            p.requires_grad_(False)

    def forward(self, v1, v2):
        p1, p2 = self.predictor(self.projector(self.backbone(torch.cat([v1, v2])))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target_projector(self.target_backbone(torch.cat([v1, v2]))).chunk(2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online (parameters; BN buffers are copied)."""
        for online, target in ((self.backbone, self.target_backbone), (self.projector, self.target_projector)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.lerp_(po, 1 - tau)
            for bo, bt in zip(online.buffers(), target.buffers()):
                bt.copy_(bo)


@options_of(PretrainConfig, ("dataset", "method", "arch", "epochs", "out"))
def pretrain(dataset: str, method: str = "byol", arch: str = "convnet", epochs: int = 10, out="prior.pt",
             **options) -> dict:
    """Pretrain a backbone with `method` on `dataset` (what `coopt-fast pretrain` runs).

    Under torchrun: DDP, `batch_size` is the global batch, rank 0 writes OUT.

    Args:
        dataset: data set spec: "fashion-mnist", "folder:PATH", "npy:IMAGES.npy[,LABELS.npy]".
        method: "supervised" (cross-entropy on the labels), "byol" or "simclr".
        arch: "convnet" or a torchvision classifier (resnet18, ...).
        epochs: passes over the data.
        out: the backbone checkpoint to write (.pt or .safetensors); OUT.state.pt for resume,
            OUT.log.jsonl per epoch.
        batch_size: the global batch (256).
        lr: AdamW peak learning rate (1e-3).
        wd: weight decay (None: 0.01 supervised, 1e-4 byol/simclr).
        labeled_fraction: supervised only: train on this random fraction of the labels (1.0).
        seed: seeds the initialisation, the data order and the augmentations (0).
        limit: use the first N samples only (None: all).
        input_size: image side (None: convnet the image side rounded up to 32, others 224).
        max_seconds: wall-clock budget (the schedule anneals within it).
        max_steps: stop after this many optimizer steps.
        resume: continue from OUT.state.pt.
        force: start over, replacing the run OUT holds.
        device: "auto" (cuda if present), "cpu", "cuda" or "cuda:N".
        compile: torch.compile the model; None (default): on CUDA only.
        progress: progress bars (or plain lines without a terminal) on stderr.
        tau_base: BYOL's EMA rate (0.99).
        temperature: SimCLR's softmax temperature (0.2).
        proj_hidden: projector/predictor width (None: 4096 byol, 2048 simclr).
        proj_dim: projector output (256).
        snapshots: also save N copies of the backbone at evenly spaced points (OUT.snapK.<ext>).

    Returns:
        checkpoint, samples, input_size, device, epochs, steps, stopped, resumed, loss, seconds,
        samples_per_s, world_size.

    Raises:
        CooptError: a bad option or data set (supervised needs labels), an OUT that holds another
            run (without resume or force), a world size that does not divide the batch.
        TypeError: an unknown option name.
    """
    cfg = PretrainConfig(dataset=dataset, method=method, arch=arch, epochs=epochs, out=str(out), **options)
    w = world()
    _check(cfg, w)
    dev = rank_device(resolve_device(cfg.device), w)
    with process_group(dev, w):
        return _run(cfg, dev, w)  # the job (its DDP wrapper holds the group) ends inside the group


def _run(cfg: PretrainConfig, dev: torch.device, w: World) -> dict:
    job = _build(cfg, dev, w)
    loop = _start(job)
    resumed = loop is not None
    job.model.train()
    opts = FitOptions(what=f"pretrain {cfg.method}", epochs=cfg.epochs, steps_per_epoch=job.steps_per_epoch,
                      batch_size=job.bs, max_seconds=cfg.max_seconds, max_steps=cfg.max_steps,
                      progress=cfg.progress and w.main, snapshots=cfg.snapshots, world_size=w.size)
    loop = fit(opts, functools.partial(_batches, job), functools.partial(_step, job),
               functools.partial(_save, job), loop, functools.partial(_snapshot, job))
    if w.main and not job.out.exists():
        _save(job, loop)
    return _summary(job, loop, resumed)


def _start(job: _Job) -> dict | None:
    """Rank 0 prepares OUT's folder (--force: the old run's files go first); then every rank loads
    the same resume state. The saved loop, or None."""
    out = job.out
    if job.world.main:
        if job.cfg.force:
            clear_out([out, job.state_path, job.log_path, *out.parent.glob(f"{out.stem}.snap*{out.suffix}")])
        out.parent.mkdir(parents=True, exist_ok=True)
    barrier()
    loop = resume(job.state_path, job.identity, job.model, job.opt, job.gen) if job.cfg.resume else None
    check_same_start(job.state_path, loop)
    return loop


def _check(cfg: PretrainConfig, w: World) -> None:
    """Bad options, and an OUT that holds a run without --resume or --force, are refused before any work."""
    if cfg.method not in METHODS:
        raise CooptError(f"unknown method {cfg.method!r} (use {', '.join(METHODS)})")
    check_budget(cfg)
    if cfg.epochs < 1 or cfg.batch_size < 2 or cfg.lr <= 0:
        raise CooptError("epochs must be >= 1, batch size >= 2 and lr > 0")
    check_world(cfg.batch_size, w)
    if not 0 < cfg.labeled_fraction <= 1:
        raise CooptError(f"--labeled-fraction must be in (0, 1], got {cfg.labeled_fraction}")
    if cfg.labeled_fraction != 1 and cfg.method != "supervised":
        raise CooptError("--labeled-fraction applies to --method supervised only")
    out = Path(cfg.out)
    if out.suffix not in (".pt", ".pth", ".safetensors"):
        raise CooptError(f"{out}: checkpoint must end in .pt, .pth or .safetensors")
    check_out([out, Path(str(out) + ".state.pt")], cfg.resume, cfg.force)


@dataclass(frozen=True)
class _Job:
    """One pretrain call, resolved once: the data, the model and its optimiser, what the outputs record."""
    cfg: PretrainConfig
    dev: torch.device
    world: World
    ds: Dataset
    pool: torch.Tensor          # the rows trained on (supervised: the labelled fraction), sorted
    labels: torch.Tensor | None  # supervised only
    size: int                   # input side, px
    norm: tuple                 # the images' (mean, std)
    bs: int                     # (global) batch size: at most the pool
    part: augment.Part | None   # torchrun: this rank's share of each batch
    model: nn.Module
    loss_fn: nn.Module          # the model, DDP under torchrun, compiled on CUDA; returns the loss
    opt: torch.optim.Optimizer
    gen: torch.Generator        # the augmentation's draws; OUT.state.pt saves it
    views: tuple                # byol, simclr: the two views' augment.ViewConfig
    identity: dict              # the settings --resume must find unchanged
    meta: dict                  # recorded in every checkpoint

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def state_path(self) -> Path:
        return Path(str(self.out) + ".state.pt")

    @property
    def log_path(self) -> Path:
        return Path(str(self.out) + ".log.jsonl")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.pool) // self.bs  # drop_last: BatchNorm and static shapes want full batches


def _build(cfg: PretrainConfig, dev: torch.device, w: World) -> _Job:
    wd = cfg.wd if cfg.wd is not None else (0.01 if cfg.method == "supervised" else 1e-4)
    ds = load_dataset(cfg.dataset).subset(cfg.limit)
    size = cfg.input_size or default_input_size(cfg.arch, ds.shape)
    if not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE:  # the checkpoint must be one extract and probe accept
        raise CooptError(f"--input-size {size}: must be in [{MIN_INPUT_SIZE}, {MAX_INPUT_SIZE}]")
    mean, std = default_norm(cfg.arch)
    pool, labels = _pool(cfg, ds)
    bs = min(cfg.batch_size, len(pool))
    if bs < cfg.batch_size:
        check_world(bs, w, f"{cfg.dataset}: fewer samples than --batch-size, so the batch is all")

    model = _model(cfg, ds, size, w).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups([model], wd), lr=cfg.lr)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    loss_fn = maybe_compile(wrap_ddp(model, dev, w), dev, cfg.compile)
    views = (augment.ViewConfig(), augment.ViewConfig(solarize_p=0.2 if cfg.method == "byol" else 0.0))

    identity = {"method": cfg.method, "arch": cfg.arch, "dataset": cfg.dataset, "limit": cfg.limit, "seed": cfg.seed,
                "batch_size": bs, "input_size": size, "lr": cfg.lr, "wd": wd,
                "labeled_fraction": cfg.labeled_fraction, "samples": len(pool), "proj_hidden": cfg.proj_hidden,
                "proj_dim": cfg.proj_dim}
    meta = {"arch": cfg.arch, "input_size": size, "mean": list(mean), "std": list(std), "method": cfg.method,
            "epochs_planned": cfg.epochs, "data": cfg.dataset, "limit": cfg.limit, "seed": cfg.seed,
            "labeled_fraction": cfg.labeled_fraction, "samples": len(pool), "batch_size": bs, "lr": cfg.lr,
            "wd": wd, "coopt_version": VERSION, "world_size": w.size}
    part = augment.Part(bs, w.share(bs)) if w.multi else None
    return _Job(cfg, dev, w, ds, pool, labels, size, (mean, std), bs, part, model, loss_fn, opt, gen, views, identity,
                meta)


def _pool(cfg: PretrainConfig, ds: Dataset) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows to train on (supervised: a seeded labeled_fraction of them) and, supervised, the labels."""
    pool = torch.arange(len(ds))
    labels = None
    if cfg.method == "supervised":
        if ds.labels is None:
            raise CooptError(f"{cfg.dataset}: --method supervised needs a labelled data set")
        labels = torch.from_numpy(ds.labels)
        keep = max(1, round(cfg.labeled_fraction * len(ds)))
        pool = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed))[:keep].sort().values
    if len(pool) < 2:
        raise CooptError(f"{cfg.dataset}: need at least 2 training samples, have {len(pool)}")
    return pool, labels


def _model(cfg: PretrainConfig, ds: Dataset, size: int, w: World) -> nn.Module:
    """The method's network around a fresh backbone, every part initialised from the seed."""
    backbone, dim, _ = build_backbone(cfg.arch, size, cfg.seed)
    with torch.random.fork_rng(devices=[]):  # heads from the seed, not from the global RNG
        torch.manual_seed(cfg.seed + 1)
        if cfg.method == "supervised":
            model = Supervised(backbone, dim, len(ds.classes) or int(ds.labels.max()) + 1)
        elif cfg.method == "simclr":
            model = SimCLR(backbone, dim, cfg.proj_hidden or 2048, cfg.proj_dim, cfg.temperature, gather=w.multi)
        else:
            model = BYOL(backbone, dim, cfg.proj_hidden or 4096, cfg.proj_dim, cfg.proj_hidden or 4096)
    return model


def _batches(job: _Job, epoch: int, start: int):
    """The epoch's batches from `start` on, in epoch_permutation order over the pool (under
    torchrun this rank's share of each)."""
    order = job.pool[epoch_permutation(len(job.pool), job.cfg.seed, epoch)]
    for b in range(start, job.steps_per_epoch):
        idx = order[b * job.bs : (b + 1) * job.bs][job.world.share(job.bs)]
        imgs = read_images(job.ds, idx.numpy(), job.size)  # in-memory: one numpy gather; folders: decode
        yield {"images": imgs.to(job.dev, non_blocking=True),
               "labels": None if job.labels is None else job.labels[idx].to(job.dev)}


def _step(job: _Job, batch: dict, p: float) -> torch.Tensor:
    """One optimizer step at schedule position p (and BYOL's EMA update); the detached loss."""
    cfg, (mean, std) = job.cfg, job.norm
    for gr in job.opt.param_groups:
        gr["lr"] = cfg.lr * lr_factor(p)
    imgs = batch["images"]
    if cfg.method == "supervised":
        args = (augment.crop_flip(imgs, job.size, job.gen, mean, std, part=job.part), batch["labels"])
    else:
        args = tuple(augment.ssl_view(imgs, job.size, job.gen, v, mean, std, part=job.part) for v in job.views)
    args = tuple(a.contiguous(memory_format=torch.channels_last) if a.ndim == 4 else a for a in args)
    with autocast(job.dev):
        loss = job.loss_fn(*args)
    job.opt.zero_grad(set_to_none=True)
    loss.backward()
    job.opt.step()
    if cfg.method == "byol":
        job.model.update_target(1 - (1 - cfg.tau_base) * (math.cos(math.pi * p) + 1) / 2)
    return loss.detach()


def _save(job: _Job, loop: dict) -> None:
    if not job.world.main:  # the ranks' states are equal; no collective in here (fit calls it on every rank)
        return
    # state.pt last: it is the commit point. Interrupted before it, --resume redoes the epoch
    # from the previous state and rewrites the checkpoint and log; after it, all three agree.
    save_checkpoint(job.out, job.model.backbone, {**job.meta, "epochs": loop["epoch"], "steps": loop["step"]})
    write_log(job.log_path, loop["log"])
    save_state(job.state_path, {"identity": job.identity, "model": job.model.state_dict(),
                                "optimizer": job.opt.state_dict(), "aug_rng": rng_state(job.gen), "loop": loop,
                                "world_size": job.world.size})


def _snapshot(job: _Job, k: int, loop: dict) -> Path:
    path = snapshot_path(job.out, k)
    if job.world.main:  # the other ranks only record its path
        save_checkpoint(path, job.model.backbone,
                        {**job.meta, "snapshot": k, "epochs": loop["epoch"], "steps": loop["step"]})
    return path


def _summary(job: _Job, loop: dict, resumed: bool) -> dict:
    cfg = job.cfg
    return {
        "checkpoint": str(job.out), "state": str(job.state_path), "log": str(job.log_path), "method": cfg.method,
        "arch": cfg.arch, "input_size": job.size, "device": str(job.dev),
        "compiled": hasattr(job.loss_fn, "_orig_mod"), "world_size": job.world.size,
        "samples": len(job.pool), "epochs": loop["epoch"], "steps": loop["step"], "stopped": loop["stopped"],
        "resumed": resumed, "seconds": loop["run_seconds"], "train_seconds": loop["elapsed"],
        "samples_per_s": loop["run_samples"] / max(1e-9, loop["run_seconds"]), "loss": last_loss(loop),
        "snapshots": loop["snapshots"],
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out", "progress")},
    }
