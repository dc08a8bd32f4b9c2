"""Hostile and odd uploads, round two (issue 13): merge checks every value it uses before it
writes anything, merged.h5 carries a sha256 per dataset that verify recomputes, and merge neither
replaces a finished merged.h5 by accident nor redoes one that is up to date.

The contract helpers (`refused`: one line, exit 2, the folder unchanged) and the `base`/`run`
fixtures (2 participants, labels prior, 400 npy images, dim 8, merged) come from test_bad_inputs.
Each upload fault is made by the participant itself (`edit(..., record=True)` re-records the
sha256): an honest-looking upload that is wrong, so what is tested is merge's check, not the hash.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import coopt_fast
from coopt_fast import store
from coopt_fast.cli import app
from coopt_fast.priors import file_sha256
from .test_bad_inputs import DIM, base, edit, refused, replace, run, snapshot  # noqa: F401  (fixtures)

B = "participants/b/aligned.h5"


def merge_refused(run: Path, *names) -> str:
    return refused(run.parent, ("merge", run, "--quiet"), *names)


def _set(key, fn):
    return lambda f: replace(f, key, fn(f[key][()]))


def _attr(key, value):
    return lambda f: f.attrs.__setitem__(key, value)


def _poke(a: np.ndarray, j: int, value) -> np.ndarray:
    a = a.copy()
    a[j] = value
    return a


def _skip_all(f):  # every sample of the shard marked undecodable
    replace(f, "shard/skipped", f["shard/index"][:])
    replace(f, "shard/targets", np.zeros_like(f["shard/targets"][:]))
    replace(f, "stats/sum", np.zeros(DIM))
    replace(f, "stats/sumsq", np.zeros(DIM))


# ---- 1. every value of an upload, before anything is written -------------------------------

UPLOAD_FAULTS = [
    pytest.param(_set("stats/sum", lambda a: _poke(a, 2, np.nan)), ("stats/sum", "NaN"), id="sum-nan"),
    pytest.param(_set("stats/sumsq", lambda a: _poke(a, 0, np.inf)), ("stats/sumsq", "NaN or Inf"), id="sumsq-inf"),
    pytest.param(_set("stats/sum", lambda a: a[:-1]), ("stats/sum", "shape"), id="sum-short"),
    pytest.param(_set("stats/sum", lambda a: a[None]), ("stats/sum", "shape"), id="sum-2d"),
    pytest.param(_set("stats/sumsq", lambda a: a.astype(np.float32)), ("stats/sumsq", "float32"), id="sumsq-float32"),
    pytest.param(_set("stats/sum", lambda a: _poke(a, 3, a[3] + 1 + 0.01 * abs(a[3]))), ("stats/sum", "does not match"),
                 id="sum-off"),
    pytest.param(_set("stats/sumsq", lambda a: 2 * a), ("stats/sumsq", "does not match"), id="sumsq-doubled"),
    pytest.param(_skip_all, ("shard/skipped", "none can fail"), id="whole-shard-skipped"),
    pytest.param(_set("shared/skipped", lambda a: np.asarray([0], np.int64)), ("shared/skipped",), id="shared-skipped"),
    pytest.param(_attr("dim", DIM + 1), ("attribute dim", "9", "8 columns"), id="dim-attr"),
    pytest.param(_attr("dim", "eight"), ("attribute dim",), id="dim-attr-text"),
    pytest.param(_attr("target_dtype", 5), ("attribute target_dtype",), id="target-dtype-int"),
    pytest.param(_attr("target_dtype", np.array([1.0, 2.0])), ("attribute target_dtype",), id="target-dtype-array"),
    pytest.param(_attr("round", 2**62), ("attribute round",), id="round-huge"),
    pytest.param(_attr("round", -1), ("attribute round",), id="round-negative"),
    pytest.param(_attr("round", "seven"), ("attribute round",), id="round-text"),
    pytest.param(_attr("round", 1.5), ("attribute round",), id="round-float"),
    pytest.param(_attr("participant", "a"), ("attribute participant",), id="participant-attr"),
    pytest.param(_set("projection", lambda a: a[:, :-1]), ("projection", "shape"), id="projection-shape"),
    pytest.param(_set("map", lambda a: a[:-1]), ("map", "shape"), id="map-shape"),
    pytest.param(_set("map", lambda a: _poke(a, 0, np.nan)), ("map", "NaN"), id="map-nan"),
    pytest.param(_set("shared/index", lambda a: a[:-1]), ("shared/index", "shared set"), id="shared-index"),
    pytest.param(_set("shared/targets", lambda a: a[:, :-1]), ("shared/targets", "shape"), id="shared-targets-shape"),
    pytest.param(_set("shared/targets", lambda a: _poke(a, 1, np.inf)), ("shared/targets", "NaN"), id="shared-targets-inf"),
    pytest.param(_set("shard/index", lambda a: a.astype(np.float64)), ("shard/index", "float64"), id="index-float"),
]


@pytest.mark.parametrize("fault, names", UPLOAD_FAULTS)
def test_merge_checks_every_value_of_an_upload(run, fault, names):
    edit(run / B, fault)
    merge_refused(run, B, *names)


@pytest.mark.parametrize("value", ["zed", 7], ids=["unknown-name", "int"])
def test_merge_refuses_a_reference_that_is_no_participant(run, value):
    for name in ("a", "b"):  # both agree, so it is not the cross-upload check that speaks
        edit(run / f"participants/{name}/aligned.h5", _attr("reference", value))
    merge_refused(run, "participants/a/aligned.h5", "reference")


@pytest.mark.parametrize("td, fault, names", [
    pytest.param("int8", _set("shard/scale", lambda a: _poke(a, 4, 0.0)), ("shard/scale", "> 0"), id="int8-zero"),
    pytest.param("int8", _set("shard/scale", lambda a: a[:, 0]), ("shard/scale", "shape"), id="int8-1d"),
    pytest.param("int8-dim", _set("scale", lambda a: -a), ("scale", "> 0"), id="int8-dim-negative"),
    pytest.param("int8-dim", _set("scale", lambda a: a[:-1]), ("scale", "shape"), id="int8-dim-short"),
    pytest.param("int8-dim", _set("scale", lambda a: a.astype(np.float64)), ("scale", "float64"), id="int8-dim-f64"),
])
def test_merge_checks_int8_scales(run, td, fault, names):
    coopt_fast.align(run, dim=DIM, target_dtype=td, progress=False, force=True)
    edit(run / B, fault)
    merge_refused(run, B, *names)


@pytest.mark.parametrize("td", ["float16", "bfloat16", "int8", "int8-dim"])
def test_every_codec_merges_within_the_stats_tolerance(run, td):
    """The recomputed statistics agree with align's for every codec (no false refusal)."""
    coopt_fast.align(run, dim=DIM, target_dtype=td, progress=False, force=True)
    s = coopt_fast.merge(run, progress=False, force=True)
    assert s["rows"] == 400 and s["target_dtype"] == td and not s["skipped"]
    assert coopt_fast.verify(run)["ok"]


# A folder data set with one truncated JPEG and a prior that decodes images: the one place a
# skipped row is legitimate. Skipped rows must then be zeros, listed once, inside the shard.

@pytest.fixture(scope="module")
def folder_base(tmp_path_factory) -> tuple[Path, str]:
    from torchvision.io import encode_jpeg

    root = tmp_path_factory.mktemp("folder")
    imgs = root / "imgs"
    for c in ("c0", "c1"):
        (imgs / c).mkdir(parents=True)
        for i in range(6):
            x = torch.full((3, 12, 12), 20 * i + 50 * (c == "c1"), dtype=torch.uint8)
            (imgs / c / f"{i}.jpg").write_bytes(encode_jpeg(x).numpy().tobytes())
    (imgs / "c1/3.jpg").write_bytes((imgs / "c1/3.jpg").read_bytes()[:40])
    run = root / "run"
    coopt_fast.split(f"folder:{imgs}", run, participants=2, shared_fraction=0.25, seed=0)
    for k, name in enumerate(("a", "b")):
        coopt_fast.extract(run, name, k, "linear", decoder="torchvision", workers=1, on_bad_image="skip",
                           progress=False)
    coopt_fast.align(run, dim=4, progress=False)
    s = coopt_fast.merge(run, progress=False)  # a legitimately skipped image merges without --allow-missing
    assert s["rows"] == 11, s
    for name in ("a", "b"):  # the participant whose shard holds the truncated image
        with h5py.File(run / f"participants/{name}/aligned.h5", "r") as f:
            if len(f["shard/skipped"]):
                return run, name
    raise AssertionError("no upload lists the truncated image as skipped")


@pytest.fixture
def folder_run(folder_base, tmp_path) -> tuple[Path, str]:
    shutil.copytree(folder_base[0], tmp_path / "run")
    return tmp_path / "run", folder_base[1]


def _skipped_row_nonzero(f):
    row = int(np.flatnonzero(np.isin(f["shard/index"][:], f["shard/skipped"][:]))[0])
    t = f["shard/targets"][:]
    t[row] = 0.5
    replace(f, "shard/targets", t)
    replace(f, "stats/sum", t.astype(np.float64).sum(0))  # stats agree: the zero-row rule is what fires
    replace(f, "stats/sumsq", np.square(t.astype(np.float64)).sum(0))


@pytest.mark.parametrize("fault, names", [
    pytest.param(_skipped_row_nonzero, ("shard/targets", "shard/skipped", "not zero"), id="skipped-row-nonzero"),
    pytest.param(_set("shard/skipped", lambda a: np.concatenate([a, a])), ("shard/skipped", "duplicate"),
                 id="skipped-twice"),
])
def test_merge_checks_skipped_rows_where_skipping_is_possible(folder_run, fault, names):
    run, who = folder_run
    edit(run / f"participants/{who}/aligned.h5", fault)
    merge_refused(run, f"participants/{who}/aligned.h5", *names)


def _skip_everything(f):
    replace(f, "shard/skipped", f["shard/index"][:])
    replace(f, "shard/targets", np.zeros_like(f["shard/targets"][:]))
    replace(f, "stats/sum", np.zeros(f["stats/sum"].shape))
    replace(f, "stats/sumsq", np.zeros(f["stats/sumsq"].shape))


def test_merge_refuses_when_every_sample_is_skipped(folder_run):
    """Nothing left to merge: not a store of 0 rows whose target_mean is 0/0 = NaN."""
    run, _ = folder_run
    for name in ("a", "b"):
        edit(run / f"participants/{name}/aligned.h5", _skip_everything)
    merge_refused(run, "every uploaded sample is skipped")


# ---- 2. a digest per dataset of merged.h5, recomputed by verify ----------------------------

def _checks(run: Path) -> dict:
    return {c["check"]: c for c in coopt_fast.verify(run)["checks"] if c["file"] == "merged.h5"}


def test_every_merged_dataset_has_a_digest_verify_checks(run):
    with h5py.File(run / "merged.h5", "r") as f:
        names = sorted(n for n, d in f.items() if isinstance(d, h5py.Dataset))  # not the metadata groups
    checks = _checks(run)
    assert {f"sha256 {n}" for n in names} <= set(checks), sorted(checks)
    assert all(checks[f"sha256 {n}"]["ok"] for n in names)


@pytest.mark.parametrize("name, change", [
    ("targets", lambda d: d.__setitem__(5, d[6])),  # a row replaced by another row: finite, plausible
    ("targets", lambda d: d.__setitem__((0, 0), d[0, 0] + np.float16(0.125))),
    ("images", lambda d: d.__setitem__((3, 0, 0), d[3, 0, 0] ^ 1)),
    ("index", lambda d: d.__setitem__(slice(0, 2), d[0:2][::-1])),
    ("participant", lambda d: d.__setitem__(0, 1 - d[0])),
    ("target_mean", lambda d: d.__setitem__(0, d[0] + 1)),
    ("target_std", lambda d: d.__setitem__(1, d[1] * 2)),
])
def test_verify_sees_a_changed_dataset_of_the_merged_store(run, name, change):
    assert _checks(run)[f"sha256 {name}"]["ok"]
    with h5py.File(run / "merged.h5", "r+") as f:
        change(f[name])
    checks = _checks(run)
    bad = [k for k, c in checks.items() if not c["ok"]]
    assert bad == [f"sha256 {name}"], bad
    r = CliRunner().invoke(app, ["verify", str(run), "--json"])
    faults = [(c["file"], c["check"]) for c in _strict_json(r.stdout)["checks"] if not c["ok"]]
    assert r.exit_code == 1 and faults == [("merged.h5", f"sha256 {name}")], faults


def test_verify_names_a_merged_store_without_digests(run):
    with h5py.File(run / "merged.h5", "r+") as f:
        del f["targets"].attrs["sha256"]
    c = _checks(run)["sha256 targets"]
    assert not c["ok"] and "no digest recorded" in c["detail"]


def test_the_loader_still_memory_maps_the_store(run):
    """The digests are attributes: the data's layout (contiguous, memmapped) is unchanged."""
    from coopt_fast.loader import StoreLoader

    batch = next(iter(StoreLoader(run, 64, fields=("images", "targets", "index"), seed=0)))
    with h5py.File(run / "merged.h5", "r") as f:
        assert "sha256" in f["targets"].attrs and f["targets"].chunks is None
        rows = batch["index"].numpy()  # all of range(N) is merged: row r holds sample r
        assert np.array_equal(batch["targets"].numpy(), f["targets"][()][rows])
        assert np.array_equal(batch["images"].numpy(), f["images"][()][rows])


@pytest.mark.parametrize("value", ["x", np.array([0, 1])], ids=["text", "array"])
def test_verify_names_a_shard_attribute_that_is_no_integer(run, value):
    edit(run / "participants/b/features.h5", _attr("shard", value))
    faults = [(c["file"], c["check"]) for c in coopt_fast.verify(run)["checks"] if not c["ok"]]
    assert ("participants/b/features.h5", "plan") in faults, faults


# ---- 3. no silent overwrite; nothing redone when up to date --------------------------------

def _strict_json(text: str):
    def no(c):
        raise AssertionError(f"{c} in JSON output")

    return json.loads(text, parse_constant=no)


def test_merge_again_from_the_same_uploads_is_up_to_date(run):
    before = snapshot(run)
    r = CliRunner().invoke(app, ["merge", str(run), "--quiet", "--json"])
    assert r.exit_code == 0, r.stderr
    s = _strict_json(r.stdout)
    assert s["skipped"] is True and s["rows"] == 400
    assert snapshot(run) == before


def test_merge_refuses_to_replace_a_store_made_from_other_uploads(run):
    old = file_sha256(run / "merged.h5")
    coopt_fast.align(run, dim=DIM, target_dtype="bfloat16", progress=False, force=True)
    line = merge_refused(run, "merged.h5", "participants/a/aligned.h5 changed", B + " changed", "--force")
    assert line.index("merged.h5") < line.index("participants/")  # the file first, then what changed
    assert file_sha256(run / "merged.h5") == old
    r = CliRunner().invoke(app, ["merge", str(run), "--quiet", "--force", "--json"])
    assert r.exit_code == 0, r.stderr
    s = _strict_json(r.stdout)
    assert s["skipped"] is False and s["target_dtype"] == "bfloat16"
    with h5py.File(run / "merged.h5", "r") as f:
        assert store.merged_meta(f, run / "merged.h5")["inputs"][B] == file_sha256(run / B)


def test_merge_refuses_to_replace_a_store_when_a_shard_went_missing(run):
    (run / B).unlink()
    refused(run.parent, ("merge", run, "--allow-missing", "--quiet"), "merged.h5", B, "is gone")
    s = coopt_fast.merge(run, allow_missing=True, force=True, progress=False)
    assert s["missing_shards"] == [1] and s["rows"] < 400
    # ... and that merge, repeated with the same (missing) outcome, is up to date
    assert coopt_fast.merge(run, allow_missing=True, progress=False)["skipped"]


def test_merge_refuses_to_replace_an_unreadable_store(run):
    (run / "merged.h5").write_bytes(b"not hdf5" * 100)
    merge_refused(run, "merged.h5", "what it was made from cannot be told", "--force")
    assert not coopt_fast.merge(run, force=True, progress=False)["skipped"]
    store.open_complete(run / "merged.h5", "merged store").close()


def test_merge_force_rewrites_the_same_bytes(run):
    with h5py.File(run / "merged.h5", "r") as f:
        before = {n: d[()] for n, d in f.items() if isinstance(d, h5py.Dataset)}
        meta = store.merged_meta(f, run / "merged.h5")
    assert not coopt_fast.merge(run, force=True, progress=False)["skipped"]
    with h5py.File(run / "merged.h5", "r") as f:
        for n in before:
            assert np.array_equal(f[n][()], before[n]), n
        assert store.merged_meta(f, run / "merged.h5") == meta
