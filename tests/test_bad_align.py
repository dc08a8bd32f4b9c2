"""Hostile and odd inputs, round two (issue 13): what align reads and publishes, and train's OUT.

align checks every features.h5 it reads (its participant's manifest.json, this run's plan) before
it computes or writes anything; an existing aligned.h5 is left alone when it is what align would
write, refused otherwise (--force replaces it); train refuses an OUT holding a run unless --resume
or --force. Every refusal is the one-line contract of tests/test_bad_inputs.py (`refused`): exit
2, the file or field named, the folder unchanged (so nothing published, no .partial or .lock).
"""
from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pytest
import torch

import coopt_fast
from coopt_fast import store
from coopt_fast.cli import app
from coopt_fast.priors import file_sha256

from .test_bad_inputs import DIM, N, TRAIN, base, edit, refused, replace, run, runner, snapshot  # noqa: F401

B = "participants/b/features.h5"
align_mod = importlib.import_module("coopt_fast.align")  # the module (coopt_fast.align is the function)


@pytest.fixture
def fresh(run):
    """The run before align: no aligned.h5 or shared.h5, manifests recording what extract
    publishes (features.h5, record.json), no merged.h5."""
    for nm in ("a", "b"):
        d = run / "participants" / nm
        (d / "aligned.h5").unlink()
        (d / "shared.h5").unlink()
        (d / "manifest.json").write_text(json.dumps({n: file_sha256(d / n) for n in ("features.h5", "record.json")}))
    (run / "merged.h5").unlink()
    return run


def _align(run, *extra):
    return ("align", run, "--dim", DIM, "--quiet", *extra)


# ---- integrity: every features.h5 read is checked before anything is written ----------------

def _swap(run):  # b's features replaced by a's; b's manifest still records b's
    shutil.copy(run / "participants/a/features.h5", run / B)


def _manifest(text):
    return lambda run: (run / "participants/b/manifest.json").write_text(text)


def _feat(fn):
    return lambda run: edit(run / B, fn)  # re-recorded: an honest-looking file with the fault


def _attr(name, value):
    return _feat(lambda f: f.attrs.__setitem__(name, value))


def _wider_shard(f):
    n, w = f["shard/features"].shape
    replace(f, "shard/features", np.zeros((n, w + 1), np.float16))


INTEGRITY = [
    pytest.param(_swap, (B, "sha256", "manifest.json"), id="swapped-for-a's"),
    pytest.param(_manifest("{not json"), ("participants/b/manifest.json", "not valid JSON"), id="manifest-not-json"),
    pytest.param(_manifest("[]"), ("participants/b/manifest.json", "not a JSON object"), id="manifest-a-list"),
    pytest.param(_manifest('{"features.h5": 5}'), ("participants/b/manifest.json", "sha256 strings"),
                 id="manifest-not-strings"),
    pytest.param(_manifest("{}"), (B, "not recorded"), id="not-in-manifest"),
    pytest.param(_attr("participant", "a"), (B, "extracted by participant 'a'"), id="participant-attr"),
    pytest.param(_attr("dataset_sha256", "0" * 64), (B, "another data set"), id="other-data-set"),
    pytest.param(_attr("shard", 0), (B, "shard/index is not shard 0"), id="shard-attr"),
    pytest.param(_attr("shard", "one"), (B, "'shard'", "not an integer"), id="shard-attr-text"),
    pytest.param(_feat(lambda f: f["shard/index"].__setitem__(0, f["shard/index"][1])), (B, "shard/index"),
                 id="shard-index"),
    pytest.param(_feat(lambda f: f["shared/index"].__setitem__(0, f["shared/index"][1])), (B, "shared/index"),
                 id="shared-index"),
    pytest.param(_feat(lambda f: replace(f, "shared/skipped", np.array([N + 7]))), (B, "shared/skipped"),
                 id="skipped-outside-S"),
    pytest.param(_attr("feature_dim", 99), (B, "shard/features has shape", "feature_dim"), id="feature-dim-attr"),
    pytest.param(_attr("uniformity", "low"), (B, "'uniformity'", "not a number"), id="uniformity-text"),
    pytest.param(_feat(_wider_shard), (B, "shard/features has shape"), id="shard-wider-than-S"),
]


@pytest.mark.parametrize("fault, names", INTEGRITY)
def test_align_checks_every_features_file_before_writing_any(fresh, fault, names):
    fault(fresh)
    refused(fresh.parent, _align(fresh), *names)  # a's aligned.h5 is not published either


@pytest.mark.parametrize("args", [
    pytest.param(("--participant", "a"), id="consensus-reads-b"),
    pytest.param(("--participant", "a", "--reference", "best"), id="best-scores-b"),
    pytest.param(("--participant", "a", "--reference", "b"), id="named-reference-b"),
])
def test_local_mode_checks_the_features_it_reads_from_others(fresh, args):
    _swap(fresh)
    refused(fresh.parent, _align(fresh, *args), B, "sha256")


def test_local_mode_checks_the_references_published_targets(run):
    """b aligns alone to a's published S* (its shared.h5), which changed after a published it."""
    coopt_fast.align(run, dim=DIM, reference="a", force=True, progress=False)
    edit(run / "participants/a/shared.h5", lambda f: f["values"].__setitem__((0, 0), 7.0), record=False)
    refused(run.parent, _align(run, "--participant", "b", "--reference", "a"), "participants/a/shared.h5", "sha256")


# ---- options -----------------------------------------------------------------------------------

OPTIONS = [
    pytest.param(("--ridge", "nan"), ("--ridge", "nan"), id="ridge-nan"),
    pytest.param(("--ridge", "inf"), ("--ridge", "inf"), id="ridge-inf"),
    pytest.param(("--dim", 10**12), ("--dim", "65536"), id="dim-10**12"),
    pytest.param(("--reference", "c"), ("--reference c", "no such participant"), id="reference-without-features"),
]


@pytest.mark.parametrize("extra, names", OPTIONS)
def test_align_options(run, extra, names):
    refused(run.parent, _align(run, *extra), *names)


def test_align_dim_larger_than_memory(run, monkeypatch):
    """--dim 65536 needs a 32 GiB float64 ridge system: refused where the machine has less."""
    monkeypatch.setattr(align_mod, "physical_memory", lambda: 8 << 30)
    refused(run.parent, _align(run, "--dim", 65536), "--dim 65536", "GiB", "8.0 GiB")


@pytest.mark.parametrize("word", ["best", "none"])
def test_reserved_reference_word_that_is_also_a_participant(run, word):
    shutil.copytree(run / "participants/b", run / "participants" / word)
    refused(run.parent, _align(run, "--reference", word), f"--reference {word}", "ambiguous")


def _train(run, *extra):
    return ("train", run, "--out", run.parent / "student", "--max-steps", 1, *TRAIN, *extra)


TRAIN_BAD = [
    (("--seed", -1), "--seed"), (("--seed", 2**32), "--seed"), (("--lr", "nan"), "--lr"), (("--lr", "inf"), "--lr"),
    (("--wd", "nan"), "--wd"), (("--wd", "inf"), "--wd"), (("--max-seconds", "nan"), "--max-seconds"),
    (("--input-size", 100000), "--input-size"), (("--input-size", 4), "--input-size"),
]


@pytest.mark.parametrize("extra, field", TRAIN_BAD, ids=[" ".join(map(str, e)) for e, _ in TRAIN_BAD])
def test_train_options(run, extra, field):
    refused(run.parent, _train(run, *extra), field)


A = "participants/b/aligned.h5"


R = "participants/b/record.json"


def _record(fn, record: bool = True):
    """Change b's published record.json; record=True: b re-records its sha256 (honest, but wrong)."""
    def change(run):
        path = run / R
        rec = json.loads(path.read_text())
        fn(rec)
        path.write_text(json.dumps(rec))
        if record:
            store.write_manifest(path.parent, path.name)
    return change


@pytest.mark.parametrize("fault, names", [
    pytest.param(_record(lambda r: r.__setitem__("rows", 1), record=False), ("sha256",), id="changed-since-published"),
    pytest.param(_record(lambda r: r.__delitem__("uniformity")), ("'uniformity'",), id="no-uniformity"),
    pytest.param(_record(lambda r: r.__setitem__("uniformity", "low")), ("'uniformity'",), id="uniformity-text"),
    pytest.param(_record(lambda r: r["scores"].__setitem__("uniformity", "low")), ("scores.uniformity",),
                 id="score-text"),
    pytest.param(_record(lambda r: r.__setitem__("participant", "a")), ("record of participant 'a'",),
                 id="a's-record"),
    pytest.param(lambda run: (run / R).write_text("{"), ("sha256",), id="not-json"),
])
def test_score_names_the_faulty_record(run, fault, names):
    fault(run)
    refused(run.parent, ("score", run), R, *names)


@pytest.mark.parametrize("rel, fault, cmd, names", [
    pytest.param(A, lambda f: f.attrs.__delitem__("prior"), "inspect", ("missing attribute prior",),
                 id="inspect-no-prior"),
    pytest.param(A, lambda f: f.attrs.__delitem__("residual"), "inspect", ("missing attribute residual",),
                 id="inspect-no-residual"),
    pytest.param(A, lambda f: f.attrs.__setitem__("residual", "small"), "inspect", ("'residual'", "not a number"),
                 id="inspect-residual-text"),
    pytest.param(A, lambda f: replace(f, "sample/projected", f["sample/projected"][:-1]), "inspect",
                 ("sample/projected has shape",), id="inspect-sample-rows"),
    pytest.param(A, lambda f: replace(f, "shard/targets", f["shard/targets"][:5]), "inspect",
                 ("sample/rows must be ascending rows of shard/targets",), id="inspect-fewer-targets"),
])
def test_score_and_inspect_name_the_faulty_file(run, rel, fault, cmd, names):
    edit(run / rel, fault)
    refused(run.parent, (cmd, run, *(("--no-plot",) if cmd == "inspect" else ())), rel, *names)


# ---- overwriting finished results ----------------------------------------------------------------

def test_align_again_leaves_an_up_to_date_run_as_it_was(run):
    before = snapshot(run.parent)
    r = runner.invoke(app, [str(a) for a in _align(run, "--json")])
    assert r.exit_code == 0, r.stderr
    assert [p["skipped"] for p in json.loads(r.stdout)["participants"]] == [True, True]
    assert snapshot(run.parent) == before  # not rewritten (a rewrite changes the timestamps inside)


def test_align_with_other_settings_is_refused_for_all_before_any_write(run):
    """a has no aligned.h5 (it would be written), b has one for dim 8: nothing is written."""
    (run / "participants/a/aligned.h5").unlink()
    line = refused(run.parent, _align(run, "--dim", 16), "participants/b/aligned.h5", "dim 8, now 16",
                   "rerun with --force to realign everyone")
    assert "participants/a" not in line
    r = runner.invoke(app, [str(a) for a in _align(run, "--dim", 16, "--force")])
    assert r.exit_code == 0, r.stderr
    (run / "merged.h5").unlink()  # the old store: merge's own overwrite rules are not tested here
    assert coopt_fast.merge(run, progress=False)["dim"] == 16


def test_aligned_file_changed_since_published_is_refused(run):
    edit(run / "participants/b/aligned.h5", lambda f: f["shard/targets"].__setitem__((3, 1), 5.0), record=False)
    refused(run.parent, _align(run), "participants/b/aligned.h5", "sha256", "--force")


def test_unreadable_aligned_file_is_refused(run):
    (run / "participants/b/aligned.h5").write_bytes(b"not hdf5")
    refused(run.parent, _align(run), "participants/b/aligned.h5", "not a readable HDF5 file", "--force")


def test_publish_interrupted_before_the_manifest_is_recorded_on_rerun(run):
    d = run / "participants/a"
    (d / "manifest.json").write_text(json.dumps({n: file_sha256(d / n) for n in ("features.h5", "record.json", "shared.h5")}))
    before = file_sha256(d / "aligned.h5")
    s = coopt_fast.align(run, dim=DIM, progress=False)
    assert all(p["skipped"] for p in s["participants"]) and file_sha256(d / "aligned.h5") == before
    assert json.loads((d / "manifest.json").read_text())["aligned.h5"] == before


def test_a_new_round_asks_everyone_to_realign(run):
    """b upgrades its prior: the consensus S* moves, so a's upload is stale; --force realigns."""
    coopt_fast.extract(run, "b", 1, "convnet", round=1, batch_size=200, workers=1, decoder="torchvision",
                       progress=False)
    coopt_fast.align(run, dim=DIM, participant="b", progress=False)  # b's round 1 has no aligned.h5 yet
    for extra in ((), ("--participant", "a")):
        refused(run.parent, _align(run, *extra), "participants/a/aligned.h5", "s_star",
                "another participant's features changed", "rerun with --force to realign everyone")
    s = coopt_fast.align(run, dim=DIM, force=True, progress=False)
    assert not any(p["skipped"] for p in s["participants"])
    (run / "merged.h5").unlink()
    assert coopt_fast.merge(run, progress=False)["rounds"] == {"a": 0, "b": 1}


def test_train_over_a_run_is_refused_unless_resume_or_force(run):
    out = run.parent / "student"
    coopt_fast.train(run, "convnet", 1, out, max_steps=1, batch_size=64, input_size=16, compile=False,
                     device="cpu", progress=False)
    refused(run.parent, _train(run), out / "state.pt", "--resume", "--force")
    (out / "state.pt").unlink()  # a run stopped between its first checkpoint and state
    refused(run.parent, _train(run), out / "student.pt", "--resume", "--force")
    refused(run.parent, _train(run, "--resume", "--force"), "--resume and --force")
    (out / "snapshots").mkdir()
    (out / "snapshots/student-9.pt").write_bytes(b"an old run's")
    r = runner.invoke(app, [str(a) for a in _train(run, "--force")])
    assert r.exit_code == 0, r.stderr
    assert (out / "state.pt").exists() and not (out / "snapshots/student-9.pt").exists()
    assert torch.load(out / "state.pt", weights_only=True)["loop"]["step"] == 1


def test_train_out_is_a_file(run):
    (run.parent / "student").write_text("a file")
    refused(run.parent, _train(run), run.parent / "student", "must be a folder")
