"""Decoding: rows of a data set -> batches of normalised [B, 3, S, S] float tensors on the device.

Two paths with one contract (`batches`), so extract and the benchmark can swap them:
  dali         NVIDIA DALI. In-memory data (Fashion-MNIST, npy) enters through
               fn.external_source; folders through fn.readers.file over the shard's files in
               plan order. Decode (device "mixed" on a GPU, "cpu" otherwise), resize and
               normalise run inside the pipeline, in DALI's own threads, prefetching ahead of
               the model; on a GPU the batch reaches torch through DLPack, no host round trip.
  torchvision  the fallback when DALI is missing, and the benchmarks' baseline. In-memory data:
               torch ops on uint8 batches (priors.preprocess). Folders: torchvision.io.decode_image
               (libjpeg-turbo/libpng) and v2 resize in DataLoader workers, one batch per task.
Both resize in uint8 with antialiasing and then normalise, except the torch path for in-memory
data, which resizes in float: features agree within ~1/255 per input pixel (see tests).

A batch also reports which of its rows were bad images (`--on-bad-image skip`): their rows are
zeros and the caller records them; with `fail` the first bad file raises a CooptError naming it.

DALI sees only files `dali_safe` passes (8-bit Huffman JPEGs whose header parses, within
COOPT_MAX_IMAGE_PIXELS): DALI 2.4's CPU decoder kills the process (SIGSEGV, exit 139) on a file
whose header its parser cannot read, e.g. a text file named .jpg, which --on-bad-image cannot
catch. Every other file is decoded by the per-file path (data.read_image_file).
"""
from __future__ import annotations

import io
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
# Imported here, not in the workers: each forked DataLoader worker importing it lazily cost ~3 s.
from torchvision.transforms.v2 import functional as TF

from .data import JPEG_HUFFMAN_SOF, Dataset, jpeg_header, max_image_pixels, pil_image, read_image_file
from .errors import CooptError
from .priors import preprocess


@dataclass
class Batch:
    start: int                 # position of the first row within the rows being decoded
    x: torch.Tensor            # [b, 3, S, S] float32, normalised, on the target device
    bad: list[int]             # positions (within this batch) of images that failed to decode


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def choose_decoder(decoder: str, ds: Dataset, device: torch.device, input_size: int) -> str:
    """`auto`, by bench/results/extract.json (2-core CPU, 2 decode threads each side):

    * raw arrays on the CPU: torchvision. The torch ops on a uint8 batch (one resize, one
      normalise) beat DALI's external_source pipeline, whose per-sample feeding and copies
      cost more than the work itself at 28-32 px (20.8k vs 13.8k img/s decode-only; noisy
      under load, and end-to-end is model-bound either way).
    * JPEG folders (every file .jpg/.jpeg) on the CPU: DALI (decode-only 1.24x torchvision at
      64 px, 1.29x at 224 px, 1.5x when shrinking 224 -> 160 or 112 px). A file among them that
      is not a JPEG DALI can take (`dali_safe`) is decoded per file.
    * folders with other formats: torchvision; DALI would only hand them back (see `dali_safe`).
    * CUDA: DALI (decode on the GPU with `mixed`, no host round trip).
    """
    if decoder not in ("auto", "dali", "torchvision"):
        raise CooptError(f"--decoder {decoder!r}: use dali, torchvision or auto")
    if decoder == "dali" and not dali_available():
        raise CooptError("--decoder dali: nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
    if decoder != "auto":
        return decoder
    if not dali_available():
        return "torchvision"
    if device.type == "cuda":
        return "dali"
    if ds.files is None or any(p.suffix.lower() not in (".jpg", ".jpeg") for p in ds.files):
        return "torchvision"
    return "dali"


def batches(ds: Dataset, rows: np.ndarray, input_size: int, mean, std, batch_size: int, device: torch.device,
            decoder: str = "torchvision", on_bad_image: str = "fail", workers: int = 2) -> Iterator[Batch]:
    if on_bad_image not in ("fail", "skip"):
        raise CooptError(f"--on-bad-image {on_bad_image!r}: use fail or skip")
    # Read once, here: a bad value must be one error, not every file of a worker refused.
    max_pixels = max_image_pixels() if ds.files is not None else 0
    if decoder == "dali":
        yield from _dali_batches(ds, rows, input_size, mean, std, batch_size, device, on_bad_image, workers,
                                 max_pixels)
    elif ds.images is not None:
        yield from prefetch(_memory_batches(ds, rows, input_size, mean, std, batch_size, device), depth=2)
    else:
        yield from _folder_batches(ds, rows, input_size, mean, std, batch_size, device, on_bad_image, workers,
                                   max_pixels)


def prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run `it` in a background thread, `depth` items ahead: decode of i+1 overlaps the model on i.

    Torch ops release the GIL, so the overlap is real on a multi-core CPU.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _memory_batches(ds, rows, size, mean, std, bs, device) -> Iterator[Batch]:
    for b in range(0, len(rows), bs):
        x = preprocess(torch.from_numpy(ds.images[rows[b : b + bs]]), size, mean, std)
        yield Batch(b, x.to(device, non_blocking=True), [])


class _FolderBatchSet(torch.utils.data.Dataset):
    """One item = one whole batch, so workers return batches (one IPC message per batch)."""

    def __init__(self, files, rows, size, mean, std, bs, on_bad, max_pixels=None):  # None: read the env var
        self.files, self.rows, self.size, self.bs, self.on_bad = files, rows, size, bs, on_bad
        self.max_pixels = max_pixels
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255

    def __len__(self):
        return -(-len(self.rows) // self.bs)

    def __getitem__(self, i):
        rows = self.rows[i * self.bs : (i + 1) * self.bs]
        out = torch.zeros(len(rows), 3, self.size, self.size, dtype=torch.uint8)
        bad, errors = [], []
        for j, r in enumerate(rows):
            try:
                img = torch.from_numpy(read_image_file(self.files[r], self.max_pixels)).permute(2, 0, 1)
            except CooptError as e:
                bad.append(j)
                errors.append(str(e))
                continue
            if img.shape[0] == 1:
                img = img.expand(3, -1, -1)
            out[j] = TF.resize(img, [self.size, self.size], antialias=True)
        # In place: fresh float batches cost ~3x the decode at 224 px (bench_extract).
        x = out.float().sub_(self.mean).div_(self.std)
        return i * self.bs, x, bad, errors


def _folder_batches(ds, rows, size, mean, std, bs, device, on_bad, workers, max_pixels) -> Iterator[Batch]:
    data = _FolderBatchSet(ds.files, rows, size, mean, std, bs, on_bad, max_pixels)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=2 if workers else None, persistent_workers=False)
    for start, x, bad, errors in loader:
        if bad and on_bad == "fail":
            raise CooptError(errors[0] + " (use --on-bad-image skip to leave it out)")
        yield Batch(start, x.to(device, non_blocking=True), bad)


SIZE_PEEK = 64  # folder files whose headers decide whether DALI's resize can be left out


def folder_needs_resize(files, rows: np.ndarray, size: int) -> bool:
    """Whether any of up to SIZE_PEEK files spread over `rows` is not size x size.

    Header reads only (PIL opens lazily), ~0.1 ms a file. A same-size fn.resize is an identity
    that costs DALI's CPU pipeline half its time at 224 px (bench_extract: 1,169 vs 2,385 img/s),
    so folders already at the model's size skip it; a file the peek missed shows up as a batch
    of mixed shapes, and _dali_batches then redoes that batch with the resize on.
    """
    Image = pil_image()  # a huge declared size must not print PIL's bomb warning here

    if len(rows) == 0:
        return False
    for r in np.unique(rows[np.linspace(0, len(rows) - 1, min(SIZE_PEEK, len(rows))).astype(np.int64)]):
        try:
            with Image.open(files[r]) as im:
                if im.size != (size, size):
                    return True
        except Exception:  # unreadable header: keep the resize; the decoder names bad files
            return True
    return False


def _dali_pipeline(ds, rows, size, mean, std, bs, device, workers, resize: bool):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"
    mean255, std255 = [m * 255 for m in mean], [s * 255 for s in std]

    @pipeline_def(batch_size=bs, num_threads=max(1, workers), device_id=(device.index or 0) if gpu else None,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        if ds.images is not None:
            def source():  # called once per batch by DALI's executor, in plan order
                for b in range(0, len(rows), bs):
                    yield list(ds.images[rows[b : b + bs]])

            img = fn.external_source(source=source(), layout="HWC", dtype=types.UINT8, cycle=False)
            if gpu:
                img = img.gpu()
            if ds.images.shape[-1] == 1:
                img = fn.color_space_conversion(img, image_type=types.GRAY, output_type=types.RGB)
        else:
            enc, _ = fn.readers.file(files=[str(ds.files[r]) for r in rows], random_shuffle=False,
                                     pad_last_batch=True, name="reader")
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if resize:
            img = fn.resize(img, resize_x=size, resize_y=size, antialias=True)
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=mean255, std=std255)

    p = pipe()
    p.build()
    return p


def dali_safe(path, max_pixels: int) -> bool:
    """Whether DALI may decode `path`: a JPEG (FF D8 FF) whose markers parse up to the first scan as
    DALI's parser reads them (`jpeg_header`), baseline/extended/progressive Huffman with 8 bits and
    1 or 3 components (what DALI was tried on; CMYK, 12-bit, lossless, arithmetic go per file),
    1..max_pixels pixels, ending with EOI (FF D9: a cut-off file, on which DALI prints its own
    error lines, goes per file). Reads the header and the last 2 bytes: 28-44 us a file on the
    2-core test machine under load, against ~1.8 ms a 224 px image through DALI (400 JPEGs:
    474-570 img/s with the probe, 479-561 without; the difference is within the noise).
    """
    try:
        with open(path, "rb") as f:
            head = jpeg_header(f)
            if head is None:
                return False
            f.seek(-2, io.SEEK_END)
            if f.read(2) != b"\xff\xd9":
                return False
    except OSError:
        return False
    sof, bits, height, width, components = head
    return sof in JPEG_HUFFMAN_SOF and bits == 8 and components in (1, 3) and 0 < width * height <= max_pixels


def _dali_batches(ds, rows, size, mean, std, bs, device, on_bad, workers, max_pixels) -> Iterator[Batch]:
    """DALI batches. Folders: a batch holding any file `dali_safe` refuses never reaches DALI: it is
    decoded per file (data.read_image_file), which names (fail) or zero-fills (skip) the bad files,
    and DALI restarts after it. Routing whole batches keeps the batches the same rows as in a clean
    folder and reuses the restart below; it costs a pipeline build per run of clean batches, which
    shows only when unsafe files are spread through a folder (`auto` sends non-JPEG ones to
    torchvision). A batch DALI still fails on (a JPEG cut or corrupt past its header) is redone the
    same way. A batch of mixed shapes (a folder file the size peek missed) restarts DALI at that
    batch with the resize on."""
    unsafe = np.zeros(-(-len(rows) // bs), dtype=bool)  # per batch
    if ds.images is not None:  # in memory: one shape for all, known
        resize = tuple(ds.images.shape[1:3]) != (size, size)
    else:
        resize = folder_needs_resize(ds.files, rows, size)
        for i, r in enumerate(rows):
            if not unsafe[i // bs] and not dali_safe(ds.files[r], max_pixels):
                unsafe[i // bs] = True
    start = 0  # always a multiple of bs
    while start < len(rows):
        end = start
        while end < len(rows) and unsafe[end // bs] == unsafe[start // bs]:
            end += bs
        end = min(end, len(rows))
        if unsafe[start // bs]:
            one = end - start <= bs  # one batch: no worker processes to start for it
            for item in _folder_batches(ds, rows[start:end], size, mean, std, bs, device, on_bad,
                                        0 if one else workers, max_pixels):
                yield Batch(start + item.start, item.x, item.bad)
            start = end
            continue
        p = _dali_pipeline(ds, rows[start:end], size, mean, std, bs, device, workers, resize)
        try:
            for b in range(start, end, bs):
                try:
                    out, = p.run()
                except StopIteration:
                    return
                if not out.is_dense_tensor():  # only without resize: sizes differ within the batch
                    resize = True
                    break
                x = torch.from_dlpack(out.as_tensor()).clone()  # DALI reuses its buffers
                if x.shape[-2:] != (size, size):  # a whole batch of another size: same remedy
                    resize = True
                    break
                yield Batch(b, x[: min(bs, end - b)].to(device, non_blocking=True), [])
                start = b + bs
            else:
                start = end
        except StopIteration:
            return
        except RuntimeError:
            if ds.files is None:
                raise
            # The batch at `start` has a bad file: decode it image by image, then restart DALI.
            fallback = _folder_batches(ds, rows[start : start + bs], size, mean, std, bs, device, on_bad, 0,
                                       max_pixels)
            for item in fallback:
                yield Batch(start, item.x, item.bad)
            start += bs
        finally:
            del p
