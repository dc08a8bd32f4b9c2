"""Hostile and odd image files (issue 13, images): what DALI may see, a declared-size limit, exact
pixels for every mode PIL opens, the formats a folder takes and what it leaves out, and npy /
Fashion-MNIST files that are not what they claim.

Files that once killed the process (SIGSEGV: a text file named .jpg or a JPEG cut in its header
under DALI, a PNG with a corrupt IDAT stream under torchvision's libpng) are only ever decoded in a
subprocess here, so a regression fails one test instead of taking pytest down with it.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import coopt_fast
from coopt_fast import data
from coopt_fast.data import fingerprint, load_dataset, read_image_file
from coopt_fast.decode import batches, choose_decoder, dali_safe, decode_job, folder_needs_resize
from coopt_fast.errors import CooptError

from .test_bad_inputs import ROOT, needs_dali, py, refused, refused_subprocess

CPU = torch.device("cpu")
HALF = [0.5, 0.5, 0.5]


# ---- files, built with PIL (and by hand where PIL cannot write them) ------------------------

def pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def jpeg(seed: int = 0, side: int = 12, **kw) -> bytes:
    rng = np.random.default_rng(seed)
    return pil_bytes(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), "JPEG", quality=90, **kw)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(width: int, height: int, depth: int, colour: int, rows: list[bytes] | None = None, idat=None) -> bytes:
    """A PNG by hand: PIL cannot write 16-bit colour, nor a header that lies about the data."""
    if idat is None:
        idat = zlib.compress(b"".join(b"\0" + r for r in rows))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def with_sof_size(jpg: bytes, height: int, width: int) -> bytes:
    """The same JPEG declaring another size in its frame header (the scan data stays 12x12)."""
    i = jpg.index(b"\xff\xc0") + 5
    return jpg[:i] + struct.pack(">HH", height, width) + jpg[i + 4:]


def text_file() -> bytes:
    return b"hello, this is not an image\n"


def huge_jpeg() -> bytes:
    return with_sof_size(jpeg(), 50000, 50000)  # 2.5 GP: 7.5 GB of RGB if decoded


def huge_png() -> bytes:  # 50000 x 50000 declared, a few hundred bytes of IDAT
    return raw_png(50000, 50000, 8, 2, idat=zlib.compress(bytes(50000 * 3 + 1)))


def corrupt_idat_png() -> bytes:  # a valid header, then a zlib stream that is not one
    return raw_png(12, 12, 8, 2, idat=b"garbage!" * 10)


def cut_jpeg() -> bytes:  # cut in the middle of the entropy-coded data: no EOI
    j = jpeg(seed=7, side=64)
    return j[: len(j) // 2]


# ---- pixels: every mode to exact grey or RGB values ------------------------------------------

V16 = [0, 200, 28617, 65535]  # round(v / 257) = 0, 1, 111, 255; the low byte of 28617 is 201


def _palette() -> Image.Image:
    im = Image.new("P", (4, 2))
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putpixel((1, 0), 1)
    return im


PALETTE_PIXELS = np.array([[[10, 20, 30], [200, 100, 50], [10, 20, 30], [10, 20, 30]], [[10, 20, 30]] * 4], np.uint8)
PIXELS = {  # name -> (file bytes, suffix, expected uint8 HxWxC)
    "png-16bit-grey": (pil_bytes(Image.fromarray(np.array([V16], np.uint16)), "PNG"), ".png",
                       np.array([[[0], [1], [111], [255]]], np.uint8)),
    "tiff-16bit-grey": (pil_bytes(Image.fromarray(np.array([V16], np.uint16)), "TIFF"), ".tif",
                        np.array([[[0], [1], [111], [255]]], np.uint8)),
    # PIL keeps the high byte of 16-bit colour (v >> 8): 200 -> 0 where round(200 / 257) = 1
    "png-16bit-rgb": (raw_png(2, 1, 16, 2, [struct.pack(">6H", 28617, 200, 65535, 0, 32896, 65280)]), ".png",
                      np.array([[[111, 0, 255], [0, 128, 255]]], np.uint8)),
    "png-palette": (pil_bytes(_palette(), "PNG"), ".png", PALETTE_PIXELS),  # the colours, not the indices
    "gif-palette": (pil_bytes(_palette(), "GIF"), ".gif", PALETTE_PIXELS),
    "png-1bit": (pil_bytes(Image.fromarray(np.array([[True, False, True]])), "PNG"), ".png",
                 np.array([[[255], [0], [255]]], np.uint8)),
    "png-grey-alpha": (pil_bytes(Image.new("LA", (2, 2), (77, 9)), "PNG"), ".png", np.full((2, 2, 1), 77, np.uint8)),
    "png-rgba": (pil_bytes(Image.new("RGBA", (2, 2), (1, 2, 3, 4)), "PNG"), ".png",
                 np.tile(np.array([1, 2, 3], np.uint8), (2, 2, 1))),
    "jpeg-cmyk": (pil_bytes(Image.new("CMYK", (8, 8), (0, 0, 0, 128)), "JPEG", quality=100), ".jpg",
                  np.full((8, 8, 3), 127, np.uint8)),  # K 128 -> grey 127; the raw channels read 255
    "tiff-float": (pil_bytes(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)), "TIFF"), ".tif",
                   np.array([[[0], [128], [255]]], np.uint8)),
    "bmp": (pil_bytes(Image.new("RGB", (3, 2), (1, 2, 3)), "BMP"), ".bmp",
            np.tile(np.array([1, 2, 3], np.uint8), (2, 3, 1))),
    "webp-lossless": (pil_bytes(Image.new("RGB", (3, 2), (10, 200, 30)), "WEBP", lossless=True), ".webp",
                      np.tile(np.array([10, 200, 30], np.uint8), (2, 3, 1))),
}


@pytest.mark.parametrize("name", list(PIXELS))
def test_pixels_of_every_mode(tmp_path, name):
    raw, suffix, want = PIXELS[name]
    p = tmp_path / f"x{suffix}"
    p.write_bytes(raw)
    got = read_image_file(p)
    assert got.dtype == np.uint8 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    if name == "jpeg-cmyk":  # lossy: within JPEG's error
        assert np.abs(got.astype(int) - want).max() <= 3, got[0, 0]
    else:
        bad = np.argwhere(got != want)
        assert not len(bad), f"first mismatch at {tuple(bad[0])}: got {got[tuple(bad[0])]}, want {want[tuple(bad[0])]}"


@pytest.mark.parametrize("raw, field", [
    (pil_bytes(Image.fromarray(np.array([[3.0, 0.5]], np.float32)), "TIFF"), "must lie in [0, 1], found [0.5, 3]"),
    (pil_bytes(Image.fromarray(np.array([[7, 1000]], np.int32)), "TIFF"), "32-bit integer pixels"),
    (pil_bytes(Image.new("LAB", (2, 2), (50, 0, 0)), "TIFF"), "pixel mode 'LAB'"),
    (text_file(), "no readable JPEG, PNG, BMP, WEBP, TIFF or GIF header"),
    (b"", "no readable"),
    (PIXELS["tiff-16bit-grey"][0][:60], "cannot decode image"),
], ids=["float-out-of-range", "int32", "lab", "text", "empty", "cut-tiff"])
def test_pixels_refused(tmp_path, raw, field):
    p = tmp_path / "x.tif"
    p.write_bytes(raw)
    with pytest.raises(CooptError) as e:
        read_image_file(p)
    assert str(e.value).startswith(f"{p}: ") and field in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---- the declared-size limit ------------------------------------------------------------------

@pytest.mark.parametrize("raw, suffix", [
    (with_sof_size(jpeg(), 3000, 3000), ".jpg"),
    (raw_png(3000, 3000, 8, 2, idat=zlib.compress(bytes(3000 * (3000 * 3 + 1)))), ".png"),  # whole: see below
    (pil_bytes(Image.new("L", (3000, 3000)), "GIF")[:200], ".gif"),
], ids=["jpeg", "png", "gif"])
def test_declared_size_over_the_limit_is_refused_before_decoding(tmp_path, monkeypatch, raw, suffix):
    """3000x3000 declared, the limit at 1 MP: were the check lost, 27 MB would be decoded, not 7.5
    GB (the 50000x50000 files run in a subprocess below). The PNG is whole, since torchvision's
    libpng, which once decoded PNGs, dies of SIGSEGV on missing data; the JPEG holds 12x12 px."""
    monkeypatch.setenv("COOPT_MAX_IMAGE_PIXELS", "1000000")
    p = tmp_path / f"big{suffix}"
    p.write_bytes(raw)
    with pytest.raises(CooptError) as e:
        read_image_file(p)
    assert str(e.value) == (f"{p}: declares 3000x3000 pixels (9.0 MP), over the limit of 1000000 pixels "
                            f"(COOPT_MAX_IMAGE_PIXELS)")


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, raw in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(raw)
    return root


def _jpeg_folder(root: Path, n: int = 6, extra: dict[str, bytes] | None = None) -> Path:
    """n 12x12 JPEGs in class folders c0, c1, and the `extra` files (relative path -> bytes)."""
    return _folder(root, {**{f"c{i % 2}/{i:03d}.jpg": jpeg(seed=i) for i in range(n)}, **(extra or {})})


def test_limit_is_configurable_on_the_command_line(tmp_path, monkeypatch):
    """12x12 = 144 px: a limit of 143 refuses the first image extract meets, 144 takes them all."""
    imgs = _jpeg_folder(tmp_path / "imgs", n=4)
    run = tmp_path / "run"
    coopt_fast.split(f"folder:{imgs}", run, participants=1, shared_fraction=0.25)
    args = ("extract", run, "--participant", "p", "--shard", 0, "--prior", "linear", "--decoder", "torchvision",
            "--workers", 1, "--quiet")
    monkeypatch.setenv("COOPT_MAX_IMAGE_PIXELS", "143")
    refused(tmp_path, args, "12x12 pixels", "over the limit of 143 pixels (COOPT_MAX_IMAGE_PIXELS)")
    monkeypatch.setenv("COOPT_MAX_IMAGE_PIXELS", "lots")
    refused(tmp_path, args, "COOPT_MAX_IMAGE_PIXELS: must be a positive whole number of pixels, got 'lots'")
    monkeypatch.setenv("COOPT_MAX_IMAGE_PIXELS", "144")
    assert coopt_fast.extract(run, "p", 0, "linear", decoder="torchvision", workers=1, progress=False)["rows"] == 4


def test_no_pil_bomb_warning(tmp_path):
    """PIL warns (on stderr, from the CLI) above its own 89 MP; our limit replaces its check."""
    imgs = _jpeg_folder(tmp_path / "imgs", n=2, extra={"c0/big.jpg": with_sof_size(jpeg(), 10000, 10000)})
    ds = load_dataset(f"folder:{imgs}")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert folder_needs_resize(ds.files, np.arange(len(ds)), 12)
    assert not [w for w in seen if "DecompressionBomb" in w.category.__name__], [str(w.message) for w in seen]


# ---- which files DALI may see ----------------------------------------------------------------

def _app_segment_past_eof(j: bytes) -> bytes:
    return j[:2] + b"\xff\xe0\xff\xf0" + b"x" * 10  # declares 65520 bytes, has 10


DALI_SAFE = [
    ("baseline", jpeg(), True),
    ("progressive", jpeg(progressive=True), True),
    ("grey", pil_bytes(Image.new("L", (8, 8), 77), "JPEG"), True),
    ("with-exif", jpeg(exif=Image.Exif()), True),
    ("text", text_file(), False),
    ("empty", b"", False),
    ("magic-only", b"\xff\xd8\xff", False),
    ("cut-in-header", jpeg()[:50], False),
    ("cut-in-scan", cut_jpeg(), False),
    ("huge", huge_jpeg(), False),
    ("zero-height", with_sof_size(jpeg(), 0, 12), False),
    ("cmyk", pil_bytes(Image.new("CMYK", (8, 8)), "JPEG"), False),
    ("png-named-jpg", pil_bytes(Image.new("RGB", (8, 8)), "PNG"), False),
    ("segment-past-eof", _app_segment_past_eof(jpeg()), False),
    ("segment-length-0", jpeg()[:2] + b"\xff\xe0\x00\x00" + jpeg()[2:], False),
]


@pytest.mark.parametrize("raw, safe", [(r, s) for _, r, s in DALI_SAFE], ids=[n for n, _, _ in DALI_SAFE])
def test_dali_safe(tmp_path, raw, safe):
    p = tmp_path / "x.jpg"
    p.write_bytes(raw)
    assert dali_safe(p, 64_000_000) is safe


@needs_dali
def test_auto_decoder_on_mixed_folders(tmp_path):
    def auto(extra=None):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        return choose_decoder("auto", load_dataset(f"folder:{_jpeg_folder(root, 4, extra)}"), CPU, 32)

    assert auto() == "dali"
    assert auto({"c0/bad.jpg": text_file()}) == "dali"  # DALI, with bad.jpg routed per file (see below)
    assert auto({"c0/x.png": PIXELS["png-rgba"][0]}) == "torchvision"
    assert auto({"c1/x.bmp": PIXELS["bmp"][0]}) == "torchvision"


@needs_dali
def test_dali_only_sees_safe_files_and_the_rest_decode_per_file(tmp_path, monkeypatch):
    """20 JPEGs with a PNG, a CMYK JPEG and a cut JPEG among them, batches of 4: the batches holding
    those go per file, DALI restarts around them, and every row matches the per-file decoder."""
    import coopt_fast.decode as decode

    files = {f"{i:03d}.jpg": jpeg(seed=i) for i in range(20)}
    files["005.jpg"] = pil_bytes(Image.new("RGB", (12, 12), (9, 99, 199)), "PNG")  # batch 1
    files["006.jpg"] = pil_bytes(Image.new("CMYK", (12, 12), (0, 255, 0, 0)), "JPEG")  # batch 1
    files["017.jpg"] = cut_jpeg()  # batch 4
    ds = load_dataset(f"folder:{_folder(tmp_path / 'imgs', files)}")
    seen = []
    real = decode._dali_pipeline
    monkeypatch.setattr(decode, "_dali_pipeline", lambda d, rows, *a: seen.append(rows.tolist()) or real(d, rows, *a))
    rows = np.arange(20)
    got = list(batches(decode_job(ds, 32, HALF, HALF, 4, CPU, "skip", 1), rows, "dali"))
    assert seen == [[0, 1, 2, 3], [8, 9, 10, 11, 12, 13, 14, 15]], seen  # batches 1 and 4 never reach DALI
    assert [b.start for b in got] == [0, 4, 8, 12, 16] and [b.bad for b in got] == [[], [], [], [], [1]]
    ref = list(batches(decode_job(ds, 32, HALF, HALF, 4, CPU, "skip", 0), rows, "torchvision"))
    for a, b in zip(got, ref):
        if a.start in (4, 16):  # decoded per file: the same decoder, the same values
            assert torch.equal(a.x, b.x), a.start
        else:  # DALI vs torchvision, both resizing in uint8: 1 level apart measured, 2 allowed
            assert (a.x - b.x).abs().max() * 127.5 <= 2, a.start  # x = (v - 127.5) / 127.5


# ---- through the CLI, in a real process: exit 2 and one line, or skipped rows ----------------

def _split(tmp_path: Path, imgs: Path) -> Path:
    run = tmp_path / "run"
    coopt_fast.split(f"folder:{imgs}", run, participants=1, shared_fraction=0.2)
    return run


def _extract(run: Path, decoder: str, *extra) -> str:
    return py("extract", run, "--participant", "p", "--shard", 0, "--prior", "linear", "--decoder", decoder,
              "--workers", 1, "--quiet", *extra)


@needs_dali
@pytest.mark.parametrize("victim, make, decoder, field", [
    ("c0/bad.jpg", text_file, "auto", "no readable JPEG"),  # auto: a .jpg-only folder goes to DALI
    ("c1/huge.jpg", huge_jpeg, "auto", "declares 50000x50000 pixels"),
    ("c0/bad.png", corrupt_idat_png, "dali", "cannot decode image (broken data stream"),
], ids=["text-as-jpeg", "huge-jpeg", "corrupt-idat-png"])
def test_file_that_killed_the_process_is_one_line(tmp_path, victim, make, decoder, field):
    imgs = _jpeg_folder(tmp_path / "imgs", 6, {victim: make()})
    run = _split(tmp_path, imgs)
    refused_subprocess(tmp_path, _extract(run, decoder), victim, field, "--on-bad-image skip")


@needs_dali
def test_files_that_killed_the_process_are_skipped(tmp_path):
    victims = {"c0/bad.jpg": text_file(), "c1/huge.jpg": huge_jpeg(), "c0/huge.png": huge_png(),
               "c1/bad.png": corrupt_idat_png(), "c0/cut.jpg": cut_jpeg()}
    imgs = _jpeg_folder(tmp_path / "imgs", 6, victims)
    run = _split(tmp_path, imgs)
    env = dict(os.environ, COOPT_PROGRESS="0", PYTHONPATH=str(ROOT))
    r = subprocess.run(["bash", "-c", _extract(run, "dali", "--on-bad-image", "skip", "--json")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    files = load_dataset(f"folder:{imgs}").files
    bad = sorted(files.index(imgs / v) for v in victims)
    with h5py.File(run / "participants/p/features.h5", "r") as f:
        assert f.attrs["decoder_used"] == "dali"
        assert sorted(f["shard/skipped"][:].tolist()) == bad
        feats = f["shard/features"][:]
    assert not feats[bad].any() and np.delete(feats, bad, axis=0).any(1).all()


# ---- formats a folder takes, and what it leaves out ------------------------------------------

def test_folder_takes_every_decodable_format_and_lists_the_rest(tmp_path):
    files = {f"c0/a{suffix}": PIXELS[name][0] for suffix, name in [
        (".png", "png-rgba"), (".bmp", "bmp"), (".webp", "webp-lossless"), (".tif", "tiff-16bit-grey"),
        (".tiff", "tiff-float"), (".gif", "gif-palette")]}
    files |= {"c1/b.jpg": jpeg(1), "c1/c.JPEG": jpeg(2), "c1/deep/d.jpg": jpeg(3),
              "c0/notes.txt": b"x", "c0/.DS_Store": b"x", "c1/._b.jpg": b"\0\5\26\7", "c1/README": b"x",
              "c1/.thumbs/t.jpg": jpeg(4), "top.jpg": jpeg(5), ".ipynb_checkpoints/e.jpg": jpeg(6)}
    imgs = _folder(tmp_path / "imgs", files)
    (imgs / "c1/dir.jpg").mkdir()  # a folder named like an image: not a file to read
    os.mkfifo(imgs / "c1/pipe.jpg")  # reading it would block forever
    ds = load_dataset(f"folder:{imgs}")
    assert ds.classes == ["c0", "c1"]
    assert [str(p.relative_to(imgs)) for p in ds.files] == [
        "c0/a.bmp", "c0/a.gif", "c0/a.png", "c0/a.tif", "c0/a.tiff", "c0/a.webp",
        "c1/b.jpg", "c1/c.JPEG", "c1/deep/d.jpg"]
    assert ds.left_out == [
        (".ipynb_checkpoints", "hidden"), ("c0/.DS_Store", "hidden"),
        ("c0/notes.txt", "suffix '.txt' is not an image format"),
        ("c1/._b.jpg", "hidden"), ("c1/.thumbs/t.jpg", "hidden"),
        ("c1/README", "no file suffix"), ("c1/pipe.jpg", "not a regular file"),
        ("top.jpg", "outside the class folders")]
    assert all(len(ds.read([i])[0].shape) == 3 for i in range(len(ds)))
    fp = fingerprint(ds)
    (imgs / "c0/more-notes.txt").write_bytes(b"y")  # left out: not part of the data set's identity
    assert fingerprint(load_dataset(f"folder:{imgs}")) == fp


def test_folder_with_nothing_to_take(tmp_path):
    imgs = _folder(tmp_path / "imgs", {"a.txt": b"x", "b.heic": b"x"})
    refused(tmp_path, ("split", f"folder:{imgs}", "--out", tmp_path / "run"), str(imgs), "no images found",
            "2 files left out, e.g. a.txt (suffix '.txt' is not an image format)")


# ---- npy: not an array, empty images, labels that are not class ids --------------------------

def _npy(path: Path, a, **kw) -> Path:
    np.save(path, a, **kw)
    return path


NPY_IMAGES = [
    ("npz", lambda p: np.savez(p.with_suffix(".npz"), x=np.zeros((4, 8, 8), np.uint8)) or p.with_suffix(".npz"),
     "an .npz archive (x)"),
    ("N-0-0", lambda p: _npy(p, np.zeros((4, 0, 0), np.uint8)), "empty images, shape (4, 0, 0)"),
    ("N-H-0", lambda p: _npy(p, np.zeros((4, 8, 0, 3), np.uint8)), "empty images, shape (4, 8, 0)"),
    ("0-H-W", lambda p: _npy(p, np.zeros((0, 8, 8), np.uint8)), "empty images, shape (0, 8, 8)"),
    ("object-array", lambda p: _npy(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True),
     "cannot load images"),
    ("pickle", lambda p: p.write_bytes(pickle.dumps([np.zeros((8, 8), np.uint8)])) or p, "cannot load images"),
    ("empty-file", lambda p: p.write_bytes(b"") or p, "cannot load images"),
]


@pytest.mark.parametrize("make, field", [(m, f) for _, m, f in NPY_IMAGES], ids=[n for n, _, _ in NPY_IMAGES])
def test_npy_images_refused(tmp_path, make, field):
    path = make(tmp_path / "x.npy")
    refused(tmp_path, ("split", f"npy:{path}", "--out", tmp_path / "run", "-k", 2), path, field)


NPY_LABELS = [
    ("float", np.linspace(0, 3, 4), "labels must be integer class ids, got dtype float64"),
    ("strings", np.array(["0", "1", "2", "3"]), "labels must be integer class ids, got dtype <U1"),
    ("huge-class-id", np.array([0, 1, 2, 10**6]), "label 1000000 is past the 100000 classes"),
    ("npz", None, "an .npz archive"),
]


@pytest.mark.parametrize("labels, field", [(lab, f) for _, lab, f in NPY_LABELS], ids=[n for n, _, _ in NPY_LABELS])
def test_npy_labels_refused(tmp_path, labels, field):
    x = _npy(tmp_path / "x.npy", np.zeros((4, 8, 8), np.uint8))
    if labels is None:
        np.savez(tmp_path / "y.npz", y=np.arange(4))
        y = tmp_path / "y.npz"
    else:
        y = _npy(tmp_path / "y.npy", labels)
    refused(tmp_path, ("split", f"npy:{x},{y}", "--out", tmp_path / "run", "-k", 2), y, field)


# ---- Fashion-MNIST whose idx files are damaged -----------------------------------------------

def _idx(ndim_dims: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, 8, len(ndim_dims)]) + b"".join(struct.pack(">I", d) for d in ndim_dims) + payload


FMNIST_BAD = [
    ("truncated-gzip", lambda: gzip.compress(_idx((4, 28, 28), bytes(4 * 784)))[:-20], "not a readable gzip file"),
    ("not-gzip", lambda: b"garbage" * 20, "not a readable gzip file"),
    ("wrong-magic", lambda: gzip.compress(b"\x00\x00\x0d\x03" + bytes(100)), "not an idx file of uint8 with 3"),
    ("short-data", lambda: gzip.compress(_idx((4, 28, 28), bytes(3 * 784))), "header declares 4x28x28 = 3136 bytes"),
    ("empty-images", lambda: gzip.compress(_idx((4, 0, 28), b"")), "empty images"),
]


@pytest.mark.parametrize("make, field", [(m, f) for _, m, f in FMNIST_BAD], ids=[n for n, _, _ in FMNIST_BAD])
def test_fashion_mnist_damaged(tmp_path, monkeypatch, make, field):
    d = tmp_path / "fmnist"
    d.mkdir()
    (d / "train-images-idx3-ubyte.gz").write_bytes(make())
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx((4,), bytes([0, 1, 2, 3]))))
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", d)
    refused(tmp_path, ("split", "fashion-mnist", "--out", tmp_path / "run", "-k", 2),
            d / "train-images-idx3-ubyte.gz", field)


@pytest.mark.parametrize("labels, field", [
    (bytes([0, 1, 2]), "3 labels for the 4 images"),
    (bytes([0, 1, 2, 200]), "label 200 is not one of the 10 classes"),
], ids=["count", "class"])
def test_fashion_mnist_labels_damaged(tmp_path, monkeypatch, labels, field):
    d = tmp_path / "fmnist"
    d.mkdir()
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx((4, 28, 28), bytes(4 * 784))))
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx((len(labels),), labels)))
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", d)
    refused(tmp_path, ("split", "fashion-mnist", "--out", tmp_path / "run", "-k", 2),
            d / "train-labels-idx1-ubyte.gz", field)


def test_split_says_which_files_it_left_out(tmp_path):
    """Files in an image folder that are not samples are named in split's warnings, not dropped silently."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, suffix in enumerate(("png", "jpg", "bmp", "webp", "tif", "gif")):
        Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8)).save(folder / f"{i}.{suffix}")
    (folder / "notes.txt").write_text("not an image")
    plan = coopt_fast.split(f"folder:{folder}", tmp_path / "run", participants=2, shared_fraction=0.2)
    assert plan["fingerprint"]["n"] == 6
    assert len(plan["warnings"]) == 1 and "1 file(s) left out" in plan["warnings"][0] and "notes.txt" in plan["warnings"][0]
