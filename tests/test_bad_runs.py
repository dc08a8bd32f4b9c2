"""Hostile and odd inputs, round two (issue 13): the plan, extract's inputs, checkpoints, names,
locks, options and --json output. The contract is test_bad_inputs.py's: one line
`error: <file/field>: <fault>`, exit 2, the run folder as it was (`refused`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket

import numpy as np
import pytest
import torch

import coopt_fast
from coopt_fast.cli import app
from .test_bad_inputs import base, edit_plan, make_npy, refused, run, runner  # noqa: F401 (fixtures)

EXTRACT_C = ("--participant", "c", "--shard", 0, "--prior", "labels", "--quiet")


def _spec(run) -> str:
    return json.loads((run / "plan.json").read_text())["dataset"]


def _ok(args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.exit_code == 0, r.stderr
    return r


# ---- split over an existing run ------------------------------------------------------------

SAME = ("-k", 2, "--shared-fraction", 0.1, "--seed", 0)  # how `base` was split


def test_split_same_plan_again_is_unchanged(run):
    before = (run / "plan.json").stat().st_mtime_ns
    r = _ok(("split", _spec(run), "--out", run, *SAME, "--json"))
    assert json.loads(r.stdout)["unchanged"] is True
    assert (run / "plan.json").stat().st_mtime_ns == before, "an identical split must not rewrite plan.json"


@pytest.mark.parametrize("change, field", [
    (("--seed", 1), "seed"), (("-k", 3), "participants"), (("--shared-fraction", 0.2), "shared_fraction"),
    (("--limit", 300), "limit"), (("--sizes", "1,3"), "sizes"),
], ids=["seed", "k", "fraction", "limit", "sizes"])
def test_split_different_plan_is_refused(run, change, field):
    args = dict(zip(SAME[::2], SAME[1::2]))
    args.update(dict(zip(change[::2], change[1::2])))
    refused(run.parent, ("split", _spec(run), "--out", run, *sum(args.items(), ())), run / "plan.json", field,
            "--force")


def test_split_other_dataset_is_refused(run, tmp_path):
    other = make_npy(tmp_path / "other", seed=1)  # same N and shape, other pixels
    refused(tmp_path, ("split", other, "--out", run, *SAME), run / "plan.json", "dataset", "fingerprint")


def test_split_force_replaces_and_names_the_orphans(run):
    r = _ok(("split", _spec(run), "--out", run, *SAME[:-1], 1, "--force", "--json"))
    assert json.loads((run / "plan.json").read_text())["seed"] == 1
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "'a'" in warning[0] and "'b'" in warning[0] and "merged.h5" in warning[0], r.stderr


def test_split_unreadable_existing_plan_is_refused(run):
    spec = _spec(run)
    (run / "plan.json").write_text("{not json")
    refused(run.parent, ("split", spec, "--out", run, *SAME), run / "plan.json", "not a readable plan", "--force")


# ---- one participant per shard -------------------------------------------------------------

def test_extract_refuses_a_shard_taken_by_another(run):
    refused(run.parent, ("extract", run, *EXTRACT_C), "--shard 0", "'a'", "participants/a/features.h5")


def test_extract_refuses_a_shard_in_progress_elsewhere(run):
    shutil.move(run / "participants/b", run.parent / "b")  # b gone: shard 1 is free
    (run / "participants/x").mkdir()
    (run / "participants/x/features.h5.partial").write_bytes(b"not hdf5")  # unreadable partial: skipped
    (run / "participants/y").mkdir()
    shutil.copy(run.parent / "b/features.h5", run / "participants/y/features.h5.partial")  # y on shard 1
    refused(run.parent, ("extract", run, "--participant", "c", "--shard", 1, "--prior", "labels", "--quiet"),
            "--shard 1", "'y'", "participants/y/features.h5.partial")
    (run / "participants/y/features.h5.partial").unlink()
    _ok(("extract", run, "--participant", "c", "--shard", 1, "--prior", "labels", "--quiet"))


def test_extract_own_shard_again_or_next_round_is_allowed(run):
    s = json.loads(_ok(("extract", run, "--participant", "a", "--shard", 0, "--prior", "labels", "--json")).stdout)
    assert s["skipped"] is True
    s = json.loads(_ok(("extract", run, "--participant", "a", "--shard", 0, "--prior", "labels", "--round", 1,
                        "--json")).stdout)
    assert s["round"] == 1 and s["archived"]


def test_status_counts_shards_not_folders(run):
    shutil.copytree(run / "participants/b", run / "participants/mallory")  # a second holder of shard 1
    r = _ok(("status", run, "--json"))
    s = json.loads(r.stdout)
    assert s["shards_started"] == 2 and s["shards"] == 2 and len(s["participants"]) == 3
    assert any("shard 1" in w and "mallory" in w for w in s["warnings"]), s["warnings"]
    r = _ok(("status", run))
    text = " ".join(r.stderr.split())  # the table title wraps at the terminal width
    assert "3 of 2" not in text and "2 of 2 shards started" in text, r.stderr


def test_status_shows_a_damaged_upload(run):
    p = run / "participants/b/features.h5"
    p.write_bytes(p.read_bytes()[:1000])  # truncated: reported (an SWMR read of it would hang for minutes)
    s = json.loads(_ok(("status", run, "--json")).stdout)
    b = next(r for r in s["participants"] if r["participant"] == "b")
    # its shard is still known from the record it published with the features
    assert b["state"] == "unreadable" and b["shard"] == 1 and s["shards_started"] == 2


# ---- participant names ---------------------------------------------------------------------

NAMES = ["evil\n", "a\nb", "a\r", "\tab", "a\t", "\u0430lice", "ａlice", ".", "..", "-a", "a" * 65, ""]


@pytest.mark.parametrize("name", NAMES, ids=[ascii(n) for n in NAMES])
def test_participant_name_is_refused(run, name):
    line = refused(run.parent, ("extract", run, f"--participant={name}", "--shard", 0, "--prior", "labels",
                                "--quiet"), "participant name", repr(name))
    assert "\n" not in line and "\r" not in line


def test_participant_name_of_64_is_allowed():
    from coopt_fast.extract import check_name

    assert check_name("a" * 64) == "a" * 64 and check_name("a.b-c_9") == "a.b-c_9"


# ---- checkpoints ---------------------------------------------------------------------------

@pytest.fixture
def free(run):
    """`run` with shard 0 free again: a's upload removed, so a checkpoint is what extract meets."""
    shutil.rmtree(run / "participants/a")
    return run


def _ckpt(path, meta, arch="convnet"):
    from coopt_fast.priors import build_backbone, save_checkpoint

    save_checkpoint(path, build_backbone(arch, seed=1)[0], meta)
    return path


BAD_META = [
    ({"input_size": 20000}, "input_size"), ({"input_size": 4}, "input_size"), ({"input_size": 0}, "input_size"),
    ({"input_size": "abc"}, "input_size"), ({"input_size": 3.5}, "input_size"), ({"input_size": True}, "input_size"),
    ({"input_size": [32]}, "input_size"),
    ({"std": [0, 0, 0]}, "std"), ({"std": [1, -1, 1]}, "std"), ({"std": [1, float("nan"), 1]}, "std"),
    ({"std": [1, float("inf"), 1]}, "std"), ({"std": ["a", "b", "c"]}, "std"), ({"std": "0.5"}, "std"),
    ({"std": [1, 1]}, "std"), ({"std": []}, "std"),
    ({"mean": [[0.5], [0.5], [0.5]]}, "mean"), ({"mean": [0.5, 0.5]}, "mean"), ({"mean": [0.5, None, 0.5]}, "mean"),
    ({"mean": [0.5, float("nan"), 0.5]}, "mean"), ({"mean": [True, 0, 0]}, "mean"),
    ({"arch": 5}, "arch"), ({"arch": "resnet18"}, "arch"), ({"arch": ["convnet"]}, "arch"),
    ({"method": {"x": 1}}, "method"),
]


@pytest.mark.parametrize("meta, key", BAD_META, ids=[f"{k}={json.dumps(m[k])}" for m, k in BAD_META])
def test_checkpoint_bad_metadata(free, tmp_path, meta, key):
    path = _ckpt(tmp_path / "c.safetensors", {"arch": "convnet", "input_size": 32, **meta})
    refused(tmp_path, ("extract", free, "--participant", "c", "--shard", 0, "--prior", f"convnet:{path}", "--quiet"),
            path, key)


def test_checkpoint_metadata_not_an_object(free, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "c.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"coopt": "[1, 2]"})
    refused(tmp_path, ("extract", free, "--participant", "c", "--shard", 0, "--prior", f"convnet:{path}", "--quiet"),
            path, "metadata")


@pytest.mark.parametrize("obj, what", [
    ({"state_dict": {"w": torch.zeros(2)}, "meta": [1, 2]}, "meta"),
    ({"state_dict": {"w": torch.zeros(2)}, "meta": "abc"}, "meta"),
    ({"state_dict": [torch.zeros(2)], "meta": {}}, "state_dict"),
    ({"state_dict": {"w": 3}, "meta": {}}, "state_dict"),
], ids=["meta-list", "meta-str", "state-list", "state-not-tensor"])
def test_pt_checkpoint_bad_layout(free, tmp_path, obj, what):
    path = tmp_path / "c.pt"
    torch.save(obj, path)
    refused(tmp_path, ("extract", free, "--participant", "c", "--shard", 0, "--prior", f"convnet:{path}", "--quiet"),
            path, what)


def test_probe_refuses_bad_checkpoint_metadata(tmp_path):
    path = _ckpt(tmp_path / "c.safetensors", {"arch": "convnet", "input_size": 20000})
    refused(tmp_path, ("probe", path, "--train", "x", "--test", "y", "--quiet"), path, "input_size")


def test_prior_with_nonfinite_features_is_refused(tmp_path):
    """std 1e-30 passes the metadata check; its features overflow float16: never published."""
    run = tmp_path / "run"
    coopt_fast.split(make_npy(tmp_path / "data", n=40), run, participants=1, shared_fraction=0.1)
    path = _ckpt(tmp_path / "c.safetensors", {"arch": "convnet", "input_size": 8, "std": [1e-30] * 3})
    refused(tmp_path, ("extract", run, "--participant", "c", "--shard", 0, "--prior", f"convnet:{path}",
                       "--decoder", "torchvision", "--workers", 1, "--quiet"), path, "NaN or Inf")


def test_pretrain_default_input_size_its_checkpoint_could_not_be_read_with(tmp_path):
    """convnet's default input size is the image side rounded up to 32: 4128 here, past what
    extract and probe read back (an explicit --input-size is student.check_budget's)."""
    np.save(tmp_path / "x.npy", np.zeros((1, 4100, 4100), np.uint8))
    refused(tmp_path, ("pretrain", f"npy:{tmp_path / 'x.npy'}", "--out", tmp_path / "p.pt", "--quiet"),
            "--input-size 4128")


def test_checkpoint_good_metadata_loads(tmp_path):
    from coopt_fast.priors import load_prior

    path = _ckpt(tmp_path / "c.safetensors", {"arch": "convnet", "input_size": 8, "mean": [0.5], "std": [0.25],
                                              "method": "byol"})
    p = load_prior(f"convnet:{path}")
    assert p.input_size == 8 and p.mean == (0.5,) and p.std == (0.25,)


# ---- a plan.json that is wrong -------------------------------------------------------------

def _set(key, value):
    return lambda p: p.__setitem__(key, value)


def _fp_without_n(p):
    del p["fingerprint"]["n"]


PLAN_BAD = [
    pytest.param(lambda p: p["shards"][0].__setitem__(0, 10**30), "shards[0]", id="index-1e30"),
    pytest.param(lambda p: p["shards"][0].__setitem__(0, 1.5), "shards[0]", id="index-float"),
    pytest.param(lambda p: p["shards"][0].__setitem__(0, "3"), "shards[0]", id="index-str"),
    pytest.param(lambda p: p["shared"].__setitem__(0, True), "shared", id="index-bool"),
    pytest.param(_set("participants", "2"), "participants", id="participants-str"),
    pytest.param(_set("participants", True), "participants", id="participants-bool"),
    pytest.param(_set("shards", {"0": [1]}), "shards", id="shards-dict"),
    pytest.param(lambda p: p["shards"].__setitem__(0, 5), "shards[0]", id="shard-int"),
    pytest.param(_set("shared", "0,1"), "shared", id="shared-str"),
    pytest.param(_set("seed", "x"), "seed", id="seed-str"),
    pytest.param(_set("seed", -1), "seed", id="seed-negative"),
    pytest.param(_set("dataset", 5), "dataset", id="dataset-number"),
    pytest.param(_set("limit", "abc"), "limit", id="limit-str"),
    pytest.param(_set("limit", 0), "limit", id="limit-zero"),
    pytest.param(_fp_without_n, "fingerprint.n", id="fingerprint-no-n"),
    pytest.param(_set("fingerprint", [1]), "fingerprint", id="fingerprint-list"),
    pytest.param(lambda p: p["fingerprint"].__setitem__("sha256", 7), "fingerprint.sha256", id="fingerprint-sha-int"),
]


@pytest.mark.parametrize("fault, field", PLAN_BAD)
def test_plan_field_of_wrong_type(run, fault, field):
    edit_plan(run, fault)
    refused(run.parent, ("extract", run, *EXTRACT_C), "plan.json", field)


@pytest.mark.parametrize("content, fault", [
    (b"[1, 2, 3]", "JSON object"), (b"\xff\xfe{}", "UTF-8"), (b"[" * 100000 + b"]" * 100000, "nested"),
    (b'{"plan_version": "1"}', "plan_version"),
], ids=["list", "not-utf8", "deep", "version-str"])
def test_plan_file_not_a_plan(run, content, fault):
    (run / "plan.json").write_bytes(content)
    for cmd in (("extract", run, *EXTRACT_C), ("status", run), ("merge", run, "--quiet")):
        refused(run.parent, cmd, "plan.json", fault)


# ---- seeds, rounds, devices, sizes ---------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, 2**63, 2**70])
def test_seed_out_of_range(run, tmp_path, seed):  # pretrain's own bound is student.check_budget's
    spec = _spec(run)
    refused(run.parent, ("split", spec, "--out", tmp_path / "new", "--seed", seed), "--seed")
    refused(run.parent, ("extract", run, *EXTRACT_C[:-3], "--prior", "convnet", "--seed", seed, "--quiet"), "--seed")
    refused(tmp_path, ("pretrain", spec, "--out", tmp_path / "p.pt", "--seed", seed, "--quiet"), "--seed")
    refused(tmp_path, ("demo", "--out", tmp_path / "demo", "-k", 2, "--priors", "labels,random", "--seed", seed,
                       "--quiet"), "--seed")


def test_demo_seed_beyond_what_train_takes(tmp_path):
    refused(tmp_path, ("demo", "--out", tmp_path / "demo", "-k", 2, "--priors", "labels,random", "--seed", 2**40,
                       "--quiet"), "--seed")


def test_largest_seed_is_allowed(run, tmp_path):
    plan = coopt_fast.split(_spec(run), tmp_path / "new", participants=2, seed=2**63 - 1)
    assert plan["seed"] == 2**63 - 1


@pytest.mark.parametrize("value", [2**31, 2**70])
def test_round_out_of_range(run, value):
    refused(run.parent, ("extract", run, *EXTRACT_C, "--round", value), "--round")


@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
    "gpu", "cuda:x", "cuda:-1", "",
])
def test_bad_device(run, tmp_path, device):
    refused(run.parent, ("extract", run, *EXTRACT_C, "--device", device), "device", repr(device))
    refused(tmp_path, ("pretrain", _spec(run), "--out", tmp_path / "p.pt", "--device", device, "--quiet"),
            repr(device))
    refused(tmp_path, ("demo", "--out", tmp_path / "demo", "-k", 2, "--priors", "labels,random", "--device", device,
                       "--quiet"), repr(device))


@pytest.mark.parametrize("args, field", [
    (("--workers", 0), "--workers"), (("--batch-size", 10**12), "--batch-size"),
], ids=["workers-0", "batch-1e12"])  # --workers -1, --batch-size -3: test_bad_inputs.py
def test_extract_sizes(run, args, field):
    refused(run.parent, ("extract", run, "--participant", "c", "--shard", 0, "--prior", "convnet",
                         "--decoder", "torchvision", *args, "--quiet"), field)


def test_extract_on_bad_image_choice(free):  # the labels prior decodes nothing: it went unchecked
    refused(free.parent, ("extract", free, *EXTRACT_C, "--on-bad-image", "maybe"), "'--on-bad-image'", "'maybe'", "'skip'")


def test_split_limit_beyond_int64(run, tmp_path):  # merge records --limit in an int64 attribute
    refused(run.parent, ("split", _spec(run), "--out", tmp_path / "new", "--limit", 2**70), "--limit")


def test_probe_labels_prior(tmp_path):
    refused(tmp_path, ("probe", "labels", "--train", "x", "--test", "y", "--quiet"), "labels", "no features")


@pytest.mark.parametrize("args, field", [
    (("-k", 0), "--participants"), (("--limit", 0), "--limit"), (("--dim", 0), "--dim"),
    (("--student-epochs", 0), "--student-epochs"), (("--limit-train", 0), "--limit-train"),
    (("--limit-test", -1), "--limit-test"), (("--priors", "labels,gpt"), "--priors"),
], ids=["k", "limit", "dim", "epochs", "limit-train", "limit-test", "priors"])
def test_demo_options_checked_before_any_work(tmp_path, args, field):
    (tmp_path / "demo/run").mkdir(parents=True)  # a previous demo's run must survive a bad option
    refused(tmp_path, ("demo", "--out", tmp_path / "demo", "--quiet", *args), field)


@pytest.mark.parametrize("args, field", [
    (("--epochs", 0), "--epochs"), (("--neighbours", 0), "--neighbours"), (("--seed", -1), "--seed"),
    (("--limit-train", 0), "--limit-train"),
], ids=["epochs", "k", "seed", "limit-train"])
def test_probe_options(tmp_path, args, field):
    refused(tmp_path, ("probe", "convnet", "--train", "x", "--test", "y", "--quiet", *args), field)


# ---- lock files --------------------------------------------------------------------------------

LOCKS = [b'{"pid": "abc", "host": "%s"}', b"[1, 2]", b"not json", b'{"pid": -1, "host": "%s"}',
         b'{"pid": 0, "host": "%s"}', b'{"pid": 1180591620717411303424, "host": "%s"}', b'{"pid": 1.5}', b""]


@pytest.mark.parametrize("content", LOCKS, ids=["pid-str", "list", "not-json", "pid-neg", "pid-0", "pid-huge",
                                                "pid-float", "empty"])
def test_unparsable_lock(run, content):
    lock = run / "participants/a/features.h5.lock"
    lock.write_bytes(content.replace(b"%s", socket.gethostname().encode()))
    args = ("extract", run, "--participant", "a", "--shard", 0, "--prior", "labels", "--quiet")
    refused(run.parent, args, lock, "lock")  # fresh: its writer may be starting
    os.utime(lock, (lock.stat().st_mtime - 10,) * 2)  # 10 s old: torn, taken over
    _ok(args)
    assert not lock.exists()


def test_lock_that_is_a_folder(run):
    lock = run / "participants/a/features.h5.lock"
    lock.mkdir()
    os.utime(lock, (lock.stat().st_mtime - 10,) * 2)  # old enough to be taken over, were it a file
    line = refused(run.parent, ("extract", run, "--participant", "a", "--shard", 0, "--prior", "labels", "--quiet"))
    assert line.startswith(f"error: {lock}: "), line


# ---- --json never holds NaN or Infinity --------------------------------------------------------

def test_emit_nonfinite_becomes_null(capsys):
    from cli.app import emit

    emit({"a": float("nan"), "b": [float("inf"), (np.float32("nan"), -math.inf)], "c": {"d": np.float64(1.5)},
          "e": np.int64(3), "f": np.array([1.0, np.nan]), "g": "nan", "h": None, "i": np.array(np.inf)}, True)
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c} in --json"))
    assert out == {"a": None, "b": [None, [None, None]], "c": {"d": 1.5}, "e": 3, "f": [1.0, None], "g": "nan",
                   "h": None, "i": None}


def test_extract_json_with_one_row_of_s(tmp_path):
    run = tmp_path / "run"
    coopt_fast.split(make_npy(tmp_path / "data", n=40), run, participants=1, shared_fraction=0.01)  # |S| = 1
    r = _ok(("extract", run, *EXTRACT_C[:-1], "--json"))
    s = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in --json"))
    assert s["uniformity"] is None


@pytest.mark.parametrize("name", ["consensus", "best", "none"])
def test_reserved_participant_names_are_refused(run, name):
    """align --reference gives these words a meaning: a participant of that name would make them ambiguous."""
    refused(run.parent, ("extract", run, "--participant", name, "--shard", 0, "--prior", "labels", "--quiet"),
            f"participant name '{name}'", "reserved")


def test_device_index_beyond_this_machine(monkeypatch):
    """cuda:99 on a GPU machine: one line naming the GPUs there are, not a traceback at the first .to()."""
    from coopt_fast.errors import CooptError
    from coopt_fast.student import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(CooptError, match=r"--device 'cuda:99': this machine has 2 GPU\(s\)"):
        resolve_device("cuda:99")
