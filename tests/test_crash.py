"""Crash safety (issue 7 §1): SIGKILL extract, align, merge and train at seeded random moments,
rerun, and check the outputs equal an uninterrupted run's.

The campaign is bench/crash_harness.py (its docstring has the method), run here at CI size:
about 20-25 kill points that land while the process works, in ~2-3 minutes on 2 cores; the
harness's `--full` mode has more kill points and larger data. Its "upload" part (5 more kills,
~30 s beside the campaigns) kills align and merge at exact points of publishing (an upload
half-published, a torn manifest.json, a store written but not renamed) and checks that merge
refuses with one line until the participant fixes it.

The other tests interrupt at chosen points in-process (KeyboardInterrupt from a patched call:
what Ctrl-C does, with the CLI's "rerun the same command to resume") to reach windows too
narrow for a random kill to hit reliably, and check that nothing reads a partial as complete.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
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
from coopt_fast.priors import file_sha256, read_checkpoint
from .conftest import make_npy

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    spec = importlib.util.spec_from_file_location("crash_harness", ROOT / "bench" / "crash_harness.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["crash_harness"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


harness = _harness()
MIN_KILLS_TOTAL = 20
MIN_KILLS_EACH = 3


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    results = harness.run_all(harness.Config(), tmp_path_factory.mktemp("crash"), seed=0)
    print("\n" + harness.table(results))
    return {r.command: r for r in results}


def test_at_least_20_kill_points_survived(campaign):
    total = sum(r.kills for r in campaign.values())
    assert total >= MIN_KILLS_TOTAL, harness.table(list(campaign.values()))
    assert sum(r.mid_write for r in campaign.values()) >= 5, "too few kills landed mid-write to prove much"


@pytest.mark.parametrize("command", harness.COMMANDS)
def test_killed_and_rerun_equals_uninterrupted(campaign, command):
    r = campaign[command]
    assert r.ok, "\n".join(r.failures)
    assert r.kills >= MIN_KILLS_EACH, f"{command}: only {r.kills} kills landed while it ran ({r.late} late)"
    assert r.sequences >= 1


def test_a_half_published_upload_is_refused_with_one_line_until_fixed(campaign):
    r = campaign[harness.UPLOAD]
    assert r.ok, "\n".join(r.failures)
    assert r.sequences == len(harness.UPLOAD_CASES)  # every scenario ended equal to the uncrashed store
    lines = {case: line for case, line in r.kill_log if isinstance(line, str)}
    for case, _, _, expect, _ in harness.UPLOAD_CASES:
        if expect is not None:
            assert expect in lines.get(case, "") and "\n" not in lines[case], (case, lines.get(case))


# ---- small runs for the in-process interruptions -------------------------------------------

@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("planned")
    run = root / "run"
    coopt_fast.split(make_npy(root / "data", 3000), run, participants=2, shared_fraction=0.05, seed=0)
    return run


@pytest.fixture(scope="module")
def extracted(planned, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("extracted") / "run"
    shutil.copytree(planned, run)
    for k, name in enumerate(("a", "b")):
        coopt_fast.extract(run, name, k, "labels", batch_size=64, progress=False)
    return run


@pytest.fixture(scope="module")
def aligned_ref(extracted, tmp_path_factory) -> Path:
    """Uninterrupted align at 256-row blocks (several blocks per shard, like a long run)."""
    run = tmp_path_factory.mktemp("aligned") / "run"
    shutil.copytree(extracted, run)
    with small_blocks():
        coopt_fast.align(run, dim=64, progress=False)
    return run


class small_blocks:
    def __enter__(self):
        self.mod = sys.modules["coopt_fast.align"]
        self.old, self.mod.APPLY_BLOCK_ROWS = self.mod.APPLY_BLOCK_ROWS, 256

    def __exit__(self, *exc):
        self.mod.APPLY_BLOCK_ROWS = self.old


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _datasets(path: Path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def _assert_same_datasets(ref: Path, got: Path) -> None:
    a, b = _datasets(ref), _datasets(got)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), f"{got}:{k} differs from the uninterrupted run"


def interrupt_when(monkeypatch, owner, name: str, when=lambda *a, **k: True):
    """Patch owner.name to raise KeyboardInterrupt (Ctrl-C) on the first call where `when` holds."""
    real = getattr(owner, name)
    fired = {"done": False}

    def wrapper(*args, **kwargs):
        if not fired["done"] and when(*args, **kwargs):
            fired["done"] = True
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return fired


# ---- no command takes a partial file for a complete one ------------------------------------

def _only_partial(run: Path, rel: str) -> None:
    p = run / rel
    p.rename(store.partial_path(p))


@pytest.mark.parametrize("rel, args, msg", [
    ("participants/b/features.h5", ("align", "{run}", "--dim", 16, "--participant", "b"), "not found"),
    ("participants/b/aligned.h5", ("merge", "{run}"), "shards [1] have no upload"),
    ("merged.h5", ("train", "{run}", "--out", "{run}/s", "--no-compile", "--input-size", 16), "a partial file exists"),
])
def test_a_partial_file_is_never_read_as_complete(extracted, tmp_path, rel, args, msg):
    run = _copy(extracted, tmp_path)
    coopt_fast.align(run, dim=16, progress=False)
    coopt_fast.merge(run, progress=False)
    _only_partial(run, rel)
    r = CliRunner().invoke(app, [a.format(run=run) if isinstance(a, str) else str(a) for a in args])
    assert r.exit_code == 2 and msg in r.stderr, r.stderr
    assert not (run / rel).exists()


def test_a_complete_false_file_under_its_final_name_is_refused(extracted, tmp_path):
    run = _copy(extracted, tmp_path)
    with h5py.File(run / "participants/b/features.h5", "r+") as f:
        f.attrs["complete"] = False
    r = CliRunner().invoke(app, ["align", str(run), "--dim", "16", "--quiet"])
    assert r.exit_code == 2 and "marked incomplete" in r.stderr, r.stderr
    assert not (run / "participants/a/aligned.h5").exists()


# ---- interruptions in the narrow windows ---------------------------------------------------

@pytest.mark.parametrize("nth", [1, 3, 7])
def test_extract_interrupted_mid_append_resumes_exactly(planned, extracted, tmp_path, monkeypatch, nth):
    run = _copy(planned, tmp_path)
    calls = {"n": 0}

    def count(*a, **k):
        calls["n"] += 1
        return calls["n"] == nth

    interrupt_when(monkeypatch, store, "append_rows", count)
    with pytest.raises(KeyboardInterrupt):
        coopt_fast.extract(run, "a", 0, "labels", batch_size=64, progress=False)
    monkeypatch.undo()
    assert not (run / "participants/a/features.h5").exists()
    s = coopt_fast.extract(run, "a", 0, "labels", batch_size=64, progress=False)
    assert s["resumed"]
    _assert_same_datasets(extracted / "participants/a/features.h5", run / "participants/a/features.h5")


def test_extract_interrupted_after_publish_records_the_manifest_on_rerun(planned, tmp_path, monkeypatch):
    run = _copy(planned, tmp_path)
    interrupt_when(monkeypatch, store, "write_manifest")
    with pytest.raises(KeyboardInterrupt):
        coopt_fast.extract(run, "a", 0, "labels", batch_size=64, progress=False)
    monkeypatch.undo()
    assert (run / "participants/a/features.h5").exists(), "published before the interruption"
    coopt_fast.extract(run, "a", 0, "labels", batch_size=64, progress=False)
    man = run / "participants/a/manifest.json"
    assert man.exists() and json.loads(man.read_text()).get("features.h5") == file_sha256(
        run / "participants/a/features.h5")


def test_extract_interrupted_between_index_and_skipped_resumes(planned, extracted, tmp_path, monkeypatch):
    run = _copy(planned, tmp_path)
    interrupt_when(monkeypatch, h5py.Group, "create_dataset", lambda self, name, *a, **k: name == "shard/skipped")
    with pytest.raises(KeyboardInterrupt):
        coopt_fast.extract(run, "a", 0, "labels", batch_size=64, progress=False)
    monkeypatch.undo()
    coopt_fast.extract(run, "a", 0, "labels", batch_size=64, progress=False)
    _assert_same_datasets(extracted / "participants/a/features.h5", run / "participants/a/features.h5")


@pytest.mark.parametrize("nth", [2, 5])
def test_align_interrupted_between_blocks_resumes_exactly(extracted, aligned_ref, tmp_path, monkeypatch, nth):
    """Ctrl-C at a block boundary (before the rows of block `nth` are written)."""
    run = _copy(extracted, tmp_path)
    calls = {"n": 0}

    def count(*a, **k):
        calls["n"] += 1
        return calls["n"] == nth

    from coopt_fast import kernels  # align imports align_apply at call time: the patch is seen

    interrupt_when(monkeypatch, kernels, "align_apply", count)
    with small_blocks(), pytest.raises(KeyboardInterrupt):
        coopt_fast.align(run, dim=64, progress=False)
    monkeypatch.undo()
    with small_blocks():
        coopt_fast.align(run, dim=64, progress=False)
    for name in ("a", "b"):
        _assert_same_datasets(aligned_ref / f"participants/{name}/aligned.h5", run / f"participants/{name}/aligned.h5")


def test_align_interrupted_between_stats_datasets_resumes(extracted, aligned_ref, tmp_path, monkeypatch):
    run = _copy(extracted, tmp_path)
    interrupt_when(monkeypatch, h5py.Group, "create_dataset", lambda self, name, *a, **k: name == "stats/sumsq")
    with small_blocks(), pytest.raises(KeyboardInterrupt):
        coopt_fast.align(run, dim=64, progress=False)
    monkeypatch.undo()
    with small_blocks():
        coopt_fast.align(run, dim=64, progress=False)
    for name in ("a", "b"):
        _assert_same_datasets(aligned_ref / f"participants/{name}/aligned.h5", run / f"participants/{name}/aligned.h5")


def test_align_interrupted_between_stats_and_rows_done_keeps_exact_stats(extracted, aligned_ref, tmp_path,
                                                                         monkeypatch):
    """Stop after a block's rows and statistics are written but before rows_done moves: the rerun
    must neither redo the block's statistics twice nor lose them."""
    run = _copy(extracted, tmp_path)
    calls = {"n": 0}

    def third(ds, n):
        calls["n"] += 1
        return calls["n"] == 3

    interrupt_when(monkeypatch, store, "set_rows_done", third)
    with small_blocks(), pytest.raises(KeyboardInterrupt):
        coopt_fast.align(run, dim=64, progress=False)
    monkeypatch.undo()
    with small_blocks():
        coopt_fast.align(run, dim=64, progress=False)
    for name in ("a", "b"):
        _assert_same_datasets(aligned_ref / f"participants/{name}/aligned.h5", run / f"participants/{name}/aligned.h5")


def test_merge_interrupted_leaves_nothing(aligned_ref, tmp_path, monkeypatch):
    run = _copy(aligned_ref, tmp_path)
    interrupt_when(monkeypatch, store, "publish")
    with pytest.raises(KeyboardInterrupt):
        coopt_fast.merge(run, progress=False)
    monkeypatch.undo()
    assert not (run / "merged.h5").exists() and not (run / "merged.h5.partial").exists()
    assert not (run / "merged.h5.lock").exists()


# ---- train: the checkpoint at the same step ------------------------------------------------

@pytest.fixture(scope="module")
def student_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("student-store")
    run = root / "run"
    coopt_fast.split(make_npy(root / "data", 64, hw=16, classes=4), run, participants=2, shared_fraction=0.25)
    for k, name in enumerate(("a", "b")):
        coopt_fast.extract(run, name, k, "labels", progress=False)
    coopt_fast.align(run, dim=16, progress=False)
    coopt_fast.merge(run, progress=False)
    return run / "merged.h5"


TRAIN = dict(batch_size=16, input_size=16, compile=False, device="cpu", progress=False)


@pytest.fixture(scope="module")
def trained_ref(student_store, tmp_path_factory) -> Path:
    from coopt_fast.student import train

    out = tmp_path_factory.mktemp("trained") / "out"
    train(student_store, "convnet", 2, out, **TRAIN)
    return out


def _assert_same_checkpoint(ref: Path, got: Path) -> None:
    sa, ma = read_checkpoint(ref / "student.pt")
    sb, mb = read_checkpoint(got / "student.pt")
    assert (mb["epochs"], mb["steps"]) == (ma["epochs"], ma["steps"])
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"student.pt[{k}] differs from the uninterrupted run"
    a = torch.load(ref / "state.pt", weights_only=True)
    b = torch.load(got / "state.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"state.pt model[{k}]"
    la = [json.loads(x)["loss"] for x in (ref / "train.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (got / "train.jsonl").read_text().splitlines()]
    assert la == lb


@pytest.mark.parametrize("at", ["state", "checkpoint"])
def test_train_interrupted_in_the_first_epoch_save_resumes_exactly(student_store, trained_ref, tmp_path, monkeypatch,
                                                                    at):
    """Ctrl-C while epoch 1 is being saved (writing state.pt, or student.pt after it)."""
    from coopt_fast import student

    name = {"state": "save_state", "checkpoint": "save_checkpoint"}[at]
    interrupt_when(monkeypatch, student, name)
    with pytest.raises(KeyboardInterrupt):
        student.train(student_store, "convnet", 2, tmp_path / "out", **TRAIN)
    monkeypatch.undo()
    student.train(student_store, "convnet", 2, tmp_path / "out", resume=True, **TRAIN)
    _assert_same_checkpoint(trained_ref, tmp_path / "out")


def test_train_interrupted_after_last_state_save_resumes_to_the_final_checkpoint(student_store, trained_ref,
                                                                                  tmp_path, monkeypatch):
    from coopt_fast import student

    interrupt_when(monkeypatch, student, "save_checkpoint", lambda path, model, meta: meta.get("epochs") == 2)
    with pytest.raises(KeyboardInterrupt):
        student.train(student_store, "convnet", 2, tmp_path / "out", **TRAIN)
    monkeypatch.undo()
    student.train(student_store, "convnet", 2, tmp_path / "out", resume=True, **TRAIN)
    _assert_same_checkpoint(trained_ref, tmp_path / "out")
