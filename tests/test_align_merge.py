import shutil

import h5py
import numpy as np
import pytest
import torch

import coopt_fast
from coopt_fast import store
from coopt_fast.align import fit_map, projection, projection_seed
from coopt_fast.errors import CooptError
from coopt_fast.plan import load_plan

from .conftest import requires_fmnist

pytestmark = requires_fmnist


def _h5(path, *keys):
    with h5py.File(path, "r") as f:
        return [f[k][:] for k in keys]


def test_targets_are_features_times_map(small_run):
    for name in ("alice", "bob", "carol"):
        d = small_run / "participants" / name
        feats, = _h5(d / "features.h5", "shard/features")
        tg, m, w = _h5(d / "aligned.h5", "shard/targets", "map", "projection")
        want = (torch.from_numpy(feats).float() @ torch.from_numpy(m)).half().numpy()
        assert np.array_equal(tg, want), name
        plan = load_plan(small_run)
        assert np.array_equal(w, projection(feats.shape[1], 32, projection_seed(plan["seed"], name)).numpy())


def test_reference_is_best_by_the_default_score_and_publishes_s_star(tmp_path, small_run):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    coopt_fast.align(run, dim=32, reference="best", progress=False, force=True)  # over the consensus
    s = coopt_fast.score(run)
    best = s["best"]
    with h5py.File(run / "participants" / best / "aligned.h5", "r") as f:
        assert f.attrs["reference"] == best and float(f.attrs["residual"]) == 0.0
        assert np.array_equal(f["map"][:], f["projection"][:])
    us = [r[s["by"].replace("-", "_")] for r in s["participants"]]
    assert us == sorted(us) and s["participants"][0]["participant"] == best
    by_u = coopt_fast.score(run, by="uniformity")["participants"]
    assert [r["uniformity"] for r in by_u] == sorted(r["uniformity"] for r in by_u)


def test_fit_matches_numpy_lstsq():
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(300, 40, generator=g)
    w = projection(40, 24, 1)
    target = torch.randn(300, 24, generator=g)
    m, lam = fit_map(fs, w, target, ridge=0.0)
    t_np = np.linalg.lstsq((fs.double() @ w.double()).numpy(), target.double().numpy(), rcond=None)[0]
    assert lam == 0.0
    np.testing.assert_allclose(m.numpy(), (w.double().numpy() @ t_np), rtol=1e-4, atol=1e-5)


def test_fit_accurate_when_s_close_to_l():
    """|S| = l_k + 2: normal equations would square an already large condition number."""
    g = torch.Generator().manual_seed(1)
    fs = torch.randn(66, 64, generator=g, dtype=torch.float64)
    true = torch.randn(64, 16, generator=g, dtype=torch.float64)
    w = projection(64, 80, 2)  # n > l_k: W has full row rank, any l_k x n map is W T
    m, _ = fit_map(fs.float(), w, (fs @ true).float(), ridge=0.0)
    assert torch.allclose(m.double(), true, atol=1e-3), (m.double() - true).abs().max()


def test_reference_none_is_w_only(tmp_path, small_run):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    coopt_fast.align(run, dim=32, reference="none", progress=False, force=True)  # over the consensus
    for name in ("alice", "bob"):
        feats, = _h5(run / "participants" / name / "features.h5", "shard/features")
        tg, m, w = _h5(run / "participants" / name / "aligned.h5", "shard/targets", "map", "projection")
        assert np.array_equal(m, w)
        assert np.array_equal(tg, (torch.from_numpy(feats).float() @ torch.from_numpy(w)).half().numpy())


def test_local_mode_equals_all_at_once(tmp_path, small_run):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    for d in (run / "participants").iterdir():
        (d / "aligned.h5").unlink()
    # --reference best: the reference publishes S* first (consensus: tests/test_targets.py)
    best = coopt_fast.score(run)["best"]
    other = next(n for n in ("alice", "bob", "carol") if n != best)
    with pytest.raises(CooptError, match="has not published"):
        coopt_fast.align(run, dim=32, participant=other, reference="best", progress=False)
    coopt_fast.align(run, dim=32, participant=best, reference="best", progress=False)
    coopt_fast.align(run, dim=32, participant=other, reference="best", progress=False)
    at_once = tmp_path / "at_once"
    shutil.copytree(small_run, at_once)
    coopt_fast.align(at_once, dim=32, reference="best", progress=False, force=True)  # over the consensus
    a, = _h5(run / "participants" / other / "aligned.h5", "shard/targets")
    b, = _h5(at_once / "participants" / other / "aligned.h5", "shard/targets")
    assert np.array_equal(a, b)


def test_merged_store_layout(small_run):
    with store.open_complete(small_run / "merged.h5", "merged") as f:
        assert f["targets"].chunks is None and f["targets"].compression is None
        assert f["index"][:].tolist() == list(range(2000))
        meta = store.merged_meta(f, small_run / "merged.h5")
        names, inputs = meta["participants"], meta["inputs"]
        owner = f["participant"][:]
        tg = f["targets"][:]
        mean, std = f["target_mean"][:], f["target_std"][:]
    assert set(inputs) == {f"participants/{n}/aligned.h5" for n in names}
    for pos, name in enumerate(names):
        rows, = np.nonzero(owner == pos)
        want, idx = _h5(small_run / "participants" / name / "aligned.h5", "shard/targets", "shard/index")
        assert np.array_equal(rows, idx) and np.array_equal(tg[rows], want)
    np.testing.assert_allclose(mean, tg.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, tg.astype(np.float64).std(0), rtol=1e-4, atol=1e-6)
    mm = store.memmap(small_run / "merged.h5", "targets")
    assert np.array_equal(np.asarray(mm), tg)


def _corrupt(run, name, fn, record=True):
    """A bad upload; record=True: its participant recorded the bad file's hash (honest but wrong)."""
    p = run / "participants" / name / "aligned.h5"
    with h5py.File(p, "r+") as f:
        fn(f)
    if record:
        store.write_manifest(p.parent, p.name)


def test_merge_refuses_upload_changed_after_recording(tmp_path, small_run):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "merged.h5").unlink()
    _corrupt(run, "carol", lambda f: f["shard/targets"].__setitem__((3, 3), 1.5), record=False)
    with pytest.raises(CooptError, match="carol.*differs from the .* its participant recorded"):
        coopt_fast.merge(run, progress=False)


def _steal_one_index(f):
    """Replace the upload's last index with one from shard 0 (still unique, still ascending-ish)."""
    with h5py.File(f.filename.replace("bob", "alice"), "r") as a:
        other = a["shard/index"][-1]
    f["shard/index"][-1] = other


@pytest.mark.parametrize("fault, msg", [
    (lambda f: f["shard/targets"].__setitem__((0, 0), np.nan), "NaN or Inf"),
    (lambda f: f["shard/index"].__setitem__(0, f["shard/index"][1]), "duplicate"),
    (lambda f: f["shard/index"].__setitem__(0, 10**9), "out of range"),
    (lambda f: f.attrs.__setitem__("complete", False), "incomplete"),
    (lambda f: f.attrs.__setitem__("format_version", 99), "format_version is 99"),
    (lambda f: _steal_one_index(f), "exactly one shard"),
])
def test_merge_refuses_bad_uploads(tmp_path, small_run, fault, msg):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "merged.h5").unlink()
    _corrupt(run, "bob", fault)
    with pytest.raises(CooptError, match=msg) as e:
        coopt_fast.merge(run, progress=False)
    assert "bob" in str(e.value)
    assert not (run / "merged.h5").exists() and not (run / "merged.h5.partial").exists()


def test_merge_missing_shard(tmp_path, small_run):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "participants" / "carol" / "aligned.h5").unlink()
    with pytest.raises(CooptError, match=r"shards \[2\] have no upload"):
        coopt_fast.merge(run, progress=False)
    s = coopt_fast.merge(run, allow_missing=True, progress=False, force=True)  # over the 3-shard store
    assert s["missing_shards"] == [2] and s["rows"] == 2000 - len(load_plan(run)["shards"][2])


def test_duplicate_upload_of_a_shard(tmp_path, small_run):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    shutil.copytree(run / "participants" / "bob", run / "participants" / "mallory")
    with pytest.raises(CooptError, match="covers shard 1, already uploaded by bob"):
        coopt_fast.merge(run, progress=False)


def test_inspect_g_sees_what_alignment_leaves(small_run):
    s = coopt_fast.inspect(small_run)
    g, ci = s["inconsistency"], s["inconsistency_ci95"]
    assert g["before"] > 0.9 and ci["before"][0] <= g["before"] <= ci["before"][1], (g, ci)
    # alice's targets are her one-hot labels mapped: 10 points, which the MLP test tells apart from
    # the others' continuous targets; the linear test, seeing means only, reads them as close.
    lin = coopt_fast.inspect(small_run, plot=False, classifier="linear")["inconsistency"]
    assert lin["before"] > 0.5 > lin["after"] and g["after"] > lin["after"] + 0.3, (g, lin)
    assert (small_run / "inspect.png").stat().st_size > 10_000


def test_verify_passes_a_good_run_and_names_each_fault(tmp_path, small_run):
    from coopt_fast.verify import verify

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    good = verify(run)
    assert good["ok"], [c for c in good["checks"] if not c["ok"]]
    # A flipped byte inside a checksummed chunk, a changed upload, a partial file left behind.
    feats = run / "participants" / "bob" / "features.h5"
    with h5py.File(feats, "r") as f:
        off = f["shard/features"].id.get_chunk_info(0).byte_offset
    raw = bytearray(feats.read_bytes())
    raw[off + 10] ^= 0xFF
    feats.write_bytes(bytes(raw))
    _corrupt(run, "carol", lambda f: f["shard/targets"].__setitem__((0, 0), 2.0), record=False)
    (run / "participants" / "alice" / "aligned.h5.partial").write_bytes(b"")
    bad = {(c["file"], c["check"]) for c in verify(run)["checks"] if not c["ok"]}
    assert ("participants/bob/features.h5", "checksums") in bad
    assert ("participants/bob/features.h5", "sha256") in bad
    assert ("participants/carol/aligned.h5", "sha256") in bad
    assert ("merged.h5", "input participants/carol/aligned.h5") in bad
    from typer.testing import CliRunner

    from coopt_fast.cli import app

    r = CliRunner().invoke(app, ["verify", str(run)])
    assert r.exit_code == 1 and "FAULT" in r.stderr
