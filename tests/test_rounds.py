"""Collaboration rounds: a higher --round archives the participant's previous round under
rounds/R/, merge takes each participant's latest, and everything else reads only the latest."""
import importlib
import json
import os
import shutil
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import coopt_fast
from coopt_fast.cli import app
from coopt_fast import store
from coopt_fast.errors import CooptError
from coopt_fast.priors import file_sha256

from .conftest import requires_fmnist

pytestmark = requires_fmnist
ROUND_FILES = ("aligned.h5", "shared.h5", "record.json", "manifest.json", "features.h5")
extract_mod = importlib.import_module("coopt_fast.extract")  # the module (coopt_fast.extract is the function)


def _pipeline(run, b_seed: int, b_round: int) -> dict:
    """a: labels (round 0), b: convnet seeded b_seed at round b_round; aligned and merged."""
    coopt_fast.extract(run, "a", 0, "labels", progress=False)
    coopt_fast.extract(run, "b", 1, "convnet", seed=b_seed, round=b_round, batch_size=100, progress=False)
    coopt_fast.align(run, dim=16, progress=False)
    return coopt_fast.merge(run, progress=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """300 Fashion-MNIST images, 2 participants, everyone at round 0, merged."""
    run = tmp_path_factory.mktemp("rounds") / "base"
    coopt_fast.split("fashion-mnist", run, participants=2, shared_fraction=0.2, seed=0, limit=300)
    _pipeline(run, b_seed=0, b_round=0)
    return run


@pytest.fixture
def run(base, tmp_path):
    shutil.copytree(base, tmp_path / "run")
    return tmp_path / "run"


def _merged(run):
    with h5py.File(run / "merged.h5", "r") as f:
        return {"targets": f["targets"][:], "index": f["index"][:], "participant": f["participant"][:],
                "rounds": store.merged_meta(f, run / "merged.h5")["rounds"]}


def test_round_upgrade_archives_and_merge_takes_the_latest(base, run, tmp_path):
    b = run / "participants" / "b"
    before = {n: file_sha256(b / n) for n in ROUND_FILES}
    s = coopt_fast.extract(run, "b", 1, "convnet", seed=1, round=1, batch_size=100, progress=False)
    assert s["round"] == 1 and s["archived"] == str(b / "rounds" / "0")
    # The whole previous round moved, byte for byte; the top level holds round 1, not yet aligned.
    assert {n: file_sha256(b / "rounds" / "0" / n) for n in ROUND_FILES} == before
    assert not (b / "aligned.h5").exists()
    assert json.loads((b / "manifest.json").read_text()) == {n: file_sha256(b / n) for n in ("features.h5", "record.json")}
    with h5py.File(b / "features.h5", "r") as f:
        assert int(f.attrs["round"]) == 1 and int(f.attrs["seed"]) == 1

    # b alone realigns: a's upload was fitted to the old consensus S*, and merge says so
    coopt_fast.align(run, dim=16, participant="b", progress=False)
    with pytest.raises(CooptError, match=r"different S\*.*rerun align for every participant"):
        coopt_fast.merge(run, progress=False)
    a = coopt_fast.align(run, dim=16, progress=False, force=True)  # a realigns to the new S*
    assert {r["participant"]: r["round"] for r in a["participants"]} == {"a": 0, "b": 1}
    with h5py.File(b / "aligned.h5", "r") as f:
        assert int(f.attrs["round"]) == 1
    m = coopt_fast.merge(run, progress=False, force=True)  # over round 0's merged.h5
    assert m["rounds"] == {"a": 0, "b": 1}
    got = _merged(run)
    assert got["rounds"] == {"a": 0, "b": 1}

    # A fresh run of the new prior alone (same plan, one round) merges to the same targets.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(run / "plan.json", fresh / "plan.json")
    _pipeline(fresh, b_seed=1, b_round=0)
    want = _merged(fresh)
    for k in ("targets", "index", "participant"):
        assert np.array_equal(got[k], want[k]), k
    # ... which are not round 0's: b's rows changed, and so did a's (the consensus S* moved with b)
    old = _merged(base)
    assert old["rounds"] == {"a": 0, "b": 0}
    of_b = got["participant"] == 1
    assert not np.array_equal(got["targets"][of_b], old["targets"][of_b])
    assert not np.array_equal(got["targets"][~of_b], old["targets"][~of_b])

    # Everything else reads only the latest round; verify finds it all fine.
    v = coopt_fast.verify(run)
    assert v["ok"], [c for c in v["checks"] if not c["ok"]]
    assert not any("rounds" in c["file"] for c in v["checks"])
    st = coopt_fast.status(run)
    assert sorted(p["participant"] for p in st["participants"]) == ["a", "b"]
    assert all(p["state"] == "extracted" and p["aligned"] for p in st["participants"])
    assert {p["participant"] for p in coopt_fast.score(run)["participants"]} == {"a", "b"}
    assert {p["participant"] for p in coopt_fast.inspect(run, plot=False)["participants"]} == {"a", "b"}


@pytest.mark.parametrize("round_, msg", [
    (1, "holds round 2, newer than --round 1"),
    (-1, "--round must be >= 0, got -1"),
])
def test_older_or_negative_round_is_refused_one_line_exit_2(run, round_, msg):
    b = run / "participants" / "b"
    coopt_fast.extract(run, "b", 1, "labels", round=2, progress=False)
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    r = CliRunner().invoke(app, ["extract", str(run), "--participant", "b", "--shard", "1", "--prior", "convnet",
                                 "--round", str(round_), "--quiet"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.stderr
    if round_ >= 0:
        assert str(b / "features.h5") in lines[0]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == files  # nothing moved or written


def test_same_round_other_prior_is_still_refused(run):
    with pytest.raises(CooptError, match="exists from another extraction of round 0"):
        coopt_fast.extract(run, "b", 1, "labels", round=0, progress=False)
    assert not (run / "participants" / "b" / "rounds").exists()


def test_interrupted_archive_is_finished_by_a_rerun(run):
    """A crash after the first move (aligned.h5 archived, the rest not) and a stale align partial."""
    b = run / "participants" / "b"
    before = {n: file_sha256(b / n) for n in ROUND_FILES}
    (b / "rounds" / "0").mkdir(parents=True)
    os.replace(b / "aligned.h5", b / "rounds" / "0" / "aligned.h5")
    (b / "aligned.h5.partial").write_bytes(b"stale")
    s = coopt_fast.extract(run, "b", 1, "labels", round=1, progress=False)
    assert s["archived"] == str(b / "rounds" / "0") and s["round"] == 1
    assert {n: file_sha256(b / "rounds" / "0" / n) for n in ROUND_FILES} == before
    assert not (b / "aligned.h5.partial").exists() and not (b / "aligned.h5").exists()
    # The archived round is self-consistent: its manifest matches its files.
    man = json.loads((b / "rounds" / "0" / "manifest.json").read_text())
    assert man == {n: before[n] for n in ("features.h5", "aligned.h5", "shared.h5", "record.json")}


def test_archive_never_overwrites_an_earlier_archive(run):
    b = run / "participants" / "b"
    (b / "rounds" / "0").mkdir(parents=True)
    shutil.copy(b / "features.h5", b / "rounds" / "0" / "features.h5")
    with pytest.raises(CooptError, match=r"rounds/0/features.h5: round 0 is already archived there"):
        coopt_fast.extract(run, "b", 1, "labels", round=1, progress=False)
    assert all((b / n).exists() for n in ROUND_FILES)  # refused before moving anything
    assert sorted(p.name for p in (b / "rounds" / "0").iterdir()) == ["features.h5"]


def test_torchrun_ranks_above_0_wait_for_rank_0s_archive(run, monkeypatch):
    """Under torchrun only rank 0 archives; another rank polls until the older round is gone,
    and gives up with one line if it never goes."""
    out = run / "participants" / "b" / "features.h5"
    monkeypatch.setattr(extract_mod, "ROUND_WAIT_SECONDS", 0.5)
    with pytest.raises(CooptError, match="rank 1 waited 0.5 s for rank 0 to archive round 0"):
        extract_mod._retire_older_round(out, 1, rank=1, world=2, published=out.parent)
    assert out.exists()
    monkeypatch.setattr(extract_mod, "ROUND_WAIT_SECONDS", 30)
    t = threading.Timer(0.3, extract_mod.archive_round, (out.parent, 0))
    t.start()
    assert extract_mod._retire_older_round(out, 1, rank=1, world=2, published=out.parent) is None
    assert not out.exists()  # it returned only once rank 0's archive had moved features.h5
    t.join()
    assert (out.parent / "rounds" / "0" / "features.h5").exists()


def test_torchrun_round_upgrade_equals_one_process(run, tmp_path):
    """Two gloo ranks extracting round 1: rank 0 archives round 0, rank 1 waits; the result is
    the one-process extraction of round 1."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    b = run / "participants" / "b"
    before = file_sha256(b / "features.h5")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "coopt_fast", "extract", str(run),
           "--participant", "b", "--shard", "1", "--prior", "convnet", "--seed", "1", "--round", "1",
           "--batch-size", "100", "--decoder", "torchvision", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert file_sha256(b / "rounds" / "0" / "features.h5") == before
    alone = tmp_path / "alone"  # a run of its own: b holds shard 1 here, one participant per shard
    alone.mkdir()
    shutil.copy(run / "plan.json", alone / "plan.json")
    coopt_fast.extract(alone, "single", 1, "convnet", seed=1, round=1, batch_size=100, decoder="torchvision",
                       progress=False)
    single = alone / "participants" / "single" / "features.h5"
    with h5py.File(b / "features.h5", "r") as f, h5py.File(single, "r") as g:
        assert int(f.attrs["round"]) == 1
        for k in ("shard/index", "shard/features", "shared/index", "shared/features"):
            assert np.array_equal(f[k][:], g[k][:]), k
