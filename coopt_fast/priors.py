"""Prior models: architectures, checkpoints, preprocessing, and the `labels` prior.

A prior SPEC is `ARCH`, `ARCH:CHECKPOINT` or `labels`:
  ARCH        convnet (small CNN for 28-32 px images on a CPU), linear (trivial: for measuring
              the pipeline around a model, and smoke tests) or a torchvision classification
              architecture (resnet18, resnet50, mobilenet_v2, efficientnet_b0, vit_b_16, swin_v2_t, ...)
  CHECKPOINT  local .pt/.pth (loaded with torch.load(weights_only=True): tensors and plain
              containers only, never arbitrary pickles) or .safetensors (recommended)
  labels      human annotation: one-hot over the data set's classes
A loaded prior's spec names its checkpoint by absolute path (`resolve_prior_spec`): that is what
extract records, and compares when it resumes, so the file named from another working directory
is the same prior; its content is recorded apart, as checkpoint_sha256.

Features are the penultimate layer: the architecture's last nn.Linear (its classifier) is
replaced by nn.Identity. Without a checkpoint the network is randomly initialised from
`seed`, on the CPU, so the same spec and seed give the same network on any machine.

Checkpoint layout written by coopt-fast (`save_checkpoint`):
  .pt:          {"state_dict": {name: tensor}, "meta": {...}}
  .safetensors: the state dict, with meta as JSON under the metadata key "coopt"
meta keys: arch, input_size, mean, std, and provenance (method, epochs, data, seed, ...).
A plain state dict (e.g. a torchvision one, classifier included) loads too. The keys this
module reads (arch, method, input_size, mean, std) are checked on every read: a checkpoint
comes from someone else, and a wrong value would otherwise allocate at its size or publish
NaN features.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CooptError, disk_guard
from .store import file_sha256  # checkpoints are hashed as store files are (and importers find it here)

# Defaults when a checkpoint records no preprocessing. ImageNet statistics for the torchvision
# architectures (what their published weights expect); a symmetric 0.5/0.5 for convnet.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CONVNET_MEAN, CONVNET_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
SMALL_ARCHS = ("convnet", "linear")  # sized for small images: input = image side, [0.5, 0.5] normalisation
DEFAULT_INPUT_SIZE = {"convnet": 32, "linear": 32, "swin_v2_t": 256}  # everything else: 224
# A checkpoint's input_size: below 8 px convnet's three poolings leave nothing; above 4096 px one
# float32 image is 200 MB, a batch of them more than any machine here holds.
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 8, 4096


class ConvNet(nn.Module):
    """Four conv-BN-ReLU blocks, each halving the resolution but the last, then global pooling:
    `width*8`-d features (256 at width 32), ~0.4M params, ~15M MACs per 32 px image.

    Sized for 28-32 px images on a CPU: pooling after the first block (rather than keeping 32x32
    for two blocks) cuts the cost ~4x, which is what lets the demo fit in minutes on 2 cores.
    """

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        w = width
        self.features = nn.Sequential(
            *block(3, w, True), *block(w, 2 * w, True), *block(2 * w, 4 * w, True), *block(4 * w, 8 * w, False),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_dim = 8 * w

    def forward(self, x):
        return self.features(x)


class LinearNet(nn.Module):
    """A trivial backbone: 4x4 average pooling, then one linear map to 64-d features (3k params).

    It stands for "no model" where a model is required: `bench_loader.py` trains it to measure
    what the training loop and the store cost per sample, and tests use it as a fast student.
    """

    def __init__(self, out_dim: int = 64):
        super().__init__()
        self.features = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 16, out_dim))
        self.out_dim = out_dim

    def forward(self, x):
        return self.features(x)


def _replace_last_linear(model: nn.Module) -> tuple[str, int]:
    """Swap the classifier (last nn.Linear) for Identity; return its name and input dim."""
    name, lin = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return name, lin.in_features


def build_backbone(arch: str, input_size: int | None = None, seed: int = 0) -> tuple[nn.Module, int, str | None]:
    """A randomly initialised feature extractor: (module, feature dim, removed head's name).

    Initialised on the CPU under a fixed seed so weights are identical across machines.
    """
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch in SMALL_ARCHS:
            m = ConvNet() if arch == "convnet" else LinearNet()
            return m, m.out_dim, None
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise CooptError(f"unknown architecture {arch!r} (use convnet, linear or a torchvision classifier such as resnet18)")
        kwargs = {}
        if arch.startswith("vit_") and input_size:  # ViT's position embeddings fix the input size
            kwargs["image_size"] = input_size
        try:
            m = torchvision.models.get_model(arch, weights=None, **kwargs)
        except (AssertionError, ValueError) as e:  # e.g. a ViT whose input size is not a multiple of its patch
            raise CooptError(f"{arch}: cannot be built for input size {input_size} ({e})") from None
        head, dim = _replace_last_linear(m)
        return m, dim, head


def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(state_dict, meta) from a .pt/.pth (weights_only) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CooptError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("coopt", "{}"))
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RecursionError) as e:
            raise CooptError(f"{path}: not a readable safetensors file ({e})") from None
        return state, check_meta(path, meta)
    if path.suffix not in (".pt", ".pth"):
        raise CooptError(f"{path}: checkpoint must be .pt, .pth or .safetensors")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything beyond tensors/containers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CooptError(f"{path}: refused to load (only plain tensors are accepted: {first})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        state, meta = obj["state_dict"], obj.get("meta")
        if not _is_state_dict(state):
            raise CooptError(f"{path}: state_dict: expected a state dict (name -> tensor), got {type(state).__name__}")
        return state, check_meta(path, {} if meta is None else meta)
    if _is_state_dict(obj):
        return obj, {}
    raise CooptError(f"{path}: expected a state dict (name -> tensor) or {{'state_dict', 'meta'}}")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def check_meta(path, meta) -> dict:
    """The checkpoint metadata this module reads, checked: one error naming the file and the key."""
    if not isinstance(meta, dict):
        raise CooptError(f"{path}: metadata: must be an object (key -> value), got {type(meta).__name__}")
    for key in ("arch", "method"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise CooptError(f"{path}: metadata {key}: must be a string, got {meta[key]!r:.40}")
    size = meta.get("input_size")
    if size is not None and (type(size) is not int or not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE):
        raise CooptError(f"{path}: metadata input_size: must be an integer in [{MIN_INPUT_SIZE}, {MAX_INPUT_SIZE}], "
                         f"got {size!r:.40}")
    for key in ("mean", "std"):
        v = meta.get(key)
        if v is None:
            continue
        ok = isinstance(v, (list, tuple)) and len(v) in (1, 3) and all(
            isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and (key == "mean" or x > 0)
            for x in v)
        if not ok:  # std 0 divides by zero: all-NaN features
            raise CooptError(f"{path}: metadata {key}: must be 1 or 3 finite numbers{' > 0' if key == 'std' else ''}, "
                             f"got {v!r:.60}")
    return meta


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict) -> None:
    """Write a backbone checkpoint atomically (tmp file + rename): a crash leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        with disk_guard(path):
            if path.suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file(state, str(tmp), metadata={"coopt": json.dumps(meta)})
            else:
                torch.save({"state_dict": state, "meta": meta}, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def load_backbone(arch: str, checkpoint: str | Path | None, seed: int = 0) -> tuple[nn.Module, int, dict]:
    """Backbone with checkpoint weights (or seeded random init): (module, feature dim, meta)."""
    meta: dict = {}
    state = None
    if checkpoint is not None:
        state, meta = read_checkpoint(checkpoint)
        if meta.get("arch") and meta["arch"] != arch:
            raise CooptError(f"{checkpoint}: checkpoint is for architecture {meta['arch']!r}, not {arch!r}")
    model, dim, head = build_backbone(arch, meta.get("input_size"), seed)
    if state is not None:
        if head:  # a full classifier checkpoint: drop the head we replaced
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            msg = str(e).replace("\n", " ")
            raise CooptError(f"{checkpoint}: does not fit architecture {arch!r}: {msg[:300]}") from None
    model.eval()
    return model, dim, meta


@dataclass
class Prior:
    """A loaded prior: what extract needs to turn uint8 images into feature vectors."""

    spec: str
    arch: str
    model: nn.Module | None       # None for the labels prior
    dim: int
    input_size: int
    mean: tuple
    std: tuple
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    meta: dict = field(default_factory=dict)


def parse_prior_spec(spec: str) -> tuple[str, str | None]:
    arch, _, ckpt = spec.partition(":")
    if not arch:
        raise CooptError(f"prior {spec!r}: expected ARCH, ARCH:CHECKPOINT or labels")
    return arch, (ckpt or None)


def resolve_prior_spec(spec: str) -> str:
    """SPEC with its checkpoint path made absolute (symlinks resolved), "ARCH:/abs/path": the
    same file names the same prior from any working directory. ARCH and labels are unchanged."""
    arch, ckpt = parse_prior_spec(spec)
    return f"{arch}:{Path(ckpt).resolve()}" if ckpt else arch


def load_prior(spec: str, seed: int = 0, num_classes: int | None = None) -> Prior:
    """The prior SPEC names (module doc); its `spec` is resolve_prior_spec(SPEC)."""
    arch, ckpt = parse_prior_spec(spec)
    if arch == "labels":
        if ckpt:
            raise CooptError(f"prior {spec!r}: the labels prior takes no checkpoint")
        if not num_classes:
            raise CooptError("the labels prior needs a data set with labels")
        return Prior("labels", "labels", None, num_classes, 0, (), ())
    spec = resolve_prior_spec(spec)
    ckpt = parse_prior_spec(spec)[1]
    model, dim, meta = load_backbone(arch, ckpt, seed)
    default_mean, default_std = (CONVNET_MEAN, CONVNET_STD) if arch in SMALL_ARCHS else (IMAGENET_MEAN, IMAGENET_STD)
    return Prior(
        spec=spec, arch=arch, model=model, dim=dim,
        input_size=int(meta.get("input_size") or DEFAULT_INPUT_SIZE.get(arch, 224)),
        mean=tuple(meta.get("mean") or default_mean), std=tuple(meta.get("std") or default_std),
        checkpoint=ckpt, checkpoint_sha256=file_sha256(ckpt) if ckpt else None, meta=meta,
    )


def preprocess(images: torch.Tensor, input_size: int, mean, std) -> torch.Tensor:
    """uint8 [B, H, W, C] -> normalised float32 [B, 3, S, S] (grayscale expanded to RGB).

    Bilinear resize with antialias (matters when shrinking large images; a no-op cost when
    the size already matches, which we skip).
    """
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
