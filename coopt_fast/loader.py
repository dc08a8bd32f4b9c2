"""StoreLoader: shuffled batches straight from the merged store, memory-mapped.

The merged store (`RUN/merged.h5`, written by `merge`) keeps `targets` (float16 [N', n]) and,
for in-memory data sets, `images` (uint8 [N', H, W, C]) as contiguous, unfiltered HDF5
datasets. Such a dataset is one run of bytes at `ds.id.get_offset()`, so `np.memmap` maps it
with no copy and no HDF5 call per batch; a batch is one numpy fancy-index gather of its rows
(the page cache does the I/O). A chunked or compressed dataset has no such run and is refused.

Order: epoch e visits the rows in `epoch_permutation(N', seed, e)`, a torch.randperm from a
generator seeded by (seed, e): every row exactly once per epoch, the same on every machine,
and nothing to save for resume but the epoch and the batch position.

Folder data sets keep their pixels out of the store: images are then decoded from the
original files (`dataset` attribute, `limit` if present) by the store's `index`, and resized
to `image_size` when the files differ in size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import Dataset, load_dataset
from .errors import CooptError
from . import codec
from .store import attr_json, memmap_dataset, open_complete

MEMMAP_FIELDS = ("images", "targets", "index", "participant")
# Compressed targets (see coopt_fast.codec) are decoded per batch, on the batch's device.


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded visiting order of epoch `epoch` (int64 [n], CPU)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # distinct stream per (seed, epoch)
    return torch.randperm(n, generator=g)


def resolve_store(run: str | Path) -> Path:
    """RUN folder -> RUN/merged.h5; a path to an .h5 file is taken as is."""
    p = Path(run)
    return p / "merged.h5" if p.is_dir() else p


def read_images(ds: Dataset, indices, size: int | None = None) -> torch.Tensor:
    """uint8 [B, H, W, C] for `indices` of a data set; folder images of mixed size -> size x size.

    In-memory data sets are one gather. Folder images are decoded one by one (that is what
    files are); gray images in a batch with colour ones become 3-channel.
    """
    imgs = ds.read(indices)
    if isinstance(imgs, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(imgs))
    channels = max(im.shape[2] for im in imgs)
    same = len({im.shape[:2] for im in imgs}) == 1
    if not same and size is None:
        raise CooptError(f"{ds.spec}: images differ in size; give an input size to resize them to")
    out = []
    for im in imgs:
        t = torch.from_numpy(np.ascontiguousarray(im))
        if t.shape[2] != channels:
            t = t.expand(-1, -1, channels)
        if size is not None and t.shape[:2] != (size, size):
            t = F.interpolate(t.permute(2, 0, 1)[None].float(), size=(size, size), mode="bilinear",
                              antialias=True, align_corners=False)[0].round().clamp(0, 255).byte().permute(1, 2, 0)
        out.append(t)
    return torch.stack(out)


class StoreLoader:
    """Iterate a merged store in seeded shuffled batches of dicts {field: tensor}.

    fields: any of images (uint8 [B,H,W,C]), targets ([B,n]: float16 as stored, or float32 decoded
    from bfloat16/int8/int8-dim stores), index (int64), participant (int16).
    len() is the number of batches; call set_epoch(e) before iterating epoch e.
    """

    def __init__(self, path, batch_size: int, *, fields=("images", "targets"), shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, device="cpu", image_size: int | None = None):
        self.path = resolve_store(path)
        if batch_size < 1:
            raise CooptError(f"batch size must be >= 1, got {batch_size}")
        unknown = set(fields) - set(MEMMAP_FIELDS)
        if unknown:
            raise CooptError(f"unknown loader field(s) {sorted(unknown)}; choose from {list(MEMMAP_FIELDS)}")
        self.batch_size, self.fields, self.shuffle, self.seed = batch_size, tuple(fields), shuffle, seed
        self.drop_last, self.device, self.image_size = drop_last, torch.device(device), image_size
        self.epoch, self.start_batch = 0, 0
        self.arrays: dict[str, np.ndarray] = {}
        self.dataset: Dataset | None = None  # set when images come from the original files
        with open_complete(self.path, "merged store") as f:
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            self.participants = attr_json(f, "participants") if "participants" in f.attrs else []
            for name in ("targets", "index"):
                if name not in f:
                    raise CooptError(f"{self.path}: merged store has no `{name}` dataset")
            if f["targets"].ndim != 2:
                raise CooptError(f"{self.path}:targets: expected [rows, dim], got shape {f['targets'].shape}")
            if "images" in f and f["images"].ndim != 4:
                raise CooptError(f"{self.path}:images: expected [rows, H, W, C], got shape {f['images'].shape}")
            self.n = int(f["targets"].shape[0])
            self.dim = int(f["targets"].shape[1])
            self.target_mean = torch.from_numpy(f["target_mean"][()].astype(np.float32)) if "target_mean" in f else None
            self.target_std = torch.from_numpy(f["target_std"][()].astype(np.float32)) if "target_std" in f else None
            self.target_dtype = str(self.attrs.get("target_dtype", "float16"))
            need = set(self.fields) | ({"index"} if "images" in self.fields and "images" not in f else set())
            self.scale = None  # int8: memmapped [N'] per row; int8-dim: [K, n] on the device
            if "targets" in self.fields and self.target_dtype in ("int8", "int8-dim"):
                if "target_scale" not in f:
                    raise CooptError(f"{self.path}: {self.target_dtype} targets without `target_scale`")
                if self.target_dtype == "int8":
                    self.scale = memmap_dataset(self.path, f["target_scale"])
                else:
                    self.scale = torch.from_numpy(f["target_scale"][:]).to(self.device)
                    need.add("participant")
            for name in sorted(need):
                if name == "images" and name not in f:
                    continue
                if name not in f:
                    raise CooptError(f"{self.path}: merged store has no `{name}` dataset")
                if f[name].shape[0] != self.n:
                    raise CooptError(f"{self.path}:{name}: {f[name].shape[0]} rows, `targets` has {self.n}")
                arr = memmap_dataset(self.path, f[name])
                # Cheap guard against a wrong offset: first and last rows must equal h5py's read.
                nan_ok = arr.dtype.kind == "f"
                if self.n and not (np.array_equal(arr[0], f[name][0], equal_nan=nan_ok)
                                   and np.array_equal(arr[-1], f[name][-1], equal_nan=nan_ok)):
                    raise CooptError(f"{self.path}:{name}: memory-mapped rows differ from HDF5's read")
                if name == "targets" and arr.dtype.kind == "f":  # one read of the targets: ~0.1 s per 100 MB
                    bad = next((b for b in range(0, self.n, 65536) if not np.isfinite(arr[b : b + 65536]).all()), None)
                    if bad is not None:
                        raise CooptError(f"{self.path}:targets: NaN or Inf values (rows {bad}..{bad + 65535})")
                self.arrays[name] = arr
            if "images" in self.fields and "images" not in f:
                spec = self.attrs.get("dataset")
                if not spec:
                    raise CooptError(f"{self.path}: no `images` dataset and no `dataset` attribute to read them from")
                limit = self.attrs.get("limit")  # merge writes -1 for "no limit"
                limit = int(limit) if limit not in (None, "") and int(limit) > 0 else None
                self.dataset = load_dataset(spec).subset(limit)
                if self.n and int(self.arrays["index"].max()) >= len(self.dataset):
                    raise CooptError(f"{self.path}: `index` reaches {int(self.arrays['index'].max())}, "
                                     f"but data set {spec} has {len(self.dataset)} samples")

    @property
    def image_shape(self) -> tuple | None:
        """(H, W, C) of stored images, or the data set's shape; None for folders."""
        if "images" in self.arrays:
            return tuple(self.arrays["images"].shape[1:])
        return self.dataset.shape if self.dataset is not None else None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select epoch `epoch`'s order; start_batch skips that many batches (mid-epoch resume)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def order(self) -> torch.Tensor:
        return epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else torch.arange(self.n)

    def __iter__(self):
        order = self.order().numpy()
        pin = self.device.type == "cuda"
        for b in range(self.start_batch, len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            batch = {}
            for name in self.fields:
                if name == "images" and self.dataset is not None:
                    t = read_images(self.dataset, self.arrays["index"][rows], self.image_size)
                else:
                    t = torch.from_numpy(self.arrays[name][rows])  # one gather; copies only this batch
                if pin:  # pinned host memory lets the copy overlap the previous step's compute
                    t = t.pin_memory()
                batch[name] = t.to(self.device, non_blocking=pin)
            if "targets" in batch and self.target_dtype != "float16":
                batch["targets"] = codec.decode(batch["targets"], self.target_dtype, self._scale(rows))
            yield batch

    def _scale(self, rows: np.ndarray) -> torch.Tensor | None:
        if self.target_dtype == "int8":
            return torch.from_numpy(self.scale[rows]).to(self.device)
        if self.target_dtype == "int8-dim":
            owner = torch.from_numpy(self.arrays["participant"][rows].astype(np.int64)).to(self.device)
            return self.scale[owner]
        return None
