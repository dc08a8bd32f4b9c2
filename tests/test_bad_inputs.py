"""Bad inputs (issue 7 §3): each gets one line `error: <file/field>: <fault>` on stderr, a non-zero
exit (2, as the README documents), and leaves the run folder as it was.

"As it was" is checked by snapshotting every path under the test's folder (run folder, data,
--out targets) with the sha256 of each file, before and after the command. The one exception is
a disk that fills during a write: a resumable command (extract, align) may leave its
`NAME.partial` (and the folder holding it) so the rerun continues once there is space; nothing
else may change, and no final-named file may appear.

Most cases run in-process through Typer's CliRunner. Where what reaches the real stderr matters
(native libraries printing on fd 2, HDF5's exit-time cleanup, `ulimit -f`) the command runs as a
subprocess. Each test prints `MESSAGE <the line>` (see them with `pytest -rP`).

Already covered elsewhere, not repeated here: the library-level refusals in test_plan.py
(split arguments, unknown specs), test_extract.py (names `../evil`, `a/b`, shard 7, resnet9000,
missing checkpoint, batch size 0, malicious pickle) and test_align_merge.py (NaN, duplicate and
out-of-range upload indices, format_version 99 and `complete = False` in merge). Here: the CLI
contract for those kinds of fault on other files, fields and commands, and what was missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import coopt_fast
from coopt_fast import store
from coopt_fast.cli import app
from .conftest import make_npy as _make_npy

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
N, CLASSES, DIM = 400, 4, 8


# ---- fixtures and the contract -------------------------------------------------------------

def make_npy(folder: Path, n: int = N, seed: int = 0, classes: int = CLASSES, hw: int = 8) -> str:
    return _make_npy(folder, n, seed, classes, hw)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """400 random 8x8 images, 2 participants (labels prior), aligned to 8 dims and merged."""
    root = tmp_path_factory.mktemp("bad-inputs")
    spec = make_npy(root / "data")
    run = root / "run"
    coopt_fast.split(spec, run, participants=2, shared_fraction=0.1, seed=0)
    for k, name in enumerate(("a", "b")):
        coopt_fast.extract(run, name, k, "labels", progress=False)
    coopt_fast.align(run, dim=DIM, progress=False)
    coopt_fast.merge(run, progress=False)
    return run


@pytest.fixture
def run(base, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base, dst)
    return dst


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (files) or '<dir>' for everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def one_line(stderr: str, code: int, exc: BaseException | None = None) -> str:
    if exc is not None and not isinstance(exc, SystemExit):
        import traceback

        raise AssertionError("uncaught exception (a traceback, not one line):\n"
                             + "".join(traceback.format_exception(exc)))
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, f"exit code {code}, expected 2; stderr:\n{stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    print("MESSAGE", lines[0])
    return lines[0]


def refused(root: Path, args, *names: str) -> str:
    """Run the CLI in-process; the one-line contract, the names, and `root` unchanged."""
    args = [str(a) for a in args]
    before = snapshot(root)
    r = runner.invoke(app, args)
    line = one_line(r.stderr, r.exit_code, r.exception)
    for name in names:
        assert str(name) in line, f"{name!r} not named in: {line}"
    after = snapshot(root)
    assert after == before, f"folder changed: {_diff(before, after)}"
    return line


def refused_subprocess(root: Path, shell: str, *names: str, allow_partial: bool = False) -> str:
    """The same through a real process (`bash -c`), so everything printed on fd 2 counts."""
    before = snapshot(root)
    env = dict(os.environ, COOPT_PROGRESS="0", PYTHONPATH=str(ROOT))
    r = subprocess.run(["bash", "-c", shell], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = one_line(r.stderr, r.returncode)
    for name in names:
        assert str(name) in line, f"{name!r} not named in: {line}"
    after = snapshot(root)
    if allow_partial:  # disk full only: a resumable command's partial (and its folder) may stay
        new = {k for k in after if k not in before}
        assert all(k.endswith((".partial", ".lock")) or after[k] == "<dir>" for k in new), _diff(before, after)
        after = {k: v for k, v in after.items() if k not in new}
    assert after == before, f"folder changed: {_diff(before, after)}"
    return line


def _diff(a: dict, b: dict) -> str:
    added = sorted(set(b) - set(a))
    removed = sorted(set(a) - set(b))
    changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    return f"added {added}, removed {removed}, changed {changed}"


def py(*args) -> str:
    return " ".join([sys.executable, "-m", "coopt_fast", *[f"'{a}'" for a in map(str, args)]])


def edit(path: Path, fn, record: bool = True) -> None:
    """Change an HDF5 file in place; record=True: its participant re-records the sha256 (an
    honest upload that is wrong, so the fault under test is what merge meets, not the hash)."""
    with h5py.File(path, "r+") as f:
        fn(f)
    if record:
        store.write_manifest(path.parent, path.name)


def replace(f: h5py.File, name: str, data) -> None:
    del f[name]
    f.create_dataset(name, data=data)


def edit_plan(run: Path, fn) -> None:
    plan = json.loads((run / "plan.json").read_text())
    fn(plan)
    (run / "plan.json").write_text(json.dumps(plan))


TRAIN = ("--input-size", "16", "--no-compile", "--device", "cpu", "--quiet")


def _dali() -> bool:
    from coopt_fast.decode import dali_available

    return dali_available()


needs_dali = pytest.mark.skipif(not _dali(), reason="nvidia-dali not installed")


# ---- corrupt or truncated image ------------------------------------------------------------

@pytest.fixture
def image_folder(tmp_path) -> Path:
    from torchvision.io import encode_jpeg, write_png

    root = tmp_path / "imgs"
    for c in ("c0", "c1"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            x = torch.full((1, 12, 12), 20 * i + 50 * (c == "c1"), dtype=torch.uint8)
            write_png(x, str(root / c / f"{i}.png"))
            (root / c / f"{i}.jpg").write_bytes(encode_jpeg(x.expand(3, -1, -1).contiguous()).numpy().tobytes())
    return root


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[:40])


def _garbage(p: Path):
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage!" * 8)




@pytest.mark.parametrize("victim, damage, decoder", [
    pytest.param("c1/3.jpg", _truncate, "torchvision", id="truncated-jpeg"),
    pytest.param("c0/2.png", _garbage, "torchvision", id="corrupt-png"),
    pytest.param("c0/2.png", _garbage, "dali", id="corrupt-png-dali", marks=needs_dali),
])
def test_corrupt_or_truncated_image(tmp_path, image_folder, victim, damage, decoder):
    damage(image_folder / victim)
    run = tmp_path / "run"
    coopt_fast.split(f"folder:{image_folder}", run, participants=1, shared_fraction=0.2)  # fingerprint includes the damage
    refused_subprocess(tmp_path, py("extract", run, "--participant", "p", "--shard", 0, "--prior", "convnet",
                                    "--decoder", decoder, "--workers", 1, "--quiet"), victim.split("/")[1])


# ---- truncated HDF5, not HDF5, wrong format_version ----------------------------------------

TARGETS = {  # which command meets which file first
    "features": ("participants/b/features.h5", lambda run: ("align", run, "--dim", DIM, "--quiet")),
    "aligned": ("participants/b/aligned.h5", lambda run: ("merge", run, "--quiet")),
    "merged": ("merged.h5", lambda run: ("train", run, "--out", run.parent / "student", "--epochs", 1, *TRAIN)),
}


@pytest.mark.parametrize("which", list(TARGETS))
def test_truncated_hdf5(run, which):
    rel, cmd = TARGETS[which]
    p = run / rel
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    line = refused(run.parent, cmd(run), p, "truncated")
    assert "not a readable HDF5 file" in line


@pytest.mark.parametrize("which", list(TARGETS))
def test_not_hdf5(run, which):
    rel, cmd = TARGETS[which]
    p = run / rel
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)  # an image saved under the store's name
    refused(run.parent, cmd(run), p, "not a readable HDF5 file")


@pytest.mark.parametrize("which", list(TARGETS))
def test_wrong_format_version(run, which):
    rel, cmd = TARGETS[which]
    p = run / rel
    edit(p, lambda f: f.attrs.__setitem__("format_version", 2), record=which != "merged")
    refused(run.parent, cmd(run), p, "format_version is 2")


# ---- wrong shape, dtype or dimension -------------------------------------------------------

def _targets_dtype(f):
    replace(f, "shard/targets", f["shard/targets"][:].astype(np.float32))


def _targets_rows(f):
    replace(f, "shard/targets", f["shard/targets"][:-1])


def _targets_dim(f):  # b aligned to 16 dims while a used 8
    n = f["shard/targets"].shape[0]
    replace(f, "shard/targets", np.ones((n, 2 * DIM), np.float16))
    replace(f, "stats/sum", np.zeros(2 * DIM))
    replace(f, "stats/sumsq", np.zeros(2 * DIM))


@pytest.mark.parametrize("fault, names", [
    (_targets_dtype, ("participants/b/aligned.h5", "shard/targets", "dtype", "float32")),
    (_targets_rows, ("participants/b/aligned.h5", "shard/targets", "shape")),
    (_targets_dim, ("target dim", "a=8", "b=16")),
], ids=["dtype", "shape", "dimension"])
def test_merge_wrong_shape_dtype_or_dimension(run, fault, names):
    edit(run / "participants/b/aligned.h5", fault)
    refused(run.parent, ("merge", run, "--quiet"), *names)


@pytest.mark.parametrize("images, labels, field", [
    (np.zeros((50, 8, 8), np.float32), None, "images must be uint8"),
    (np.zeros((50, 64), np.uint8), None, "images must be uint8"),
    (np.zeros((50, 8, 8, 2), np.uint8), None, "channel dimension must be 1 or 3"),
    (np.zeros((50, 8, 8), np.uint8), np.zeros(49, np.int64), "labels shape (49,)"),
], ids=["dtype", "dimension", "channels", "labels-shape"])
def test_split_wrong_shape_dtype_or_dimension(tmp_path, images, labels, field):
    np.save(tmp_path / "x.npy", images)
    spec = f"npy:{tmp_path / 'x.npy'}"
    bad = tmp_path / "x.npy"
    if labels is not None:
        np.save(tmp_path / "y.npy", labels)
        spec += f",{tmp_path / 'y.npy'}"
        bad = tmp_path / "y.npy"
    refused(tmp_path, ("split", spec, "--out", tmp_path / "run", "-k", 2), bad, field)


@pytest.mark.parametrize("fault", [
    pytest.param(lambda f: replace(f, "targets", np.zeros(f["targets"].shape[0], np.float16)), id="targets-1d"),
    pytest.param(lambda f: replace(f, "images", f["images"][:].reshape(len(f["images"]), -1)), id="images-2d"),
    pytest.param(lambda f: replace(f, "images", f["images"][:-1]), id="images-rows"),
])
def test_train_wrong_shape_or_dimension(run, fault):
    edit(run / "merged.h5", fault, record=False)
    refused(run.parent, ("train", run, "--out", run.parent / "student", "--epochs", 1, *TRAIN), "merged.h5")


# ---- NaN or Inf targets --------------------------------------------------------------------

@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_merge_refuses_nonfinite_targets(run, value):
    edit(run / "participants/b/aligned.h5", lambda f: f["shard/targets"].__setitem__((7, 3), value))
    refused(run.parent, ("merge", run, "--quiet"), "participants/b/aligned.h5", "NaN or Inf")


@pytest.mark.parametrize("row", [
    pytest.param(0, id="first-row"),
    pytest.param(17, id="middle-row"),
])
def test_train_refuses_nonfinite_targets(run, row):
    edit(run / "merged.h5", lambda f: f["targets"].__setitem__((row, 1), np.nan), record=False)
    line = refused(run.parent, ("train", run, "--out", run.parent / "student", "--max-steps", 2, *TRAIN), "merged.h5")
    fault = line.rsplit("merged.h5", 1)[1]  # the test's own path may contain "nonfinite"
    assert "NaN" in fault or "finite" in fault, line


@pytest.mark.parametrize("group", [
    pytest.param("shared"),
    pytest.param("shard"),
])
def test_align_refuses_nonfinite_features(run, group, tmp_path):
    edit(run / "participants/b/features.h5", lambda f: f[f"{group}/features"].__setitem__((3, 1), np.inf))
    refused_subprocess(tmp_path, py("align", run, "--dim", DIM, "--reference", "a", "--quiet"),
                       "participants/b/features.h5")


# ---- duplicate, missing or out-of-range indices ---------------------------------------------

def _missing(f):  # the upload lacks one sample of its shard (index and row)
    replace(f, "shard/index", f["shard/index"][:-1])
    replace(f, "shard/targets", f["shard/targets"][:-1])


def _no_index(f):
    del f["shard/index"]


@pytest.mark.parametrize("fault, field", [
    (lambda f: f["shard/index"].__setitem__(1, f["shard/index"][0]), "duplicate"),
    (_missing, "not exactly one shard"),
    (_no_index, "missing dataset shard/index"),
    (lambda f: f["shard/index"].__setitem__(0, -1), "out of range"),
    (lambda f: f["shard/index"].__setitem__(-1, N), "out of range"),
], ids=["duplicate", "missing", "no-index", "negative", "past-end"])
def test_merge_refuses_bad_upload_indices(run, fault, field):
    edit(run / "participants/b/aligned.h5", fault)
    refused(run.parent, ("merge", run, "--quiet"), "participants/b/aligned.h5", field)


@pytest.mark.parametrize("fault", [
    pytest.param(lambda p: p["shards"][0].append(p["shards"][0][0]), id="duplicate"),
    pytest.param(lambda p: p["shards"][0].append(N + 5), id="past-end"),
    pytest.param(lambda p: p["shards"][0].__setitem__(0, -1), id="negative"),
    pytest.param(lambda p: p["shared"].append(10**6), id="shared-past-end"),
    pytest.param(lambda p: p["shards"][0].remove(p["shards"][0][5]), id="missing"),
])
def test_extract_refuses_bad_plan_indices(run, fault):
    edit_plan(run, fault)
    refused(run.parent, ("extract", run, "--participant", "c", "--shard", 0, "--prior", "labels", "--quiet"),
            "plan.json")


# ---- an upload covering another participant's shard ----------------------------------------

def test_upload_covering_another_participants_shard(run):
    """mallory uploads shard 1 again (b's), as an honest-looking, self-consistent participant."""
    shutil.copytree(run / "participants/b", run / "participants/mallory")
    refused(run.parent, ("merge", run, "--quiet"), "mallory", "covers shard 1, already uploaded by b")


def test_upload_of_another_shard_under_own_name(run):
    """b's folder holds a's shard: a second upload of shard 0, and shard 1 has none."""
    for name in ("features.h5", "aligned.h5", "manifest.json"):
        shutil.copy(run / "participants/a" / name, run / "participants/b" / name)
    refused(run.parent, ("merge", run, "--quiet"), "participant b", "covers shard 0, already uploaded by a")


# ---- a data set that changed since split ---------------------------------------------------

@pytest.mark.parametrize("cmd", ["extract", "merge"])
def test_dataset_changed_since_split(tmp_path, cmd):
    spec = make_npy(tmp_path / "data", n=120)
    run = tmp_path / "run"
    coopt_fast.split(spec, run, participants=2, shared_fraction=0.1)
    for k, name in enumerate(("a", "b")):
        coopt_fast.extract(run, name, k, "labels", progress=False)
    coopt_fast.align(run, dim=DIM, progress=False)
    x = np.load(tmp_path / "data/x.npy")
    x[33, 2, 2] ^= 0x10  # one bit of one pixel
    np.save(tmp_path / "data/x.npy", x)
    args = {"extract": ("extract", run, "--participant", "c", "--shard", 0, "--prior", "labels", "--quiet"),
            "merge": ("merge", run, "--quiet")}[cmd]
    refused(tmp_path, args, str(tmp_path / "data/x.npy"), "changed since split")


# ---- S too small for the fit without ridge -------------------------------------------------

@pytest.mark.parametrize("reference, names", [
    ("a", ("participants/b/features.h5", "S has 1 usable rows", "--ridge")),
    ("best", ("no participant has a finite uniformity-centred on S",)),
    ("consensus", ("fewer than 2 rows of S decoded by every participant",)),
])
def test_shared_set_too_small_without_ridge(tmp_path, reference, names):
    spec = make_npy(tmp_path / "data", n=200)
    run = tmp_path / "run"
    coopt_fast.split(spec, run, participants=2, shared_fraction=0.001)  # round(0.2) -> |S| = 1
    for k, name in enumerate(("a", "b")):
        coopt_fast.extract(run, name, k, "labels", progress=False)
    refused(tmp_path, ("align", run, "--dim", DIM, "--reference", reference, "--ridge", 0, "--quiet"), *names)


# ---- unknown architecture; a checkpoint for another architecture ---------------------------

@pytest.mark.parametrize("cmd", ["extract", "train"])
def test_unknown_architecture(run, cmd):
    args = {"extract": ("extract", run, "--participant", "c", "--shard", 0, "--prior", "lenet7", "--quiet"),
            "train": ("train", run, "--student", "lenet7", "--out", run.parent / "student", *TRAIN)}[cmd]
    refused(run.parent, args, "unknown architecture 'lenet7'")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    from coopt_fast.priors import build_backbone, save_checkpoint

    d = tmp_path_factory.mktemp("ckpts")
    convnet, _, _ = build_backbone("convnet", seed=1)
    save_checkpoint(d / "convnet.safetensors", convnet, {"arch": "convnet", "input_size": 32})
    torch.save(build_backbone("resnet18", seed=1)[0].state_dict(), d / "resnet18-plain.pt")  # records no arch
    return {"meta": d / "convnet.safetensors", "plain": d / "resnet18-plain.pt"}


@pytest.mark.parametrize("prior, ckpt, field", [
    ("resnet18", "meta", "checkpoint is for architecture 'convnet', not 'resnet18'"),
    ("convnet", "plain", "does not fit architecture 'convnet'"),
], ids=["recorded-arch", "state-dict-keys"])
def test_checkpoint_for_another_architecture(run, checkpoints, prior, ckpt, field):
    path = checkpoints[ckpt]
    refused(run.parent, ("extract", run, "--participant", "c", "--shard", 0, "--prior", f"{prior}:{path}", "--quiet"),
            path, field)


# ---- an empty shard; K larger than N --------------------------------------------------------

def test_empty_shard(run):
    edit_plan(run, lambda p: p["shards"].__setitem__(0, []))
    refused(run.parent, ("extract", run, "--participant", "c", "--shard", 0, "--prior", "labels", "--quiet"),
            "plan.json", "shard 0", "empty")


@pytest.mark.parametrize("k", [N + 1, 10**6])
def test_k_larger_than_n(run, k):
    """Over an existing run folder: the plan participants already used must stay as it was."""
    spec = json.loads((run / "plan.json").read_text())["dataset"]
    refused(run.parent, ("split", spec, "--out", run, "-k", k), f"--participants {k}", f"({N} samples)")


# ---- zero or negative sizes and fractions ---------------------------------------------------

SPLIT_BAD = [
    (("-k", 0), "--participants"), (("-k", -2), "--participants"),
    (("--shared-fraction", 0), "--shared-fraction"), (("--shared-fraction", -0.5), "--shared-fraction"),
    (("--shared-fraction", 1.5), "--shared-fraction"), (("--shared-fraction", "nan"), "--shared-fraction"),
    (("-k", 2, "--sizes", "1,-1"), "--sizes"), (("-k", 2, "--sizes", "0,0"), "--sizes"),
    (("-k", 2, "--sizes", "1,inf"), "--sizes"), (("--limit", 0), "--limit"), (("--limit", -5), "--limit"),
]


@pytest.mark.parametrize("extra, field", SPLIT_BAD, ids=[" ".join(map(str, e)) for e, _ in SPLIT_BAD])
def test_split_zero_or_negative(run, extra, field):
    spec = json.loads((run / "plan.json").read_text())["dataset"]
    refused(run.parent, ("split", spec, "--out", run, *extra), field)


OTHER_BAD = [
    pytest.param(("extract", "{run}", "--participant", "c", "--shard", 0, "--prior", "labels", "--batch-size", -3),
                 "--batch-size", id="extract --batch-size -3"),
    pytest.param(("extract", "{run}", "--participant", "c", "--shard", 0, "--prior", "convnet", "--workers", -1,
                  "--decoder", "torchvision"), "--workers", id="extract --workers -1"),
    pytest.param(("align", "{run}", "--dim", 0), "--dim", id="align --dim 0"),
    pytest.param(("align", "{run}", "--dim", -3), "--dim", id="align --dim -3"),
    pytest.param(("align", "{run}", "--dim", DIM, "--ridge", -1), "--ridge", id="align --ridge -1"),
    pytest.param(("train", "{run}", "--out", "{out}", "--epochs", 0, *TRAIN), "epochs", id="train --epochs 0"),
    pytest.param(("train", "{run}", "--out", "{out}", "--epochs", -1, *TRAIN), "epochs", id="train --epochs -1"),
    pytest.param(("train", "{run}", "--out", "{out}", "--batch-size", 0, *TRAIN), "--batch-size",
                 id="train --batch-size 0"),
    pytest.param(("train", "{run}", "--out", "{out}", "--lr", 0, *TRAIN), "lr", id="train --lr 0"),
    pytest.param(("train", "{run}", "--out", "{out}", "--lr", -1e-3, *TRAIN), "lr", id="train --lr -0.001"),
    pytest.param(("train", "{run}", "--out", "{out}", "--wd", -0.1, *TRAIN), "wd", id="train --wd -0.1"),
    pytest.param(("train", "{run}", "--out", "{out}", "--no-compile", "--quiet", "--input-size", -16),
                 "--input-size", id="train --input-size -16"),
    pytest.param(("train", "{run}", "--out", "{out}", "--no-compile", "--quiet", "--input-size", 0, "--max-steps", 1),
                 "--input-size", id="train --input-size 0"),
    pytest.param(("train", "{run}", "--out", "{out}", "--max-steps", 0, *TRAIN), "--max-steps",
                 id="train --max-steps 0"),
    pytest.param(("train", "{run}", "--out", "{out}", "--max-steps", -1, *TRAIN), "--max-steps",
                 id="train --max-steps -1"),
    pytest.param(("train", "{run}", "--out", "{out}", "--max-seconds", -1, *TRAIN), "--max-seconds",
                 id="train --max-seconds -1"),
    pytest.param(("train", "{run}", "--out", "{out}", "--store-on-device", "maybe", *TRAIN), "--store-on-device",
                 id="train --store-on-device maybe"),
]


@pytest.mark.parametrize("args, field", OTHER_BAD)
def test_zero_or_negative_sizes(run, args, field):
    args = [a.format(run=run, out=run.parent / "student") if isinstance(a, str) else a for a in args]
    refused(run.parent, args, field)


# ---- participant names: path traversal and odd characters -----------------------------------

NAMES = ["..", "../../etc", "a/../../x", "/abs", ".hidden", "-rf", "a b", "x\ny", "tab\tname", "ä", "",
         "a" * 65, "a..b", "nul\0byte"]


@pytest.mark.parametrize("name", NAMES, ids=[repr(n)[1:-1] or "empty" for n in NAMES])
def test_participant_name_is_refused(run, name):
    line = refused(run.parent, ("extract", run, f"--participant={name}", "--shard", 0, "--prior", "labels",
                                "--quiet"), "participant name", repr(name))
    assert "\n" not in line


@pytest.mark.parametrize("option", ["--participant", "--reference"])
def test_align_participant_name_is_refused(run, option):
    refused(run.parent, ("align", run, "--dim", DIM, f"{option}=../a", "--quiet"), "participant name '../a'")


# ---- a disk that fills during a write (ulimit -f) --------------------------------------------

@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    """Large enough that every output passes the limit: 4,000 rows, one-hot over 256 classes."""
    root = tmp_path_factory.mktemp("disk-full")
    spec = make_npy(root / "data", n=4000, classes=256)
    run = root / "run"
    coopt_fast.split(spec, run, participants=2, shared_fraction=0.05)
    return run


def _stage(big_run: Path, dst: Path, upto: str) -> Path:
    run = dst / "run"
    shutil.copytree(big_run, run)
    if upto in ("align", "merge", "train"):
        for k, name in enumerate(("a", "b")):
            coopt_fast.extract(run, name, k, "labels", progress=False)
    if upto in ("merge", "train"):
        coopt_fast.align(run, dim=128, progress=False)
    if upto == "train":
        coopt_fast.merge(run, progress=False)
    return run


DISK_FULL = [
    pytest.param("extract", ("extract", "{run}", "--participant", "a", "--shard", 0, "--prior", "labels"),
                 "participants/a/features.h5.partial", id="extract"),
    # align writes shared.h5 (float32 S x 128: 100 KB) before aligned.h5: either may hit the limit
    pytest.param("align", ("align", "{run}", "--dim", 128), "participants/a/", id="align"),
    pytest.param("merge", ("merge", "{run}"), "merged.h5", id="merge"),
    pytest.param("train", ("train", "{run}", "--out", "{run}/student", "--epochs", 1, *TRAIN), "student.pt",
                 id="train"),
]


@pytest.mark.parametrize("cmd, args, name", DISK_FULL)
def test_disk_full_during_write(big_run, tmp_path, cmd, args, name):
    run = _stage(big_run, tmp_path, cmd)
    args = [a.format(run=run) if isinstance(a, str) else a for a in args]
    refused_subprocess(tmp_path, "ulimit -f 100; " + py(*args, "--quiet"), name, "disk full",
                       allow_partial=cmd in ("extract", "align", "train"))  # the resumable ones
    # With space again the same command finishes (resuming where it can) and its output is whole.
    r = runner.invoke(app, [str(a) for a in args] + ["--quiet"])
    assert r.exit_code == 0, r.stderr
    out = {"extract": run / "participants/a/features.h5", "align": run / "participants/a/aligned.h5",
           "merge": run / "merged.h5"}.get(cmd)
    if out is not None:
        store.open_complete(out, out.name).close()
        assert not store.partial_path(out).exists()


@pytest.mark.parametrize("decoder", [
    "torchvision",
    pytest.param("dali", marks=needs_dali),
])
def test_corrupt_png_is_skipped_under_on_bad_image_skip(tmp_path, image_folder, decoder):
    """The other answer to a bad image: recorded as skipped, a zero row, exit 0."""
    _garbage(image_folder / "c0/2.png")
    run = tmp_path / "run"
    coopt_fast.split(f"folder:{image_folder}", run, participants=1, shared_fraction=0.2)
    env = dict(os.environ, COOPT_PROGRESS="0", PYTHONPATH=str(ROOT))
    r = subprocess.run(["bash", "-c", py("extract", run, "--participant", "p", "--shard", 0, "--prior", "convnet",
                                         "--decoder", decoder, "--workers", 1, "--on-bad-image", "skip", "--quiet",
                                         "--json")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from coopt_fast.data import load_dataset

    bad = load_dataset(f"folder:{image_folder}").files.index(image_folder / "c0/2.png")
    with h5py.File(run / "participants/p/features.h5", "r") as f:
        assert f["shard/skipped"][:].tolist() == [bad] and not f["shard/features"][bad].any()
