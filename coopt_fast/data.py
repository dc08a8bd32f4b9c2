"""Dataset specs -> images and labels, plus a content fingerprint.

One spec string names a data set everywhere:
  fashion-mnist            Debian's dataset-fashion-mnist, train split (60,000 x 28x28x1)
  fashion-mnist:test       the test split (10,000)
  folder:PATH              ImageFolder tree (class subfolders -> labels) or a flat folder of JPEG/PNG
  npy:IMAGES.npy[,LABELS.npy]   uint8 arrays N x H x W or N x H x W x C

In-memory data sets (fashion-mnist, npy) hold `images` as uint8 [N, H, W, C]. Folder data
sets hold file paths and decode on demand (`read`), since they may not fit in memory.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CooptError

FASHION_MNIST_DIR = Path(os.environ.get("COOPT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class Dataset:
    spec: str
    images: np.ndarray | None = None        # uint8 [N, H, W, C] for in-memory data sets
    files: list[Path] | None = None         # for folder data sets, in sample order
    labels: np.ndarray | None = None        # int64 [N] or None
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.files)

    @property
    def shape(self) -> tuple[int, ...] | None:
        """(H, W, C) for in-memory data; None for folders (images may differ in size)."""
        return tuple(self.images.shape[1:]) if self.images is not None else None

    def read(self, indices) -> list[np.ndarray] | np.ndarray:
        """uint8 images for `indices`: one [len, H, W, C] array in memory, a list of HxWxC for folders."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.images is not None:
            return self.images[indices]
        return [read_image_file(self.files[i]) for i in indices]

    def subset(self, limit: int | None) -> "Dataset":
        """The first `limit` samples (split --limit)."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise CooptError(f"--limit must be >= 1, got {limit}")
        return Dataset(
            spec=self.spec,
            images=None if self.images is None else self.images[:limit],
            files=None if self.files is None else self.files[:limit],
            labels=None if self.labels is None else self.labels[:limit],
            classes=self.classes,
        )


def read_image_file(path: Path) -> np.ndarray:
    """Decode one JPEG/PNG to uint8 HxWxC (C = 1 or 3) with torchvision.io (libjpeg-turbo/libpng)."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    try:
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        img = decode_image(data, mode=ImageReadMode.UNCHANGED)
    except (OSError, RuntimeError) as e:
        raise CooptError(f"{path}: cannot decode image ({str(e).splitlines()[0]})") from None
    if img.shape[0] == 4:        # RGBA -> RGB; alpha carries no features
        img = img[:3]
    elif img.shape[0] == 2:      # gray + alpha
        img = img[:1]
    return img.permute(1, 2, 0).numpy()


def _read_idx(path: Path) -> np.ndarray:
    """The MNIST idx format: big-endian magic (dtype, ndim), dims, then raw uint8 data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CooptError(
            f"{path}: not found; install it with `apt-get install -y dataset-fashion-mnist`"
        ) from None
    ndim = raw[3]
    dims = np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4").astype(np.int64)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_fashion_mnist(split: str) -> Dataset:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")[..., None]
    labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    spec = "fashion-mnist" if split == "train" else "fashion-mnist:test"
    return Dataset(spec, images=images, labels=labels, classes=list(FASHION_MNIST_CLASSES))


def _load_npy(spec: str, arg: str) -> Dataset:
    parts = arg.split(",")
    if len(parts) > 2 or not parts[0]:
        raise CooptError(f"{spec}: expected npy:IMAGES.npy or npy:IMAGES.npy,LABELS.npy")
    try:
        images = np.load(parts[0], mmap_mode="r")
    except (OSError, ValueError) as e:
        raise CooptError(f"{parts[0]}: cannot load images ({e})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise CooptError(f"{parts[0]}: images must be uint8 N×H×W or N×H×W×C, got {images.dtype} {images.shape}")
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] not in (1, 3):
        raise CooptError(f"{parts[0]}: channel dimension must be 1 or 3, got {images.shape[-1]}")
    labels, classes = None, []
    if len(parts) == 2:
        try:
            labels = np.load(parts[1]).astype(np.int64)
        except (OSError, ValueError) as e:
            raise CooptError(f"{parts[1]}: cannot load labels ({e})") from None
        if labels.shape != (len(images),):
            raise CooptError(f"{parts[1]}: labels shape {labels.shape} does not match {len(images)} images")
        if labels.min() < 0:
            raise CooptError(f"{parts[1]}: labels must be non-negative class ids")
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    return Dataset(spec, images=np.ascontiguousarray(images), labels=labels, classes=classes)


def _load_folder(spec: str, arg: str) -> Dataset:
    root = Path(arg)
    if not root.is_dir():
        raise CooptError(f"{root}: not a directory")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs:  # ImageFolder: class subfolders, sorted by name like torchvision
        files, labels = [], []
        for c, d in enumerate(subdirs):
            found = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [c] * len(found)
        classes = [d.name for d in subdirs]
        labels = np.asarray(labels, dtype=np.int64)
    else:
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        labels, classes = None, []
    if not files:
        raise CooptError(f"{root}: no JPEG/PNG images found")
    return Dataset(spec, files=files, labels=labels, classes=classes)


def load_dataset(spec: str) -> Dataset:
    """Resolve a dataset spec string (see module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        if arg not in ("", "train", "test"):
            raise CooptError(f"{spec}: unknown split {arg!r} (use fashion-mnist or fashion-mnist:test)")
        return _load_fashion_mnist(arg or "train")
    if kind == "npy":
        return _load_npy(spec, arg)
    if kind == "folder":
        return _load_folder(spec, arg)
    raise CooptError(f"{spec}: unknown dataset spec (use fashion-mnist[:test], folder:PATH or npy:IMAGES.npy[,LABELS.npy])")


def fingerprint(ds: Dataset) -> dict:
    """N, shape and a sha256 over the content, so later commands refuse a changed data set.

    In-memory data: the image bytes (and labels). Folders: relative paths and file bytes,
    streamed, so renaming, editing or adding a file changes the hash.
    """
    h = hashlib.sha256()
    if ds.images is not None:
        h.update(np.ascontiguousarray(ds.images).data)
    else:
        root = Path(ds.spec.partition(":")[2])
        for p in ds.files:
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(p.read_bytes())
    if ds.labels is not None:
        h.update(np.ascontiguousarray(ds.labels).data)
    return {"n": len(ds), "shape": list(ds.shape) if ds.shape else None, "sha256": h.hexdigest()}
