"""Dataset specs -> images and labels, plus a content fingerprint.

One spec string names a data set everywhere:
  fashion-mnist            Debian's dataset-fashion-mnist, train split (60,000 x 28x28x1)
  fashion-mnist:test       the test split (10,000)
  folder:PATH              ImageFolder tree (class subfolders -> labels) or a flat folder of images
                           (IMAGE_SUFFIXES; other files and hidden ones are listed in `left_out`)
  npy:IMAGES.npy[,LABELS.npy]   uint8 arrays N x H x W or N x H x W x C

In-memory data sets (fashion-mnist, npy) hold `images` as uint8 [N, H, W, C]. Folder data
sets hold file paths and decode on demand (`read`), since they may not fit in memory.

Decoding one file (`read_image_file`) reads the header first: a declared size over
COOPT_MAX_IMAGE_PIXELS is refused before any pixel is allocated. 8-bit grey/YCbCr JPEGs take
torchvision.io's libjpeg-turbo path; everything else (PNG included: torchvision 0.29's libpng
path dies of SIGSEGV on a corrupt IDAT stream) PIL decodes and converts to grey or RGB, or
refuses with the reason.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CooptError

FASHION_MNIST_DIR = Path(os.environ.get("COOPT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
# What read_image_file decodes (Pillow 13 in .venv has JPEG, PNG, BMP, WebP, TIFF and GIF built
# in); GIF, WebP and TIFF give their first frame.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
# A declared size above this is refused before decoding (a 2 MB PNG may declare 50000 x 50000 px,
# 7.5 GB of RGB). 64 MP holds an 8000x8000 photo (full-frame cameras reach ~61 MP); 100+ MP
# medium-format shots need COOPT_MAX_IMAGE_PIXELS raised.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
MAX_CLASSES = 100_000  # npy labels: the labels prior's one-hot rows have max(label) + 1 entries


@dataclass
class Dataset:
    spec: str
    images: np.ndarray | None = None        # uint8 [N, H, W, C] for in-memory data sets
    files: list[Path] | None = None         # for folder data sets, in sample order
    labels: np.ndarray | None = None        # int64 [N] or None
    classes: list[str] = field(default_factory=list)
    # folder data sets: files not taken, as (path relative to the folder, reason), sorted by path
    left_out: list[tuple[str, str]] = field(default_factory=list)

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
            left_out=self.left_out,
        )


def max_image_pixels() -> int:
    """The largest declared width x height decoded: COOPT_MAX_IMAGE_PIXELS, or the default."""
    raw = os.environ.get("COOPT_MAX_IMAGE_PIXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise CooptError(f"COOPT_MAX_IMAGE_PIXELS: must be a positive whole number of pixels, got {raw!r}")
    return limit


def pil_image():
    """PIL's Image module with its own decompression-bomb check off: COOPT_MAX_IMAGE_PIXELS replaces
    it (PIL's warns on stderr above 89 MP and refuses above 179 MP, whatever the user set)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    return Image


# Formats PIL may open for us: by content, not suffix (a PNG named .jpg is still a PNG), but never
# one whose plugin runs an external program (EPS runs Ghostscript) or that we do not list.
PIL_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")  # JPEG opens MPO files too
SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame codes (T.81 table B.1)
# PIL modes whose convert("RGB") is a colour conversion (checked: HSV, YCbCr, RGBa unpremultiplied).
TO_RGB_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "HSV")
JPEG_HUFFMAN_SOF = (0xC0, 0xC1, 0xC2)  # baseline, extended, progressive: what every decoder here handles


def jpeg_header(f) -> tuple[int, int, int, int, int] | None:
    """(SOF marker, bits per sample, height, width, components) of the JPEG stream in binary file f,
    walking its marker segments from SOI to the first scan (SOS) the way DALI's parser does; None
    unless f starts FF D8 FF, every segment is whole and one SOF comes before the scan. Every
    header DALI's parser cannot read (which kills DALI's CPU pipeline: SIGSEGV) fails this walk
    too; it is stricter about length fields below 2 and a second SOF.

    Reads only the header (a few hundred bytes; up to ~64 KB per EXIF/ICC segment, skipped by seek)."""
    if f.read(3) != b"\xff\xd8\xff":
        return None
    f.seek(2)
    sof = None
    while True:
        m = f.read(2)
        if len(m) < 2 or m[0] != 0xFF:
            return None
        code = m[1]
        while code == 0xFF:  # fill bytes before a marker code
            b = f.read(1)
            if not b:
                return None
            code = b[0]
        if code == 0xDA:
            return sof
        length = f.read(2)
        if code == 0 or len(length) < 2 or int.from_bytes(length, "big") < 2:
            return None
        n = int.from_bytes(length, "big") - 2
        if code in SOF_MARKERS:
            body = f.read(n)
            if sof is not None or len(body) < 6 or len(body) < 6 + 3 * body[5]:
                return None
            sof = (code, body[0], int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5])
        else:
            f.seek(n, io.SEEK_CUR)  # past the end is caught by the next read coming up short


def check_image_size(path, width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise CooptError(f"{path}: declares {width}x{height} pixels ({width * height / 1e6:.1f} MP), over the limit "
                         f"of {limit} pixels (COOPT_MAX_IMAGE_PIXELS)")
    if width == 0 or height == 0:
        raise CooptError(f"{path}: declares an empty image ({width}x{height} pixels)")


def read_image_file(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode one image file to uint8 HxWxC (C = 1 or 3), or raise a CooptError naming it.

    The header decides, before any pixel is allocated: over `max_pixels` (default
    max_image_pixels()) is refused; 8-bit grey/YCbCr Huffman JPEGs go to torchvision.io (the
    fast path: 380 vs 640 us for PIL on a 224 px JPEG); the rest (PNG, CMYK JPEG, TIFF, BMP,
    WebP, GIF) to PIL, converted by `_pil_pixels`.
    """
    limit = max_image_pixels() if max_pixels is None else max_pixels
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CooptError(f"{path}: cannot read ({e.strerror or e})") from None
    jpeg = jpeg_header(io.BytesIO(data))
    if jpeg is not None and jpeg[0] in JPEG_HUFFMAN_SOF and jpeg[1] == 8 and jpeg[4] in (1, 3):
        check_image_size(path, jpeg[3], jpeg[2], limit)
        return _torchvision_pixels(path, data)
    Image = pil_image()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on stderr about odd metadata; the pixels decide
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
                check_image_size(path, *im.size, limit)
                im.load()
                return _pil_pixels(path, im)
    except CooptError:
        raise
    except Exception as e:  # a hostile file makes PIL raise anything: OSError, ValueError, SyntaxError, EOFError...
        raise CooptError(f"{path}: cannot decode image ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    if type(e).__name__ == "UnidentifiedImageError":  # its message names a BytesIO object, not the file
        return f"no readable {', '.join(PIL_FORMATS[:-1])} or {PIL_FORMATS[-1]} header"
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line.rsplit(".cpp:", 1)[-1].lstrip("0123456789, ") if ".cpp:" in line else line  # torchvision's C++ site


def _torchvision_pixels(path, data: bytes) -> np.ndarray:
    import torch
    from torchvision.io import ImageReadMode, decode_image

    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except (OSError, RuntimeError) as e:
        raise CooptError(f"{path}: cannot decode image ({_first_line(e)})") from None
    return img.permute(1, 2, 0).numpy()  # JPEG: 1 or 3 channels, uint8 (the header said so)


def _pil_pixels(path, im) -> np.ndarray:
    """A loaded PIL image -> uint8 HxWx1 (grey modes) or HxWx3 (everything else, palettes expanded).

    16-bit grey (I;16) becomes round(v / 257), the nearest 8-bit level. PIL itself reads 16-bit
    colour PNG/TIFF as 8-bit RGB(A) keeping the high byte, v >> 8, which is within one level of
    that. Float (F) is read as [0, 1], the usual convention, and refused outside it; 32-bit
    integer (I) has no convention, so it is refused.
    """
    if im.mode.startswith("I;16"):
        a = (np.asarray(im).astype(np.int32) + 128) // 257
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise CooptError(f"{path}: float pixels (PIL mode F) must lie in [0, 1], found "
                             f"[{np.nanmin(a):.4g}, {np.nanmax(a):.4g}]")
        a = np.rint(a * 255)
    elif im.mode == "I":
        raise CooptError(f"{path}: 32-bit integer pixels (PIL mode I) have no standard 8-bit scale; "
                         f"save the image with 8 or 16 bits per sample")
    elif im.mode in ("1", "L", "LA", "La"):
        a = np.asarray(im.convert("L"))
    elif im.mode in TO_RGB_MODES:
        a = np.asarray(im.convert("RGB"))
    else:  # e.g. LAB (CIELab TIFF), which PIL's convert would copy channel by channel, unconverted
        raise CooptError(f"{path}: pixel mode {im.mode!r} has no conversion to RGB here; save the image as RGB")
    a = a.astype(np.uint8)
    return a[..., None] if a.ndim == 2 else a


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """The MNIST idx format: big-endian magic (0, 0, dtype 0x08 = uint8, ndim), dims, raw data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CooptError(
            f"{path}: not found; install it with `apt-get install -y dataset-fashion-mnist`"
        ) from None
    except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, corrupt
        raise CooptError(f"{path}: not a readable gzip file ({_first_line(e)})") from None
    head = 4 + 4 * ndim
    if len(raw) < head or raw[:3] != b"\0\0\x08" or raw[3] != ndim:
        raise CooptError(f"{path}: not an idx file of uint8 with {ndim} dimension(s) (starts {raw[:4].hex()})")
    dims = np.frombuffer(raw[4:head], dtype=">u4").astype(np.int64)
    if int(np.prod(dims)) != len(raw) - head:
        raise CooptError(f"{path}: header declares {'x'.join(map(str, dims))} = {int(np.prod(dims))} bytes of data, "
                         f"the file holds {len(raw) - head}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def _load_fashion_mnist(split: str) -> Dataset:
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    images = _read_idx(images_path, 3)[..., None]
    labels = _read_idx(labels_path, 1).astype(np.int64)
    if 0 in images.shape:
        raise CooptError(f"{images_path}: empty images, shape {images.shape[:3]}")
    if len(labels) != len(images):
        raise CooptError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise CooptError(f"{labels_path}: label {labels.max()} is not one of the {len(FASHION_MNIST_CLASSES)} classes")
    spec = "fashion-mnist" if split == "train" else "fashion-mnist:test"
    return Dataset(spec, images=images, labels=labels, classes=list(FASHION_MNIST_CLASSES))


def _load_array(path: str, what: str) -> np.ndarray:
    """One .npy array, memory-mapped; never unpickled (allow_pickle stays False)."""
    try:
        a = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:  # missing, a pickle, object dtype, truncated, empty
        raise CooptError(f"{path}: cannot load {what} ({_first_line(e)})") from None
    if not isinstance(a, np.ndarray):  # np.load opens an .npz archive as a dict of arrays
        names = ", ".join(a.files[:5])
        a.close()
        raise CooptError(f"{path}: an .npz archive ({names}); npy: takes a .npy file holding one array")
    return a


def _load_npy(spec: str, arg: str) -> Dataset:
    parts = arg.split(",")
    if len(parts) > 2 or not parts[0]:
        raise CooptError(f"{spec}: expected npy:IMAGES.npy or npy:IMAGES.npy,LABELS.npy")
    images = _load_array(parts[0], "images")
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise CooptError(f"{parts[0]}: images must be uint8 N×H×W or N×H×W×C, got {images.dtype} {images.shape}")
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] not in (1, 3):
        raise CooptError(f"{parts[0]}: channel dimension must be 1 or 3, got {images.shape[-1]}")
    if 0 in images.shape[:3]:
        raise CooptError(f"{parts[0]}: empty images, shape {images.shape[:3]} (N, H and W must be >= 1)")
    labels, classes = None, []
    if len(parts) == 2:
        labels = _load_array(parts[1], "labels")
        if labels.dtype.kind not in "iu":  # floats would be truncated, strings parsed: neither is a class id
            raise CooptError(f"{parts[1]}: labels must be integer class ids, got dtype {labels.dtype}")
        if labels.shape != (len(images),):
            raise CooptError(f"{parts[1]}: labels shape {labels.shape} does not match {len(images)} images")
        if labels.min() < 0:
            raise CooptError(f"{parts[1]}: labels must be non-negative class ids")
        if labels.max() >= MAX_CLASSES:
            raise CooptError(f"{parts[1]}: label {labels.max()} is past the {MAX_CLASSES} classes supported")
        labels = labels.astype(np.int64)
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    return Dataset(spec, images=np.ascontiguousarray(images), labels=labels, classes=classes)


def _left_out_reason(root: Path, p: Path) -> str | None:
    """Why folder entry p is not a sample; None when it is one."""
    if any(part.startswith(".") for part in p.relative_to(root).parts):
        return "hidden"  # .DS_Store, macOS ._x.jpg resource forks, .ipynb_checkpoints/
    if not p.is_file():
        return "not a regular file"  # a broken link, a FIFO (reading it would block), a socket
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        return f"suffix {p.suffix!r} is not an image format" if p.suffix else "no file suffix"
    return None


def _load_folder(spec: str, arg: str) -> Dataset:
    root = Path(arg)
    if not root.is_dir():
        raise CooptError(f"{root}: not a directory")
    try:
        entries = sorted(root.iterdir())
    except OSError as e:
        raise CooptError(f"{root}: cannot list ({e.strerror or e})") from None
    subdirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    files, labels, left_out = [], [], []
    if subdirs:  # ImageFolder: class subfolders, sorted by name like torchvision
        for c, d in enumerate(subdirs):
            for p in sorted(d.rglob("*")):
                if p.is_dir():
                    continue
                why = _left_out_reason(root, p)
                if why is None:
                    files.append(p)
                    labels.append(c)
                else:
                    left_out.append((str(p.relative_to(root)), why))
        left_out += [(p.name, _left_out_reason(root, p) or "outside the class folders")
                     for p in entries if p not in subdirs]
        classes = [d.name for d in subdirs]
        labels = np.asarray(labels, dtype=np.int64)
    else:
        for p in entries:
            why = _left_out_reason(root, p)
            if why is None:
                files.append(p)
            else:
                left_out.append((p.name, why))
        labels, classes = None, []
    left_out.sort()
    if not files:
        seen = f"; {len(left_out)} files left out, e.g. {left_out[0][0]} ({left_out[0][1]})" if left_out else ""
        raise CooptError(f"{root}: no images found (suffixes {' '.join(sorted(IMAGE_SUFFIXES))}){seen}")
    return Dataset(spec, files=files, labels=labels, classes=classes, left_out=left_out)


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
            try:
                h.update(p.read_bytes())
            except OSError as e:  # unreadable (permissions), vanished, or a folder named like an image
                raise CooptError(f"{p}: cannot read ({e.strerror or e})") from None
    if ds.labels is not None:
        h.update(np.ascontiguousarray(ds.labels).data)
    return {"n": len(ds), "shape": list(ds.shape) if ds.shape else None, "sha256": h.hexdigest()}
