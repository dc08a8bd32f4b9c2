import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import coopt_fast
from coopt_fast import store
from coopt_fast.errors import CooptError
from coopt_fast.kernels import uniformity_ref
from coopt_fast.priors import build_backbone, load_prior, save_checkpoint

from .conftest import requires_fmnist

pytestmark = requires_fmnist


def _datasets(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in ("shard/index", "shard/features", "shared/index", "shared/features")}


@pytest.fixture(scope="module")
def plan_base(tmp_path_factory):
    run = tmp_path_factory.mktemp("x")
    coopt_fast.split("fashion-mnist", run, participants=2, shared_fraction=0.05, seed=1, limit=600)
    return run


@pytest.fixture
def plan_run(plan_base, tmp_path):
    """A fresh copy of the plan per test: extract allows one participant per shard in a run."""
    return _copy_plan(plan_base, tmp_path / "run")


def _copy_plan(run, to):
    """Another run with the same plan: where a test compares two extractions of one shard."""
    to.mkdir()
    shutil.copy(run / "plan.json", to / "plan.json")
    return to


def test_round_trip_and_uniformity(small_run):
    f = store.open_complete(small_run / "participants" / "bob" / "features.h5", "features")
    with f:
        assert f["shard/features"].dtype == np.float16 and f["shard/features"].chunks is not None
        assert f["shard/features"].fletcher32
        assert f.attrs["complete"] and f.attrs["format_version"] == store.FORMAT_VERSION
        feats = torch.from_numpy(f["shared/features"][:].astype(np.float32))
        assert float(f.attrs["uniformity"]) == pytest.approx(float(uniformity_ref(feats)), abs=1e-5)
    plan = coopt_fast.plan.load_plan(small_run)
    d = _datasets(small_run / "participants" / "bob" / "features.h5")
    assert d["shard/index"].tolist() == plan["shards"][1] and d["shared/index"].tolist() == plan["shared"]


def test_labels_prior_is_one_hot(small_run):
    from coopt_fast.data import load_dataset

    d = _datasets(small_run / "participants" / "alice" / "features.h5")
    labels = load_dataset("fashion-mnist").labels[d["shard/index"]]
    assert d["shard/features"].shape[1] == 10
    assert np.array_equal(d["shard/features"].argmax(1), labels) and np.all(d["shard/features"].sum(1) == 1)


def test_resume_after_interruption_equals_uninterrupted(plan_run, tmp_path, monkeypatch):
    ref_run = _copy_plan(plan_run, tmp_path / "ref")
    coopt_fast.extract(ref_run, "ref", 0, "convnet", batch_size=64, progress=False)
    calls = {"n": 0}
    real = store.append_rows

    def dying(ds, block):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real(ds, block)

    monkeypatch.setattr(store, "append_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        coopt_fast.extract(plan_run, "cut", 0, "convnet", batch_size=64, progress=False)
    partial = plan_run / "participants" / "cut" / "features.h5.partial"
    assert partial.exists() and not (plan_run / "participants" / "cut" / "features.h5").exists()
    monkeypatch.setattr(store, "append_rows", real)
    s = coopt_fast.extract(plan_run, "cut", 0, "convnet", batch_size=64, progress=False)
    assert s["resumed"]
    a, b = _datasets(ref_run / "participants" / "ref" / "features.h5"), _datasets(plan_run / "participants" / "cut" / "features.h5")
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_kill_9_then_resume(plan_run, tmp_path):
    """A real SIGKILL mid-extraction; the rerun completes with the uninterrupted run's values."""
    cmd = [sys.executable, "-m", "coopt_fast", "extract", str(plan_run), "--participant", "killed", "--shard", "0",
           "--prior", "convnet", "--batch-size", "16", "--quiet"]
    partial = plan_run / "participants" / "killed" / "features.h5.partial"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and (not partial.exists() or partial.stat().st_size < 40_000):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists(), "killed before it wrote anything: the test proves nothing"
    # Resume must keep batch size 16 for itself. Compare with its own clean run.
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    clean_run = _copy_plan(plan_run, tmp_path / "clean")
    coopt_fast.extract(clean_run, "clean16", 0, "convnet", batch_size=16, progress=False)
    a = _datasets(clean_run / "participants" / "clean16" / "features.h5")
    b = _datasets(plan_run / "participants" / "killed" / "features.h5")
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_rerun_is_idempotent_and_conflict_is_refused(plan_run):
    s1 = coopt_fast.extract(plan_run, "idem", 1, "convnet", batch_size=256, progress=False)
    s2 = coopt_fast.extract(plan_run, "idem", 1, "convnet", batch_size=256, progress=False)
    assert s2["skipped"] and s1["uniformity"] == s2["uniformity"]
    with pytest.raises(CooptError, match="another extraction"):
        coopt_fast.extract(plan_run, "idem", 1, "convnet", batch_size=256, seed=5, progress=False)


@pytest.mark.parametrize("kwargs, msg", [
    ({"participant": "../evil"}, "participant name"),
    ({"participant": "a/b"}, "participant name"),
    ({"shard": 7}, "out of range"),
    ({"prior": "resnet9000"}, "unknown architecture"),
    ({"prior": "convnet:/nope.pt"}, "not found"),
    ({"batch_size": 0}, "batch-size"),
])
def test_bad_extract_inputs(plan_run, kwargs, msg):
    args = dict(participant="p", shard=0, prior="convnet", progress=False)
    args.update(kwargs)
    with pytest.raises(CooptError, match=msg):
        coopt_fast.extract(plan_run, args.pop("participant"), args.pop("shard"), args.pop("prior"), **args)


def test_seeded_prior_is_reproducible_and_checkpoint_round_trips(tmp_path):
    a, b = load_prior("convnet", seed=4), load_prior("convnet", seed=4)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(va, vb), ka
    m, _, _ = build_backbone("convnet", seed=9)
    for suffix in (".pt", ".safetensors"):
        save_checkpoint(tmp_path / f"c{suffix}", m, {"arch": "convnet", "input_size": 28})
        p = load_prior(f"convnet:{tmp_path / f'c{suffix}'}")
        assert p.input_size == 28 and len(p.checkpoint_sha256) == 64
        assert all(torch.equal(x, y) for x, y in zip(p.model.state_dict().values(), m.state_dict().values()))
    with pytest.raises(CooptError, match="architecture 'convnet', not 'resnet18'"):
        load_prior(f"resnet18:{tmp_path / 'c.pt'}")
    torch.save(build_backbone("resnet18")[0].state_dict(), tmp_path / "r.pt")
    with pytest.raises(CooptError, match="does not fit architecture"):
        load_prior(f"convnet:{tmp_path / 'r.pt'}")


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CooptError, match="refused to load"):
        load_prior(f"convnet:{tmp_path / 'evil.pt'}")
    assert not marker.exists()


def test_second_writer_is_refused_and_stale_lock_taken_over(plan_run):
    out = plan_run / "participants" / "locked" / "features.h5"
    cmd = [sys.executable, "-m", "coopt_fast", "extract", str(plan_run), "--participant", "locked", "--shard", "1",
           "--prior", "resnet18", "--batch-size", "8", "--decoder", "torchvision", "--quiet"]  # slow: ~10 s
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = out.with_name("features.h5.lock")
    deadline = time.time() + 60
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.02)
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode == 2 and "another writer holds this file" in second.stderr, second.stderr
    assert f"pid {first.pid}" in second.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert lock.exists(), "kill -9 leaves the lock behind"
    # The rerun takes the stale lock over (and then resumes the work; not waited for here).
    third = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and third.poll() is None:
        if lock.exists() and f'"pid": {third.pid}' in lock.read_text():
            break
        time.sleep(0.05)
    took_over = lock.exists() and f'"pid": {third.pid}' in lock.read_text()
    third.kill()
    third.wait()
    assert took_over, third.stderr.read() if third.stderr else ""


def test_status_reads_progress_while_extract_writes(plan_run):
    """SWMR: a reader sees a growing, consistent prefix of a file another process is writing."""
    from coopt_fast.status import status

    cmd = [sys.executable, "-m", "coopt_fast", "extract", str(plan_run), "--participant", "watched", "--shard", "0",
           "--prior", "resnet18", "--batch-size", "8", "--decoder", "torchvision", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = []
    deadline = time.time() + 90
    try:
        while time.time() < deadline and proc.poll() is None and len(set(seen)) < 3:
            row = next((r for r in status(plan_run)["participants"] if r["participant"] == "watched"), None)
            if row and row["state"] == "extracting" and row["rows_done"]:
                seen.append(row["rows_done"])
                assert row["rows_total"] == 330 and 0 < row["rows_done"] <= 330
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert len(set(seen)) >= 3 and seen == sorted(seen), seen
