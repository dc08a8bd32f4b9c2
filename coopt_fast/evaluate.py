"""probe: how good are a backbone's frozen features? Linear probe and weighted kNN.

Features of the train and test splits are computed once (frozen backbone, eval mode, the
checkpoint's own input size and normalisation, no augmentation) and both classifiers work on
those tensors, so a probe costs one pass over the images plus seconds.

Linear probe, the offline form of solo-learn's linear evaluation (as RELA/COOPT report it):
a linear layer on the frozen features, cross-entropy, SGD momentum 0.9 (Nesterov), batch 512,
100 epochs (at least 1000 steps, for small train sets), cosine learning-rate decay, no weight
decay. Because the features are precomputed
there is no augmentation; the features are standardised with the train split's mean/std
instead, which makes lr 0.1 right for any backbone's feature scale. The layer starts at zero:
the problem is convex, so the result does not depend on an init seed, only on the shuffle seed.

kNN (InstDisc / solo-learn): L2-normalised features, cosine similarity, the k = 20 nearest
train samples vote for their class with weight exp(sim / 0.07); the class with the largest
sum wins.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import Dataset, load_dataset
from .configs import ProbeConfig  # noqa: F401 (defined apart: the CLI reads its defaults without torch)
from .errors import CooptError
from .loader import read_images
from .plan import check_seed
from .priors import Prior, load_prior, preprocess, read_checkpoint
from .progress import bar
from .training import autocast, resolve_device


def load_frozen(ckpt: str, arch: str | None = None, seed: int = 0) -> Prior:
    """A checkpoint file (arch read from its meta, or `arch`), `ARCH:CKPT`, or `ARCH` (random init)."""
    p = Path(ckpt)
    if p.is_file():
        _, meta = read_checkpoint(p)
        arch = arch or meta.get("arch")
        if not arch:
            raise CooptError(f"{p}: checkpoint records no architecture; give it with --arch")
        spec = f"{arch}:{p}"
    elif ":" not in ckpt and ("/" in ckpt or p.suffix in (".pt", ".pth", ".safetensors")):
        raise CooptError(f"{ckpt}: checkpoint not found")
    else:
        spec = ckpt if arch is None or ":" in ckpt else f"{arch}:{ckpt}"
    if spec.partition(":")[0] == "labels":
        raise CooptError(f"{ckpt}: the labels prior has no features to probe")
    return load_prior(spec, seed)


@torch.no_grad()
def features(prior: Prior, ds: Dataset, dev: torch.device, batch_size: int = 256, progress: bool = True,
             what: str = "features") -> torch.Tensor:
    """float32 [N, dim] features of every sample of `ds` (frozen, eval mode)."""
    model = prior.model.to(dev, memory_format=torch.channels_last).eval()
    out = []
    with bar(what, len(ds), enabled=progress) as advance:
        for start in range(0, len(ds), batch_size):
            idx = range(start, min(len(ds), start + batch_size))
            imgs = read_images(ds, list(idx), prior.input_size).to(dev)
            x = preprocess(imgs, prior.input_size, prior.mean, prior.std).contiguous(memory_format=torch.channels_last)
            with autocast(dev):
                out.append(model(x).float())
            advance(len(idx))
    return torch.cat(out)


@contextlib.contextmanager
def _one_thread_on_cpu(dev: torch.device):
    """The probe's ops are tiny (512 x dim x classes): a second OpenMP thread costs more in barriers
    than it computes."""
    if dev.type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def linear_probe(train_f, train_y, test_f, test_y, num_classes: int, cfg: ProbeConfig = ProbeConfig()) -> float:
    """Top-1 test accuracy of a linear classifier trained on standardised frozen features."""
    with _one_thread_on_cpu(train_f.device):
        return _linear_probe(train_f, train_y, test_f, test_y, num_classes, cfg)


def _linear_probe(train_f, train_y, test_f, test_y, num_classes: int, cfg: ProbeConfig) -> float:
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xtr, xte = (train_f - mu) / sd, (test_f - mu) / sd
    layer = torch.nn.Linear(xtr.shape[1], num_classes, device=xtr.device)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(cfg.seed)
    n = len(xtr)
    steps_per_epoch = math.ceil(n / cfg.probe_batch)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(xtr.device)
        for b in range(steps_per_epoch):
            rows = order[b * cfg.probe_batch : (b + 1) * cfg.probe_batch]
            for gr in opt.param_groups:
                gr["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(layer(xtr[rows]), train_y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        return (layer(xte).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> float:
    """Weighted kNN top-1 accuracy (cosine similarity, weights exp(sim / T))."""
    tr, te = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(tr))
    correct = 0
    for s in range(0, len(te), chunk):  # [chunk, N_train] similarities at a time, never N_test x N_train
        sim, nn_idx = (te[s : s + chunk] @ tr.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[nn_idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[s : s + chunk]).sum().item()
    return correct / len(te)


def _labelled(spec: str, limit: int | None, flag: str) -> Dataset:
    ds = load_dataset(spec).subset(limit)
    if ds.labels is None:
        raise CooptError(f"{spec}: data set has no labels; --{flag} needs a labelled data set")
    return ds


def probe(ckpt: str, train: str = "fashion-mnist", test: str = "fashion-mnist:test", *, arch: str | None = None,
          limit_train: int | None = None, limit_test: int | None = None, device: str = "auto", progress: bool = True,
          **kwargs) -> dict:
    """Linear-probe and kNN accuracy of `ckpt`'s frozen features (train split -> test split).

    Args:
        ckpt: a checkpoint from train/pretrain, "ARCH:CHECKPOINT", or "ARCH" (random init).
        train: labelled data set spec the classifiers are fit on.
        test: labelled data set spec they are scored on.
        arch: the architecture, when the checkpoint does not record it.
        limit_train: use the first N train samples only (None: all).
        limit_test: use the first N test samples only (None: all).
        device: "auto" (cuda if present), "cpu", "cuda" or "cuda:N".
        progress: progress bars (or plain lines without a terminal) on stderr.
        **kwargs: ProbeConfig fields: epochs=100, lr=0.1, probe_batch=512, min_steps=1000,
            k=20 (CLI --neighbours), temperature=0.07, seed=0, batch_size=256 (feature extraction).

    Returns:
        probe_accuracy, knn_accuracy, seconds (feature_seconds, probe_seconds), arch, dim,
        n_train, n_test, classes, method, device, protocol (the ProbeConfig used).

    Raises:
        CooptError: a bad option, an unlabelled data set, an unreadable checkpoint.
    """
    cfg = ProbeConfig(**kwargs)
    for flag, v in (("--epochs", cfg.epochs), ("--neighbours", cfg.k), ("--limit-train", limit_train),
                    ("--limit-test", limit_test), ("batch_size", cfg.batch_size), ("probe_batch", cfg.probe_batch)):
        if v is not None and v < 1:
            raise CooptError(f"{flag} must be >= 1, got {v}")
    check_seed(cfg.seed)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    prior = load_frozen(ckpt, arch, cfg.seed)
    ds_tr, ds_te = _labelled(train, limit_train, "train"), _labelled(test, limit_test, "test")
    num_classes = int(max(ds_tr.labels.max(), ds_te.labels.max())) + 1
    f_tr = features(prior, ds_tr, dev, cfg.batch_size, progress, "features (train)")
    f_te = features(prior, ds_te, dev, cfg.batch_size, progress, "features (test)")
    t_feat = time.perf_counter() - t0
    y_tr, y_te = torch.from_numpy(ds_tr.labels).to(dev), torch.from_numpy(ds_te.labels).to(dev)
    t1 = time.perf_counter()
    lin = linear_probe(f_tr, y_tr, f_te, y_te, num_classes, cfg)
    t_lin = time.perf_counter() - t1
    knn = knn_accuracy(f_tr, y_tr, f_te, y_te, num_classes, cfg.k, cfg.temperature)
    return {
        "probe_accuracy": lin, "knn_accuracy": knn, "seconds": time.perf_counter() - t0,
        "feature_seconds": t_feat, "probe_seconds": t_lin, "checkpoint": ckpt, "arch": prior.arch,
        "input_size": prior.input_size, "dim": prior.dim, "n_train": len(ds_tr), "n_test": len(ds_te),
        "classes": num_classes, "method": prior.meta.get("method", ""), "device": str(dev), "protocol": asdict(cfg),
    }
