"""StoreLoader: shuffled batches straight from the merged store, memory-mapped.

The merged store (`RUN/merged.h5`, written by `merge`) keeps `targets` (float16 [N', n]) and,
for in-memory data sets, `images` (uint8 [N', H, W, C]) as contiguous, unfiltered HDF5
datasets. Such a dataset is one run of bytes at `ds.id.get_offset()`, so `np.memmap` maps it
with no copy and no HDF5 call per batch; a batch is one numpy fancy-index gather of its rows
(the page cache does the I/O). A chunked or compressed dataset has no such run and is refused.

Order: epoch e visits the rows in `epoch_permutation(N', seed, e)`, a torch.randperm from a
generator seeded by (seed, e): every row exactly once per epoch, the same on every machine,
and nothing to save for resume but the epoch and the batch position.

Under torchrun (`world`): batch_size is the global batch; each rank gets its contiguous share
(World.share) of every global batch of that one order, so the ranks' shares of batch b are the
single process's batch b, and the order, hence --resume, does not depend on the world size.

Where a batch goes (`device`, `resident`):
  cpu            each field is gathered into fresh memory (the batch is the caller's to keep).
  cuda           staged: two pinned host buffers per field, reused. Batch b+1 is gathered into
                 the free buffer and its host->device copy issued on a side stream before
                 batch b is handed out, so the gather (CPU) and the copy (DMA) overlap the
                 step running on the GPU; a buffer is refilled only after its copy's event.
  resident=True  every memmapped field is uploaded once (in 64k-row blocks) and batches are
                 gathered on the device with index_select: no host work per batch at all.
                 Default (None): on CUDA when the fields take under half the free GPU memory.
Compressed targets are decoded after the gather, on the batch's device.

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
from .distributed import World
from .errors import CooptError
from . import codec
from .store import memmap_dataset, merged_meta, open_complete

MEMMAP_FIELDS = ("images", "targets", "index", "participant")
RESIDENT_FRACTION = 0.5  # resident=None uploads the store when it fits in this share of free GPU memory
UPLOAD_ROWS = 65536      # rows per host->device block of a resident upload (bounds the pinned copy)


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
    device: where batches land; resident: keep the whole store on that device (see module doc).
    world: under torchrun, batches are this rank's shares of global batches of batch_size rows.
    """

    def __init__(self, path, batch_size: int, *, fields=("images", "targets"), shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, device="cpu", image_size: int | None = None,
                 resident: bool | None = None, world: World | None = None):
        self.path = resolve_store(path)
        if batch_size < 1:
            raise CooptError(f"batch size must be >= 1, got {batch_size}")
        unknown = set(fields) - set(MEMMAP_FIELDS)
        if unknown:
            raise CooptError(f"unknown loader field(s) {sorted(unknown)}; choose from {list(MEMMAP_FIELDS)}")
        self.batch_size, self.fields, self.shuffle, self.seed = batch_size, tuple(fields), shuffle, seed
        self.drop_last, self.device, self.image_size = drop_last, torch.device(device), image_size
        self.epoch, self.start_batch = 0, 0
        self.world = world or World()
        self.arrays: dict[str, np.ndarray] = {}  # memmapped fields, plus int8's per-row target_scale
        self.dataset: Dataset | None = None  # set when images come from the original files
        with open_complete(self.path, "merged store") as f:
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            self.participants = merged_meta(f, self.path)["participants"]
            self._check_layout(f)
            self.n = int(f["targets"].shape[0])
            self.dim = int(f["targets"].shape[1])
            self.target_mean = torch.from_numpy(f["target_mean"][()].astype(np.float32)) if "target_mean" in f else None
            self.target_std = torch.from_numpy(f["target_std"][()].astype(np.float32)) if "target_std" in f else None
            self.target_dtype = str(self.attrs.get("target_dtype", "float16"))
            need, self.dim_scale = self._needed(f)  # dim_scale: int8-dim's [K, n], picked per row by `participant`
            for name in sorted(need):
                if name == "images" and name not in f:
                    continue
                self.arrays[name] = self._memmap(f, name)
            if "images" in self.fields and "images" not in f:
                self.dataset = self._source_dataset()
        self.resident = self._choose_resident(resident)
        self.on_device: dict[str, torch.Tensor] = self._upload() if self.resident else {}

    # ---- opening ----------------------------------------------------------------------------

    def _check_layout(self, f) -> None:
        """The datasets every merged store has, with the ranks the loader reads them at."""
        for name in ("targets", "index"):
            if name not in f:
                raise CooptError(f"{self.path}: merged store has no `{name}` dataset")
        if f["targets"].ndim != 2:
            raise CooptError(f"{self.path}:targets: expected [rows, dim], got shape {f['targets'].shape}")
        if "images" in f and f["images"].ndim != 4:
            raise CooptError(f"{self.path}:images: expected [rows, H, W, C], got shape {f['images'].shape}")

    def _needed(self, f) -> tuple[set, torch.Tensor | None]:
        """(datasets to memory-map for self.fields, int8-dim's per-participant scales on the device)."""
        need = set(self.fields) | ({"index"} if "images" in self.fields and "images" not in f else set())
        if "targets" not in self.fields or self.target_dtype not in ("int8", "int8-dim"):
            return need, None
        if "target_scale" not in f:
            raise CooptError(f"{self.path}: {self.target_dtype} targets without `target_scale`")
        if self.target_dtype == "int8":
            return need | {"target_scale"}, None  # [N'] per row: gathered like a field
        return need | {"participant"}, torch.from_numpy(f["target_scale"][:]).to(self.device)

    def _memmap(self, f, name: str) -> np.ndarray:
        """Dataset `name` memory-mapped, once its rows are checked against h5py's read."""
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
        return arr

    def _source_dataset(self) -> Dataset:
        """The data set the store's `index` points into, for images kept out of the store."""
        spec = self.attrs.get("dataset")
        if not spec:
            raise CooptError(f"{self.path}: no `images` dataset and no `dataset` attribute to read them from")
        limit = self.attrs.get("limit")  # merge writes -1 for "no limit"
        limit = int(limit) if limit not in (None, "") and int(limit) > 0 else None
        dataset = load_dataset(spec).subset(limit)
        if self.n and int(self.arrays["index"].max()) >= len(dataset):
            raise CooptError(f"{self.path}: `index` reaches {int(self.arrays['index'].max())}, "
                             f"but data set {spec} has {len(dataset)} samples")
        return dataset

    # ---- placement ------------------------------------------------------------------------

    @property
    def store_bytes(self) -> int:
        """Bytes of the memmapped fields a batch gathers from (what resident keeps on the device)."""
        return sum(a.nbytes for a in self.arrays.values())

    def _choose_resident(self, resident: bool | None) -> bool:
        if resident is None:
            if self.device.type != "cuda":
                return False  # on the CPU the page cache already is the resident copy
            free, _ = torch.cuda.mem_get_info(self.device)
            return self.store_bytes <= RESIDENT_FRACTION * free
        if resident and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if self.store_bytes > free:
                raise CooptError(f"{self.path}: resident store needs {self.store_bytes / 2**30:.2f} GiB on "
                                 f"{self.device}, {free / 2**30:.2f} GiB free; use resident=False (staged)")
        return bool(resident)

    def _upload(self) -> dict[str, torch.Tensor]:
        """Copy every memmapped field to the device once, a block of rows at a time."""
        out = {}
        for name, arr in self.arrays.items():
            t = torch.empty(arr.shape, dtype=torch_dtype(arr), device=self.device)
            for a in range(0, self.n, UPLOAD_ROWS):
                block = arr[a : a + UPLOAD_ROWS]
                if self.device.type == "cpu":
                    t.numpy()[a : a + len(block)] = block
                else:  # through a writable host copy of one block (torch refuses read-only memmaps)
                    t[a : a + len(block)].copy_(torch.from_numpy(np.array(block)))
            out[name] = t
        return out

    # ---- iteration ------------------------------------------------------------------------

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
        if self.resident:
            return self._iter_resident()
        if self.device.type == "cuda":
            return self._iter_staged()
        return self._iter_host()

    def _rows(self, order, b: int):
        rows = order[b * self.batch_size : (b + 1) * self.batch_size]
        return rows[self.world.share(len(rows))] if self.world.multi else rows

    def _folder_images(self, rows: np.ndarray) -> torch.Tensor:
        return read_images(self.dataset, self.arrays["index"][rows], self.image_size)

    def _host_batch(self, order, b: int) -> dict:
        rows = self._rows(order, b)
        # One numpy gather per field into fresh memory: the batch stays valid after the next one.
        batch = {name: torch.from_numpy(arr[rows]) for name, arr in self.arrays.items()}
        if self.dataset is not None and "images" in self.fields:
            batch["images"] = self._folder_images(rows)
        return self._finish(batch)

    def _iter_host(self):
        # Synchronous on purpose: the gather is ~5% of even a trivial step, so a prefetch thread gains nothing.
        order = self.order().numpy()
        for b in range(self.start_batch, len(self)):
            yield self._host_batch(order, b)

    def _iter_resident(self):
        order = self.order().to(self.device)
        host_order = order.cpu().numpy() if self.dataset is not None and "images" in self.fields else None
        for b in range(self.start_batch, len(self)):
            rows = self._rows(order, b)
            batch = {name: t.index_select(0, rows) for name, t in self.on_device.items()}
            if host_order is not None:
                batch["images"] = self._folder_images(self._rows(host_order, b)).to(self.device)
            yield self._finish(batch)

    def _iter_staged(self):
        """CUDA, not resident: gather into reused pinned buffers, copy on a side stream, one batch ahead."""
        order = self.order().numpy()
        stream = torch.cuda.Stream(self.device)
        slots = [{"buffers": staging_buffers(self.arrays, self.batch_size, pin=True), "event": None} for _ in range(2)]

        def stage(b: int) -> tuple[dict, torch.cuda.Event]:
            slot = slots[b % 2]
            if slot["event"] is not None:
                slot["event"].synchronize()  # this buffer's previous copy (batch b-2) has left it
            rows = self._rows(order, b)
            host = gather_into(slot["buffers"], self.arrays, rows)
            if self.dataset is not None and "images" in self.fields:
                host["images"] = self._folder_images(rows).pin_memory()
            with torch.cuda.stream(stream):
                dev = {name: t.to(self.device, non_blocking=True) for name, t in host.items()}
                slot["event"] = torch.cuda.Event()
                slot["event"].record(stream)
            return dev, slot["event"]

        end = len(self)
        nxt = stage(self.start_batch) if self.start_batch < end else None
        for b in range(self.start_batch, end):
            batch, ready = nxt
            nxt = stage(b + 1) if b + 1 < end else None  # overlaps the step the caller runs on `batch`
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            for t in batch.values():  # allocated on the side stream, used on the compute stream
                t.record_stream(compute)
            yield self._finish(batch)

    def _finish(self, batch: dict) -> dict:
        """Decode compressed targets (on the batch's device); keep only the requested fields."""
        if "targets" in self.fields and self.target_dtype != "float16":
            if self.target_dtype == "int8":
                scale = batch["target_scale"]
            elif self.target_dtype == "int8-dim":
                scale = self.dim_scale[batch["participant"].long()]
            else:
                scale = None
            batch["targets"] = codec.decode(batch["targets"], self.target_dtype, scale)
        return {name: batch[name] for name in self.fields}


def torch_dtype(arr: np.ndarray) -> torch.dtype:
    return torch.from_numpy(np.empty(0, arr.dtype)).dtype  # (a read-only memmap would warn)


def staging_buffers(arrays: dict[str, np.ndarray], rows: int, pin: bool) -> dict[str, torch.Tensor]:
    """One reusable host buffer of `rows` rows per array (pinned for async host->device copies)."""
    return {name: torch.empty((rows,) + arr.shape[1:], dtype=torch_dtype(arr), pin_memory=pin)
            for name, arr in arrays.items()}


def gather_into(buffers: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Gather `rows` of every array straight into its buffer (one vectorised copy each, no
    temporary); returns the filled leading views. mode="clip" because numpy buffers `out` in
    its default mode="raise"; rows come from a permutation, so they are always in range."""
    out = {}
    for name, arr in arrays.items():
        view = buffers[name][: len(rows)]
        np.take(arr, rows, axis=0, out=view.numpy(), mode="clip")
        out[name] = view
    return out
