"""The extraction engine: decoders agree, batch size/threads don't change the bytes, compile
matches eager, bad images fail or skip, and torchrun with 2 gloo ranks equals one process."""
import importlib
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import coopt_fast
from coopt_fast.decode import dali_available
from coopt_fast.errors import CooptError

from .conftest import requires_fmnist

pytestmark = requires_fmnist
extract_mod = importlib.import_module("coopt_fast.extract")  # the module (coopt_fast.extract is the function)
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")


def _feats(run, name):
    with h5py.File(run / "participants" / name / "features.h5", "r") as f:
        return {k: f[k][:] for k in ("shard/index", "shard/features", "shared/index", "shared/features",
                                     "shard/skipped", "shared/skipped")}


def _variant(run, name):
    """A run of its own (the same plan) for one of several extractions of the same shard:
    extract allows one participant per shard in a run."""
    to = run.parent / f"{run.name}-{name}"
    to.mkdir()
    shutil.copy(run / "plan.json", to / "plan.json")
    return to


def _same(a, b):
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def engine_plan(tmp_path_factory):
    run = tmp_path_factory.mktemp("engine")
    coopt_fast.split("fashion-mnist", run, participants=2, shared_fraction=0.05, seed=2, limit=501)
    return run


@pytest.fixture
def run(engine_plan, tmp_path):
    (tmp_path / "run").mkdir()
    shutil.copy(engine_plan / "plan.json", tmp_path / "run" / "plan.json")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def jpeg_run(tmp_path_factory):
    """A folder of 60 JPEGs (40 px, RGB) written from Fashion-MNIST, as an ImageFolder."""
    from torchvision.io import encode_jpeg

    from coopt_fast.data import load_dataset

    root = tmp_path_factory.mktemp("jpegs")
    ds = load_dataset("fashion-mnist")
    for i in range(60):
        d = root / "imgs" / f"c{ds.labels[i]}"
        d.mkdir(parents=True, exist_ok=True)
        x = torch.from_numpy(ds.images[i].copy()).permute(2, 0, 1).expand(3, -1, -1)
        x = torch.nn.functional.interpolate(x[None].float(), size=40, mode="bilinear")[0].round().to(torch.uint8)
        (d / f"{i:03d}.jpg").write_bytes(encode_jpeg(x, quality=95).numpy().tobytes())
    return root / "imgs"


@pytest.mark.parametrize("decoder", ["torchvision", pytest.param("dali", marks=needs_dali)])
def test_batch_size_does_not_change_the_bytes(run, decoder):
    runs = {bs: _variant(run, f"{decoder}{bs}") for bs in (1, 64, 100)}
    for bs, r in runs.items():
        coopt_fast.extract(r, f"{decoder}{bs}", 0, "convnet", batch_size=bs, decoder=decoder, progress=False)
    a = _feats(runs[64], f"{decoder}64")
    _same(a, _feats(runs[100], f"{decoder}100"))
    _same(a, _feats(runs[1], f"{decoder}1"))


@needs_dali
def test_dali_and_torchvision_agree(run):
    """DALI resizes in uint8 (rounding to 1/255 per pixel), torch in float: features differ by
    about that much relative to their scale, never more than a few percent."""
    runs = {dec: _variant(run, dec) for dec in ("dali", "torchvision")}
    for dec, r in runs.items():
        coopt_fast.extract(r, f"agree-{dec}", 1, "convnet", batch_size=128, decoder=dec, progress=False)
    a = _feats(runs["dali"], "agree-dali")["shard/features"].astype(np.float32)
    b = _feats(runs["torchvision"], "agree-torchvision")["shard/features"].astype(np.float32)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    assert rel.max() < 0.03, rel.max()


def test_compiled_matches_eager(run):
    eager = _variant(run, "eager")
    coopt_fast.extract(eager, "eager", 1, "convnet", batch_size=96, decoder="torchvision", progress=False)
    s = coopt_fast.extract(run, "compiled", 1, "convnet", batch_size=96, decoder="torchvision", compile=True,
                           progress=False)
    assert s["compile_seconds"] > 0
    a = _feats(eager, "eager")["shard/features"].astype(np.float32)
    b = _feats(run, "compiled")["shard/features"].astype(np.float32)
    np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("decoder", ["torchvision", pytest.param("dali", marks=needs_dali)])
def test_folder_decoders_and_bad_images(jpeg_run, tmp_path, decoder):
    imgs, run = tmp_path / "imgs", tmp_path / "run"
    shutil.copytree(jpeg_run, imgs)
    coopt_fast.split(f"folder:{imgs}", run, participants=1, shared_fraction=0.1, seed=0)
    s = coopt_fast.extract(run, "ok", 0, "convnet", batch_size=16, decoder=decoder, workers=1, progress=False)
    assert s["rows"] == 60 and s["skipped_images"] == 0
    good = _feats(run, "ok")
    shutil.rmtree(run / "participants" / "ok")  # shard 0 free again for "strict" and "lenient"
    from coopt_fast.plan import load_plan, plan_dataset

    ds = plan_dataset(load_plan(run), verify=False)
    victim = ds.files[37]
    victim.write_bytes(victim.read_bytes()[:50])  # truncated JPEG
    # The data set changed since split: write a fresh plan over the damaged folder.
    coopt_fast.split(f"folder:{imgs}", run, participants=1, shared_fraction=0.1, seed=0, force=True)
    with pytest.raises(CooptError, match=str(victim.name)):
        coopt_fast.extract(run, "strict", 0, "convnet", batch_size=16, decoder=decoder, workers=1, progress=False)
    coopt_fast.extract(run, "lenient", 0, "convnet", batch_size=16, decoder=decoder, workers=1,
                       on_bad_image="skip", progress=False)
    got = _feats(run, "lenient")
    assert got["shard/skipped"].tolist() == [37]
    assert not got["shard/features"][37].any()
    keep = np.arange(60) != 37
    a, b = got["shard/features"][keep].astype(np.float32), good["shard/features"][keep].astype(np.float32)
    if decoder == "torchvision":
        np.testing.assert_array_equal(a, b)
    else:  # DALI redoes the bad file's batch with torchvision's decoder: equal within decoders' tolerance
        assert (np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max() < 0.03
    # The skipped image is absent downstream: merge leaves its sample out of the store.
    shutil.rmtree(run / "participants" / "strict", ignore_errors=True)
    coopt_fast.align(run, dim=8, progress=False)
    m = coopt_fast.merge(run, progress=False)
    with h5py.File(run / "merged.h5", "r") as f:
        assert m["rows"] == 59 and 37 not in f["index"][:] and len(f["targets"]) == 59


def test_torchrun_two_gloo_ranks_equal_one_process(run):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    single = _variant(run, "single")
    coopt_fast.extract(single, "single", 0, "convnet", batch_size=50, decoder="torchvision", progress=False)
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "coopt_fast", "extract", str(run),
           "--participant", "multi", "--shard", "0", "--prior", "convnet", "--batch-size", "50",
           "--decoder", "torchvision", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _same(_feats(single, "single"), _feats(run, "multi"))
    assert not list((run / "participants" / "multi").glob("features.rank*"))


def _torchrun(run, name, *opts, prior="convnet", timeout=120):
    """`extract` of shard 0 under torchrun with 2 gloo ranks. The timeout is no performance claim:
    a rank left waiting for one that failed would wait PEER_WAIT (days), so a hang fails the test."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "coopt_fast", "extract", str(run),
           "--participant", name, "--shard", "0", "--prior", prior, "--decoder", "torchvision", "--quiet", *opts]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=timeout)


def test_torchrun_a_bad_image_on_rank_1_ends_every_rank(jpeg_run, tmp_path):
    """Only rank 1 fails (a truncated JPEG in its slice, --on-bad-image fail): the whole world ends
    non-zero with rank 1's one line; rank 0's part stays for a resume, and only with its world size."""
    from coopt_fast.plan import load_plan, plan_dataset, shard_indices

    imgs, run = tmp_path / "imgs", tmp_path / "run"
    shutil.copytree(jpeg_run, imgs)
    coopt_fast.split(f"folder:{imgs}", run, participants=1, shared_fraction=0.1, seed=0)
    plan = load_plan(run)
    victim = plan_dataset(plan, verify=False).files[shard_indices(plan, 0)[-1]]  # the last row: rank 1's
    victim.write_bytes(victim.read_bytes()[:50])
    coopt_fast.split(f"folder:{imgs}", run, participants=1, shared_fraction=0.1, seed=0, force=True)
    r = _torchrun(run, "p", "--batch-size", "16", "--workers", "1")
    assert r.returncode != 0
    assert f"error: {victim}: cannot decode image" in r.stderr, r.stderr[-3000:]
    d = run / "participants" / "p"
    assert not (d / "features.h5").exists()
    assert not (d / "features.rank1.h5.partial").exists()  # a bad image: no rerun gets past it (as in one process)
    assert (d / "features.rank0.h5.partial").exists()
    with pytest.raises(CooptError, match=r"features.rank0.h5.partial: partial extraction by world size 2, and this "
                                         r"run has world size 1 .* rerun with world size 2 to resume it"):
        coopt_fast.extract(run, "p", 0, "convnet", batch_size=16, decoder="torchvision", workers=1, progress=False)
    assert (d / "features.rank0.h5.partial").exists()  # refused, not discarded


def test_torchrun_rank_0_failing_in_the_stitch_ends_every_rank(run):
    """Rank 0 fails only once every part is whole (another writer holds features.h5): rank 1,
    waiting for the stitch, ends too. The parts stay, and a rerun resumes and publishes them."""
    from coopt_fast import store

    out = run / "participants" / "multi" / "features.h5"
    with store.Lock(out):  # this test's own, live process: not stale
        r = _torchrun(run, "multi", prior="labels")
    assert r.returncode != 0
    assert f"error: {out}.lock: another writer holds this file" in r.stderr, r.stderr[-3000:]
    parts = sorted(p.name for p in out.parent.glob("features.rank*"))
    assert parts == ["features.rank0.h5.partial", "features.rank1.h5.partial"] and not out.exists()
    r = _torchrun(run, "multi", prior="labels")
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.exists() and not list(out.parent.glob("features.rank*"))


def _rank_job(monkeypatch, run, name, prior, rank, world, seed=0):
    """The Job extract resolves on rank `rank` of `world` (torchrun's environment, no process group)."""
    from coopt_fast.extract import Options

    for k, v in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", rank)):
        monkeypatch.setenv(k, str(v))
    o = Options(50, "cpu", "torchvision", False, "fail", 1, False)
    return extract_mod._resolve(run, name, 0, prior, 0, seed, None, o)


def _fill_part(job):
    """Rank job.rank's part, as _run fills it (its slice of S and of the shard); the ModelRunner."""
    runner = None if job.prior.model is None else extract_mod.ModelRunner(job.prior, job.device, False, job.batch_size)
    mine = {g: np.array_split(r, job.world)[job.rank] for g, r in job.rows.items()}
    extract_mod._extract_part(job, mine, runner)
    return runner


def test_stitch_copies_in_blocks_and_equals_one_process(run, monkeypatch):
    """Two ranks' parts stitched 7 rows at a time (an irregular count: every part ends on a short
    block): the same datasets as one process, and no block larger than STITCH_ROWS."""
    import time

    from coopt_fast import store

    single = _variant(run, "single")
    coopt_fast.extract(single, "single", 0, "convnet", batch_size=50, decoder="torchvision", progress=False)
    jobs = [_rank_job(monkeypatch, run, "multi", "convnet", r, 2) for r in (0, 1)]
    runner = [_fill_part(j) for j in jobs][0]
    blocks, append = [], store.append_rows
    monkeypatch.setattr(extract_mod, "STITCH_ROWS", 7)
    monkeypatch.setattr(store, "append_rows", lambda ds, b: (blocks.append(len(b)), append(ds, b)))
    parts = [jobs[0].out.with_name(f"features.rank{r}.h5") for r in (0, 1)]
    extract_mod._stitch(jobs[0], parts, runner, time.perf_counter())
    _same(_feats(single, "single"), _feats(run, "multi"))
    n = sum(len(r) for r in jobs[0].rows.values())
    assert max(blocks) == 7 and sum(blocks) == n and len(blocks) > n // 7
    assert not list(jobs[0].out.parent.glob("features.rank*"))


def test_a_partial_of_another_world_size_is_refused(run, monkeypatch):
    """A one-process partial is not resumed by 2 ranks (nor discarded): rank 0 refuses it before
    any rank opens its part. A partial of another extraction (another seed) is left to be
    restarted, as before."""
    one = _rank_job(monkeypatch, run, "w", "labels", 0, 1)
    _fill_part(one)  # rows written, not published: features.h5.partial of world size 1
    extract_mod._refuse_other_world(one)
    two = _rank_job(monkeypatch, run, "w", "labels", 0, 2)
    with pytest.raises(CooptError, match=r"features.h5.partial: partial extraction by world size 1, and this run "
                                         r"has world size 2 .* or remove it to start over"):
        extract_mod._refuse_other_world(two)
    extract_mod._refuse_other_world(_rank_job(monkeypatch, run, "w", "labels", 0, 2, seed=1))
    with h5py.File(one.out.with_name("features.h5.partial"), "r") as f:
        assert int(f.attrs["world_size"]) == 1


def _jpeg_folder(root, sides):
    """JPEGs of Fashion-MNIST images, image i resized to sides[i] x sides[i] (RGB, quality 95)."""
    from torchvision.io import encode_jpeg

    from coopt_fast.data import load_dataset

    ds = load_dataset("fashion-mnist")
    for i, side in enumerate(sides):
        d = root / f"c{ds.labels[i]}"
        d.mkdir(parents=True, exist_ok=True)
        x = torch.from_numpy(ds.images[i].copy()).permute(2, 0, 1).expand(3, -1, -1)
        x = torch.nn.functional.interpolate(x[None].float(), size=side, mode="bilinear")[0].round().to(torch.uint8)
        (d / f"{i:03d}.jpg").write_bytes(encode_jpeg(x, quality=95).numpy().tobytes())
    return root


def test_folder_size_peek(tmp_path):
    from coopt_fast.data import load_dataset
    from coopt_fast.decode import folder_needs_resize

    ds = load_dataset(f"folder:{_jpeg_folder(tmp_path / 'imgs', [32] * 9 + [40])}")
    odd = next(i for i, f in enumerate(ds.files) if f.name == "009.jpg")  # files are sorted by class folder
    same = np.array([i for i in range(10) if i != odd])
    assert not folder_needs_resize(ds.files, same, 32)
    assert folder_needs_resize(ds.files, np.append(same, odd), 32)  # the last row is always among the peeked
    assert folder_needs_resize(ds.files, same, 28)
    ds.files[same[3]].write_bytes(b"not an image")
    assert folder_needs_resize(ds.files, same, 32)  # unreadable: keep the resize


@needs_dali
@pytest.mark.parametrize("peek", [64, 1])
def test_dali_same_size_folder_skips_resize_and_survives_a_missed_odd_file(tmp_path, monkeypatch, peek):
    """Files already at the input size: DALI leaves its resize out. With peek=1 only the first
    file is looked at, so the 40 px file at row 45 reaches a resize-free pipeline: the batch of
    mixed shapes must restart DALI with the resize on, and every row must still match."""
    import coopt_fast.decode as decode

    sides = [32] * 60
    sides[45] = 40
    imgs, run = _jpeg_folder(tmp_path / "imgs", sides), tmp_path / "run"
    coopt_fast.split(f"folder:{imgs}", run, participants=1, shared_fraction=0.1, seed=0)
    monkeypatch.setattr(decode, "SIZE_PEEK", peek)
    built = []
    real = decode._dali_pipeline
    monkeypatch.setattr(decode, "_dali_pipeline", lambda *a: built.append(a) or real(*a))
    runs = {dec: _variant(run, dec) for dec in ("dali", "torchvision")}
    for dec, r in runs.items():
        s = coopt_fast.extract(r, dec, 0, "convnet", batch_size=16, decoder=dec, workers=1, progress=False)
        assert s["rows"] == 60 and s["skipped_images"] == 0
    from coopt_fast.data import load_dataset

    odd = next(i for i, f in enumerate(load_dataset(f"folder:{imgs}").files) if f.name == "045.jpg")
    with_odd = [a[-1] for a in built if odd in set(a[1].tolist())]  # resize flag of each build over it
    if peek == 64:  # the full peek sees the 40 px file
        assert with_odd == [True]
    else:  # a one-file peek does not: the batch of mixed shapes rebuilds the pipeline with the resize on
        assert with_odd == [False, True]
    assert False in [a[-1] for a in built], "same-size files must get a pipeline without resize"
    a = _feats(runs["dali"], "dali")["shard/features"].astype(np.float32)
    b = _feats(runs["torchvision"], "torchvision")["shard/features"].astype(np.float32)
    assert (np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max() < 0.03
