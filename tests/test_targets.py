"""Targets that keep their information: the prior scores on S, the reference they pick, align's
warnings, and the inconsistency estimate G (a two-sample test's TV lower bound with an interval)."""
import json

import numpy as np
import pytest
import torch

from coopt_fast import publish, scores
from coopt_fast.diagnostics import tv_lower_bound


# ---- G: tv_lower_bound ------------------------------------------------------------------------

def _gauss(n, d, seed, scale=None, rot=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if scale is not None:
        x = x * scale
    return x if rot is None else x @ rot


def test_tv_lower_bound_sees_covariance_differences_the_linear_test_misses():
    # Equal means, different covariances. Rotated: an anisotropic spectrum against the same
    # spectrum rotated. Scaled: N(0, I) against N(0, 4 I). True TV is large in both.
    d = 12
    spec = torch.tensor([4.0, 3.0] + [0.5] * (d - 2), dtype=torch.float64)
    rot = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64))[0]
    rotated = _gauss(1200, d, 0, spec), _gauss(1200, d, 1, spec, rot)
    scaled = _gauss(1000, d, 2), _gauss(1000, d, 3, 2.0)
    for a, b in (rotated, scaled):
        r = tv_lower_bound(a, b, seed=0)  # default: the MLP
        assert r["ci95"][0] > 0.6, r
        assert r["ci95"][0] <= r["estimate"] <= r["ci95"][1]
        assert tv_lower_bound(a, b, seed=0, classifier="linear")["estimate"] < 0.15  # the old estimator
    assert tv_lower_bound(*rotated, seed=0, classifier="knn")["ci95"][0] > 0.6
    assert tv_lower_bound(*scaled, seed=0, classifier="knn")["estimate"] < 0.4  # kNN's blind spot: scale


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tv_lower_bound_of_identical_distributions_has_an_interval_containing_zero(seed):
    a, b = _gauss(1000, 16, 10 + seed), _gauss(1000, 16, 20 + seed)
    for clf in ("mlp", "knn"):
        r = tv_lower_bound(a, b, seed=seed, classifier=clf)
        assert r["ci95"][0] < 0 < r["ci95"][1], r
        assert abs(r["estimate"]) < 0.12  # not clipped at 0: noise reads either side of it
        assert r["n_test"] == 1000


def test_tv_lower_bound_halves_are_stratified_and_unequal_sizes_are_balanced():
    r = tv_lower_bound(_gauss(301, 4, 0), _gauss(1000, 4, 1), seed=0)
    assert r["n_test"] == 2 * (301 - 301 // 2)  # test half: the same count from each sample
    with pytest.raises(ValueError, match="at least 4 rows"):
        tv_lower_bound(_gauss(3, 4, 0), _gauss(10, 4, 1))
    with pytest.raises(ValueError, match="classifier"):
        tv_lower_bound(_gauss(10, 4, 0), _gauss(10, 4, 1), classifier="svm")


# ---- scores on S -------------------------------------------------------------------------------

def test_effective_rank_counts_the_directions_used():
    rng = np.random.default_rng(0)
    assert scores.effective_rank(rng.standard_normal((4000, 8))) == pytest.approx(8, rel=0.02)
    line = np.outer(np.arange(50.0), np.ones(6))
    assert scores.effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    onehot = np.eye(10)[np.arange(1000) % 10]
    assert scores.effective_rank(onehot) == pytest.approx(9.0, abs=1e-6)
    assert scores.effective_rank(np.ones((5, 3))) == 0.0


def test_centring_removes_the_post_relu_offset_that_biases_uniformity():
    # Non-negative features (post-ReLU): raw U cannot go low, one-hot labels win it; centred U
    # ranks by spread, and the spread-out features beat the 10 one-hot corners.
    g = torch.Generator().manual_seed(0)
    # (a shared positive offset, as real post-ReLU features have: U -1.53 here; centred U -3.88)
    relu = torch.relu(torch.randn(2000, 64, generator=g) + 1.0)
    labels = torch.nn.functional.one_hot(torch.arange(2000) % 10, 10).float()
    raw = {"relu": scores.compute(relu, "uniformity"), "labels": scores.compute(labels, "uniformity")}
    cen = {"relu": scores.compute(relu, "uniformity-centred"), "labels": scores.compute(labels, "uniformity-centred")}
    assert scores.best(raw, "uniformity") == "labels"
    assert scores.best(cen, "uniformity-centred") == "relu"
    assert scores.best({"a": 3.0, "b": 9.0, "c": float("nan")}, "effective-rank") == "b"
    assert scores.best({"a": float("nan")}, "uniformity") is None
    with pytest.raises(ValueError, match="unknown score"):
        scores.compute(relu, "accuracy")


# ---- align: the reference choice and its warnings ------------------------------------------------

def test_reference_choice_keeps_labels_from_collapsing_the_store(small_run, tmp_path):
    import shutil

    import coopt_fast

    # small_run: alice = one-hot labels, bob = random convnet, carol = resnet18 checkpoint; |S| = 200
    sc = coopt_fast.score(small_run)
    assert sc["by"] == scores.DEFAULT_SCORE and sc["picks"]["uniformity"] == "alice"
    assert {r["participant"] for r in sc["participants"]} == {"alice", "bob", "carol"}
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    paper = coopt_fast.align(run, dim=32, reference="best", score="uniformity", progress=False, force=True)
    assert paper["reference"] == "alice" and paper["score"] == "uniformity"
    assert any("effective rank" in w and "alice" in w and "consensus" in w for w in paper["warnings"]), paper["warnings"]
    rank_paper = scores.effective_rank(_merged(run))
    best = coopt_fast.align(run, dim=32, reference="best", progress=False, force=True)
    assert best["reference"] == sc["best"] == "carol"
    assert scores.effective_rank(_merged(run)) > rank_paper + 3  # the labels' ~9 directions, and more
    # the reference (carol, resnet18) is not fitted; bob's convnet is: 200 rows of S for 256 dims
    under = [w for w in best["warnings"] if "under-determined" in w]
    assert len(under) == 1 and under[0].startswith("bob: 200 usable rows of S for 256 feature dims"), under
    default = coopt_fast.align(run, dim=32, progress=False, force=True)
    assert default["reference"] == "consensus" and default["score"] is None
    assert scores.effective_rank(_merged(run)) > rank_paper + 3


def _merged(run):
    import h5py

    import coopt_fast

    coopt_fast.merge(run, progress=False, force=True)  # each realignment replaces the store
    with h5py.File(run / "merged.h5", "r") as f:
        return f["targets"][:].astype(np.float32)


def test_cli_align_prints_warnings_and_rejects_an_unknown_score(small_run, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from coopt_fast.cli.app import app

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    r = CliRunner().invoke(app, ["align", str(run), "--dim", "32", "--score", "uniformity", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["warnings"] and all(f"warning: {w}" in r.stderr for w in out["warnings"])
    r = CliRunner().invoke(app, ["align", str(run), "--score", "accuracy"])
    assert r.exit_code == 2 and "'--score'" in r.stderr and "'accuracy'" in r.stderr, r.stderr


def _projected_identity(run, name, dim):
    """What align publishes as NAME's projected features on S (coopt_fast.align._shared_identity)."""
    from coopt_fast.align import projection_seed

    rec = publish.read_record(run, name)
    seed = json.loads((run / "plan.json").read_text())["seed"]
    return {"participant": name, "kind": "projected", "dim": dim, "projection_seed": projection_seed(seed, name),
            "round": rec["round"], "features_sha256": rec["features_sha256"]}


def test_consensus_reference_fits_everyone_to_the_shared_directions(small_run, tmp_path):
    import shutil

    import coopt_fast
    from coopt_fast.align import consensus_targets

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    s = coopt_fast.align(run, dim=32, reference="consensus", progress=False)
    assert s["reference"] == "consensus" and s["score"] is None
    assert all(not r["reference"] and r["residual"] > 0 for r in s["participants"])  # nobody is S* itself
    blocks = {nm: publish.read_shared(run, nm, _projected_identity(run, nm, 32)) for nm in ("alice", "bob", "carol")}
    seed = json.loads((run / "plan.json").read_text())["seed"]
    s_star, ok = consensus_targets(blocks, 32, seed)
    assert s_star.shape == (len(ok), 32) and bool(ok.all())
    assert float(s_star[ok].square().mean()) == pytest.approx(1.0, rel=1e-4)  # unit RMS: fp16 keeps precision
    # deterministic: recomputed the same, and local mode gives the same bits as all at once
    assert torch.equal(consensus_targets(blocks, 32, seed)[0], s_star)
    local = tmp_path / "local"
    shutil.copytree(small_run, local)
    for nm in ("bob", "alice", "carol"):
        # force: the copy holds small_run's all-at-once files, which local mode must recompute
        coopt_fast.align(local, dim=32, participant=nm, reference="consensus", progress=False, force=True)
    for nm in ("alice", "bob", "carol"):
        a = _h5(run / "participants" / nm / "aligned.h5")
        b = _h5(local / "participants" / nm / "aligned.h5")
        assert np.array_equal(a, b), nm
    y = _merged(run)
    # labels do not decide the space alone: the store keeps more directions than labels-as-reference
    assert len(y) == 2000 and scores.effective_rank(y) > 12


def _h5(path):
    import h5py

    with h5py.File(path, "r") as f:
        assert f.attrs["reference"] == "consensus"
        return f["shard/targets"][:]
