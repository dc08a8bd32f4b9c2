"""Participants on separate machines: features stay in each participant's workspace, the platform
works from what crosses the boundary (plan.json; record.json, shared.h5 and the upload), and a
run can live in an S3 object store (a moto server on 127.0.0.1).

The flows below give the same merged targets, bit for bit, as one process on one folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import coopt_fast
from coopt_fast import layout
from coopt_fast.errors import CooptError, WaitingError

from .conftest import requires_fmnist

pytestmark = requires_fmnist
NAMES = {"a": ("labels", 0), "b": ("convnet", 1), "c": ("convnet:seed", 2)}
SPLIT = dict(participants=3, shared_fraction=0.2, seed=0, limit=300)
DIM = 16
MERGED = ("targets", "index", "participant", "target_mean", "target_std", "images")


def _extract(run, name, **kw):
    prior, shard = NAMES[name]
    seed = 1 if prior == "convnet:seed" else 0
    return coopt_fast.extract(run, name, shard, prior.split(":")[0], seed=seed, batch_size=100, progress=False, **kw)


def _datasets(path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in MERGED}


@pytest.fixture(scope="module")
def one_folder(tmp_path_factory) -> Path:
    """The reference result: every participant in one run folder, aligned all at once."""
    run = tmp_path_factory.mktemp("one") / "run"
    coopt_fast.split("fashion-mnist", run, **SPLIT)
    for nm in NAMES:
        _extract(run, nm)
    coopt_fast.align(run, dim=DIM, progress=False)
    coopt_fast.merge(run, progress=False)
    return run


def _align_all(run, workspaces: dict, **kw) -> list[str]:
    """Each participant aligns itself, in turn, until none waits; the order in which they waited."""
    waited = []
    for _ in range(3):
        pending = False
        for nm, ws in workspaces.items():
            try:
                coopt_fast.align(run, dim=DIM, participant=nm, workspace=ws, progress=False, **kw)
            except WaitingError:
                waited.append(nm)
                pending = True
        if not pending:
            return waited
    raise AssertionError("a participant still waits after every other has aligned")


def test_separate_workspaces_equal_one_folder(one_folder, tmp_path):
    run = tmp_path / "platform"
    coopt_fast.split("fashion-mnist", run, **SPLIT)
    ws = {nm: tmp_path / f"ws_{nm}" for nm in NAMES}
    for nm in NAMES:
        s = _extract(run, nm, workspace=ws[nm])
        assert Path(s["path"]) == ws[nm] / "features.h5"
    # The first two publish their projected features on S and wait for the third's.
    waited = _align_all(run, ws)
    assert waited == ["a", "b"]
    m = coopt_fast.merge(run, progress=False)
    assert m["rows"] == 300
    got, want = _datasets(run / "merged.h5"), _datasets(one_folder / "merged.h5")
    for k in MERGED:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    # Nothing raw crossed: the platform folder holds no features, and only the published files.
    assert not list(run.rglob("features*"))
    for nm in NAMES:
        d = layout.participant_dir(run, nm)
        assert sorted(p.name for p in d.iterdir() if p.is_file()) == sorted(layout.PUBLISHED + (layout.MANIFEST,))
        assert (ws[nm] / "features.h5").exists()
    # Every platform command works from the uploads alone.
    st = coopt_fast.status(run)
    assert {r["participant"]: (r["state"], r["aligned"], r["rounds"]) for r in st["participants"]} == \
        {nm: ("extracted", True, [0]) for nm in NAMES}
    assert st["shards_started"] == 3
    sc = coopt_fast.score(run)
    assert sc == coopt_fast.score(one_folder)
    v = coopt_fast.verify(run)
    assert v["ok"], [c for c in v["checks"] if not c["ok"]]
    ins = coopt_fast.inspect(run, plot=False)
    assert ins["inconsistency"] == coopt_fast.inspect(one_folder, plot=False)["inconsistency"]
    t = coopt_fast.train(run, "convnet", 1, tmp_path / "student", max_steps=2, batch_size=64, input_size=16,
                         compile=False, progress=False)
    assert t["steps"] == 2


def test_best_reference_waits_for_its_s_star(one_folder, tmp_path):
    """--reference best: the others wait for the reference's S*, then match one folder's fit."""
    run = tmp_path / "platform"
    coopt_fast.split("fashion-mnist", run, **SPLIT)
    ws = {nm: tmp_path / f"ws_{nm}" for nm in NAMES}
    for nm in NAMES:
        _extract(run, nm, workspace=ws[nm])
    best = coopt_fast.score(run)["best"]
    other = next(nm for nm in NAMES if nm != best)
    with pytest.raises(WaitingError, match=f"reference '{best}' has not published"):
        coopt_fast.align(run, dim=DIM, participant=other, workspace=ws[other], reference="best", progress=False)
    assert not layout.shared_path(run, other).exists()  # a non-reference publishes nothing on S
    coopt_fast.align(run, dim=DIM, participant=best, workspace=ws[best], reference="best", progress=False)
    coopt_fast.align(run, dim=DIM, participant=other, workspace=ws[other], reference="best", progress=False)
    same = tmp_path / "one"
    coopt_fast.split("fashion-mnist", same, **SPLIT)
    for nm in NAMES:
        _extract(same, nm)
    coopt_fast.align(same, dim=DIM, reference="best", progress=False)
    for nm in (best, other):
        with h5py.File(layout.upload_path(run, nm), "r") as f, h5py.File(layout.upload_path(same, nm), "r") as g:
            assert np.array_equal(f["shard/targets"][:], g["shard/targets"][:])


def test_align_without_participant_needs_every_features_here(tmp_path):
    run = tmp_path / "platform"
    coopt_fast.split("fashion-mnist", run, **SPLIT)
    _extract(run, "a", workspace=tmp_path / "ws_a")
    with pytest.raises(CooptError, match="not in this run folder"):
        coopt_fast.align(run, dim=DIM, progress=False)
    with pytest.raises(CooptError, match="--workspace is one participant's"):
        coopt_fast.align(run, dim=DIM, workspace=tmp_path / "ws_a", progress=False)
    # another participant cannot take a's shard, though a's features are not in the run folder
    with pytest.raises(CooptError, match="taken by participant 'a'"):
        coopt_fast.extract(run, "z", 0, "labels", progress=False, workspace=tmp_path / "ws_z")


def test_rounds_in_separate_workspaces(tmp_path):
    """An upgraded prior archives the published round in the run and the features in the workspace."""
    run = tmp_path / "platform"
    coopt_fast.split("fashion-mnist", run, **SPLIT)
    ws = {nm: tmp_path / f"ws_{nm}" for nm in NAMES}
    for nm in NAMES:
        _extract(run, nm, workspace=ws[nm])
    _align_all(run, ws)
    coopt_fast.extract(run, "b", 1, "convnet", seed=5, round=1, batch_size=100, progress=False, workspace=ws["b"])
    b = layout.participant_dir(run, "b")
    assert sorted(p.name for p in (b / "rounds" / "0").iterdir()) == sorted(layout.PUBLISHED + (layout.MANIFEST,))
    assert (ws["b"] / "rounds" / "0" / "features.h5").exists() and not list(run.rglob("features*"))
    assert {r["participant"]: r["rounds"] for r in coopt_fast.status(run)["participants"]}["b"] == [0, 1]
    _align_all(run, ws, force=True)
    m = coopt_fast.merge(run, progress=False, force=True)
    assert m["rounds"] == {"a": 0, "b": 1, "c": 0}


# --- the object store -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (any free port) and a bucket; AWS_* variables point boto at it."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in (*env, "AWS_ENDPOINT_URL")}
    os.environ.update(env)
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("coopt")
    yield "s3://coopt"
    srv.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _as(monkeypatch, tmp_path, machine: str) -> Path:
    """Act as `machine`: its own cache (mirror and default workspace) and nothing else."""
    cache = tmp_path / machine
    monkeypatch.setenv("COOPT_CACHE_DIR", str(cache))
    return cache


def _cli(tmp_path, machine: str, *args, die_in_manifest_of: str | None = None) -> subprocess.CompletedProcess:
    """coopt-fast in a fresh process acting as `machine`; die_in_manifest_of: kill -9 itself just
    before writing that participant's manifest with an upload in it (objects already sent)."""
    code = ("import os, sys\nfrom coopt_fast import remote\n"
            "put = remote.Remote._put_manifest\n"
            "def die(self, name, data):\n"
            f"    if name == {die_in_manifest_of!r} and b'aligned.h5' in data:\n"
            "        os.kill(os.getpid(), 9)\n"
            "    return put(self, name, data)\n"
            "remote.Remote._put_manifest = die\n"
            "from coopt_fast.cli import main\n"
            "sys.argv = ['coopt-fast', *sys.argv[1:]]\nmain()\n")
    env = dict(os.environ, COOPT_CACHE_DIR=str(tmp_path / machine), COOPT_PROGRESS="0")
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)


def test_object_store_flow(s3, one_folder, tmp_path, monkeypatch):
    import fsspec

    url = f"{s3}/flow"
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    _as(monkeypatch, tmp_path, "platform")
    coopt_fast.split("fashion-mnist", url, **SPLIT)
    sent, kept = {}, {}
    for nm in NAMES:
        cache = _as(monkeypatch, tmp_path, f"machine_{nm}")
        s = _extract(url, nm)
        kept[nm] = (Path(s["path"])).stat().st_size
        assert Path(s["path"]).is_relative_to(cache / "workspaces")
        assert set(s["pushed"]) == {"record.json"}
        sent[nm] = dict(s["pushed"])
    # Two writers on one participant's prefix: the second is refused while the first holds it.
    from coopt_fast import remote

    with remote.Remote(url).lock("a"):
        _as(monkeypatch, tmp_path, "machine_a")
        with pytest.raises(CooptError, match="another writer holds a's prefix"):
            coopt_fast.align(url, dim=DIM, participant="a", progress=False)
    for nm in ("a", "b"):
        _as(monkeypatch, tmp_path, f"machine_{nm}")
        with pytest.raises(WaitingError, match="c ha(s|ve) not published shared.h5"):
            coopt_fast.align(url, dim=DIM, participant=nm, progress=False)
    # c's upload dies after its objects, before its manifest: the platform does not see it ...
    r = _cli(tmp_path, "machine_c", "align", url, "--dim", str(DIM), "--participant", "c", die_in_manifest_of="c")
    assert r.returncode == -9, r.stderr
    assert fs.exists(f"coopt/flow/participants/c/lock")  # left by the dead writer
    _as(monkeypatch, tmp_path, "platform")
    with pytest.raises(CooptError, match="no aligned uploads"):
        coopt_fast.merge(url, progress=False)
    # ... and the retry (taking over the dead writer's lock) publishes it.
    r = _cli(tmp_path, "machine_c", "align", url, "--dim", str(DIM), "--participant", "c", "--json")
    assert r.returncode == 0, r.stderr
    sent["c"].update(json.loads(r.stdout)["pushed"])
    for nm in ("a", "b"):
        _as(monkeypatch, tmp_path, f"machine_{nm}")
        sent[nm].update(coopt_fast.align(url, dim=DIM, participant=nm, progress=False)["pushed"])
    _as(monkeypatch, tmp_path, "platform")
    m = coopt_fast.merge(url, progress=False)
    got, want = _datasets(m["path"]), _datasets(one_folder / "merged.h5")
    for k in MERGED:
        assert np.array_equal(got[k], want[k]), k
    assert not [p for p in fs.find("coopt/flow") if "features" in p]
    assert {r["participant"]: r["rounds"] for r in coopt_fast.status(url)["participants"]} == {nm: [0] for nm in NAMES}
    # What crossed, per participant: the objects its manifest names, never the features.
    for nm in NAMES:
        man = json.loads(fs.cat_file(f"coopt/flow/participants/{nm}/manifest.json"))
        assert set(man) == set(layout.PUBLISHED)
        crossed = {f: fs.size(f"coopt/flow/participants/{nm}/objects/{d}") for f, d in man.items()}
        print(f"{nm}: features kept {kept[nm]:,} B; published {sum(crossed.values()):,} B {crossed}")
        assert set(sent[nm]) <= set(layout.PUBLISHED)
    # A tampered object is refused by its hash, on a machine that has not seen it.
    man = json.loads(fs.cat_file("coopt/flow/participants/b/manifest.json"))
    key = f"coopt/flow/participants/b/objects/{man['aligned.h5']}"
    good = fs.cat_file(key)
    fs.pipe_file(key, good[:-1] + bytes([good[-1] ^ 1]))
    _as(monkeypatch, tmp_path, "auditor")
    with pytest.raises(CooptError, match="changed in the store"):
        coopt_fast.merge(url, progress=False)
    fs.pipe_file(key, good)
    assert coopt_fast.verify(url)["ok"]
    # A new round on the store: the old round's manifest stays, naming objects that stay; the
    # platform sees the latest round (b's has no upload yet) and lists both.
    _as(monkeypatch, tmp_path, "machine_b")
    coopt_fast.extract(url, "b", 1, "convnet", seed=5, round=1, batch_size=100, progress=False)
    old = json.loads(fs.cat_file("coopt/flow/participants/b/rounds/0/manifest.json"))
    assert set(old) == set(layout.PUBLISHED) and old["aligned.h5"] == man["aligned.h5"]
    assert all(fs.exists(f"coopt/flow/participants/b/objects/{d}") for d in old.values())
    assert set(json.loads(fs.cat_file("coopt/flow/participants/b/manifest.json"))) == {"record.json"}
    _as(monkeypatch, tmp_path, "platform")
    assert {r["participant"]: r["rounds"] for r in coopt_fast.status(url)["participants"]}["b"] == [0, 1]
    with pytest.raises(CooptError, match=r"shards \[1\] have no upload"):
        coopt_fast.merge(url, progress=False, force=True)


def test_cli_waiting_is_one_line_and_exit_75(tmp_path):
    from typer.testing import CliRunner

    from coopt_fast.cli import app

    run = tmp_path / "platform"
    coopt_fast.split("fashion-mnist", run, **SPLIT)
    for nm in ("a", "b"):
        _extract(run, nm, workspace=tmp_path / f"ws_{nm}")
    r = CliRunner().invoke(app, ["align", str(run), "--dim", str(DIM), "--participant", "a",
                                 "--workspace", str(tmp_path / "ws_a"), "--quiet"])
    assert r.exit_code == 75 and r.stderr.startswith("waiting: ") and r.stderr.count("\n") == 1, r.stderr
    assert "b has not published shared.h5" in r.stderr
    assert layout.shared_path(run, "a").exists() and not layout.upload_path(run, "a").exists()


def test_object_store_manifest_naming_another_key_is_refused(s3, tmp_path, monkeypatch):
    """A digest is an object key's last part: 64 hex digits, never a path to some other object."""
    import fsspec

    url = f"{s3}/hostile"
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    _as(monkeypatch, tmp_path, "platform")
    coopt_fast.split("fashion-mnist", url, **SPLIT)
    sneaky = ("../../../flow/participants/b/objects/" + "0" * 64)[:64]
    fs.pipe_file("coopt/hostile/participants/a/manifest.json", json.dumps({"aligned.h5": sneaky}).encode())
    with pytest.raises(CooptError, match="not a manifest of published files"):
        coopt_fast.status(url)
    # a lock whose pid is 0 or -1 is not a lock coopt-fast wrote: never taken over, never signalled
    fs.pipe_file("coopt/hostile/participants/b/lock", json.dumps({"pid": -1, "host": os.uname().nodename}).encode())
    _as(monkeypatch, tmp_path, "machine_b")
    with pytest.raises(CooptError, match="another writer holds b's prefix"):
        _extract(url, "b")
