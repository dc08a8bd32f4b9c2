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
from typing import Generator, Iterator, Sequence

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


@dataclass(frozen=True)
class DecodeJob:
    """What every decode path needs, resolved once (decode_job)."""
    ds: Dataset
    size: int                  # S: batches are [b, 3, S, S]
    mean: Sequence[float]      # per channel, of pixels in [0, 1]
    std: Sequence[float]
    batch_size: int
    device: torch.device
    on_bad: str                # fail | skip
    workers: int               # DataLoader worker processes, DALI threads
    max_pixels: int            # COOPT_MAX_IMAGE_PIXELS for folders; 0 for in-memory data


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def choose_decoder(decoder: str, ds: Dataset, device: torch.device, input_size: int) -> str:
    """What `auto` picks (bench/results/extract.json has the figures):

    * raw arrays on the CPU: torchvision. At 28-32 px DALI's per-sample external_source feeding
      costs more than the torch ops on a uint8 batch (one resize, one normalise).
    * JPEG folders (every file .jpg/.jpeg) on the CPU: DALI, ~1.2-1.5x torchvision's decode. A
      file among them that is not a JPEG DALI can take (`dali_safe`) is decoded per file.
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


def decode_job(ds: Dataset, input_size: int, mean, std, batch_size: int, device: torch.device,
               on_bad_image: str = "fail", workers: int = 2) -> DecodeJob:
    """What `batches` decodes with, checked once: a bad --on-bad-image or COOPT_MAX_IMAGE_PIXELS is
    one error here, not every file of a worker refused."""
    if on_bad_image not in ("fail", "skip"):
        raise CooptError(f"--on-bad-image {on_bad_image!r}: use fail or skip")
    max_pixels = max_image_pixels() if ds.files is not None else 0
    return DecodeJob(ds=ds, size=input_size, mean=mean, std=std, batch_size=batch_size, device=device,
                     on_bad=on_bad_image, workers=workers, max_pixels=max_pixels)


def batches(job: DecodeJob, rows: np.ndarray, decoder: str = "torchvision") -> Iterator[Batch]:
    """`rows` of job.ds as batches on job.device, decoded by `decoder` (dali or torchvision)."""
    if decoder == "dali":
        yield from _dali_batches(job, rows)
    elif job.ds.images is not None:
        yield from prefetch(_memory_batches(job, rows), depth=2)
    else:
        yield from _folder_batches(job, rows, job.workers)


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


def _memory_batches(job: DecodeJob, rows: np.ndarray) -> Iterator[Batch]:
    bs = job.batch_size
    for b in range(0, len(rows), bs):
        x = preprocess(torch.from_numpy(job.ds.images[rows[b : b + bs]]), job.size, job.mean, job.std)
        yield Batch(b, x.to(job.device, non_blocking=True), [])


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
        # In place: a fresh float batch costs ~3x the decode at 224 px.
        x = out.float().sub_(self.mean).div_(self.std)
        return i * self.bs, x, bad, errors


def _folder_batches(job: DecodeJob, rows: np.ndarray, workers: int) -> Iterator[Batch]:
    """Folder rows decoded file by file in `workers` DataLoader processes (0: in this one)."""
    data = _FolderBatchSet(job.ds.files, rows, job.size, job.mean, job.std, job.batch_size, job.on_bad,
                           job.max_pixels)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=2 if workers else None, persistent_workers=False)
    for start, x, bad, errors in loader:
        if bad and job.on_bad == "fail":
            raise CooptError(errors[0] + " (use --on-bad-image skip to leave it out)")
        yield Batch(start, x.to(job.device, non_blocking=True), bad)


SIZE_PEEK = 64  # folder files whose headers decide whether DALI's resize can be left out


def folder_needs_resize(files, rows: np.ndarray, size: int) -> bool:
    """Whether any of up to SIZE_PEEK files spread over `rows` is not size x size.

    Header reads only (PIL opens lazily), ~0.1 ms a file. A same-size fn.resize is an identity
    that still costs DALI's CPU pipeline half its time at 224 px, so folders already at the
    model's size skip it; a file the peek missed shows up as a batch of mixed shapes, and
    _dali_run then redoes that batch with the resize on.
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


def _dali_pipeline(job: DecodeJob, rows: np.ndarray, resize: bool):
    """A built DALI pipeline over `rows`, resizing to job.size if `resize`."""
    from nvidia.dali import fn, pipeline_def, types

    ds, size, bs, device = job.ds, job.size, job.batch_size, job.device
    gpu = device.type == "cuda"
    mean255, std255 = [m * 255 for m in job.mean], [s * 255 for s in job.std]

    @pipeline_def(batch_size=bs, num_threads=max(1, job.workers), device_id=(device.index or 0) if gpu else None,
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
    error lines, goes per file). Reads the header and the last 2 bytes: tens of us a file,
    against ~1.8 ms to decode a 224 px image in DALI.
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


def _dali_batches(job: DecodeJob, rows: np.ndarray) -> Iterator[Batch]:
    """DALI batches. Folders: a batch holding any file `dali_safe` refuses never reaches DALI: it is
    decoded per file (data.read_image_file), which names (fail) or zero-fills (skip) the bad files,
    and DALI restarts after it. Routing whole batches keeps the batches the same rows as in a clean
    folder; it costs a pipeline build per run of clean batches, which shows only when unsafe files
    are spread through a folder (`auto` sends non-JPEG ones to torchvision). `_dali_run` handles a
    batch DALI still fails on, or one of mixed shapes."""
    bs = job.batch_size
    unsafe, resize = _dali_plan(job, rows)
    start = 0  # always a multiple of bs
    while start < len(rows):
        end = start
        while end < len(rows) and unsafe[end // bs] == unsafe[start // bs]:
            end += bs
        end = min(end, len(rows))
        if unsafe[start // bs]:
            yield from _per_file(job, rows, start, end)
            start = end
            continue
        step = yield from _dali_run(job, rows, start, end, resize)
        if step is None:  # DALI ran out of rows
            return
        start, resize = step


def _dali_plan(job: DecodeJob, rows: np.ndarray) -> tuple[np.ndarray, bool]:
    """(per batch, whether it holds a file DALI must not see; whether DALI must resize)."""
    bs = job.batch_size
    unsafe = np.zeros(-(-len(rows) // bs), dtype=bool)
    if job.ds.images is not None:  # in memory: one shape for all, known
        return unsafe, tuple(job.ds.images.shape[1:3]) != (job.size, job.size)
    resize = folder_needs_resize(job.ds.files, rows, job.size)
    for i, r in enumerate(rows):
        if not unsafe[i // bs] and not dali_safe(job.ds.files[r], job.max_pixels):
            unsafe[i // bs] = True
    return unsafe, resize


def _per_file(job: DecodeJob, rows: np.ndarray, start: int, end: int) -> Iterator[Batch]:
    """Batches of rows[start:end] decoded per file, numbered from `start`."""
    one = end - start <= job.batch_size  # one batch: no worker processes to start for it
    for item in _folder_batches(job, rows[start:end], 0 if one else job.workers):
        yield Batch(start + item.start, item.x, item.bad)


def _dali_run(job: DecodeJob, rows: np.ndarray, start: int, end: int,
              resize: bool) -> Generator[Batch, None, tuple[int, bool] | None]:
    """Batches of rows[start:end] (all DALI-safe) through one pipeline. Returns (where to go on,
    resize), or None when DALI ran out of rows. A batch of mixed shapes (a folder file the size
    peek missed) stops the run there with the resize on; a batch DALI fails on (a JPEG cut or
    corrupt past its header) is decoded per file and the run stops after it."""
    bs = job.batch_size
    p = _dali_pipeline(job, rows[start:end], resize)
    try:
        for b in range(start, end, bs):
            try:
                out, = p.run()
            except StopIteration:
                return None
            if not out.is_dense_tensor():  # only without resize: sizes differ within the batch
                return b, True
            x = torch.from_dlpack(out.as_tensor()).clone()  # DALI reuses its buffers
            if x.shape[-2:] != (job.size, job.size):  # a whole batch of another size: same remedy
                return b, True
            yield Batch(b, x[: min(bs, end - b)].to(job.device, non_blocking=True), [])
        return end, resize
    except StopIteration:
        return None
    except RuntimeError:
        if job.ds.files is None:
            raise
        # The batch at `b` has a bad file: decode it image by image, then restart DALI after it.
        yield from _per_file(job, rows, b, b + bs)
        return b + bs, resize
    finally:
        del p
