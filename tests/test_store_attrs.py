"""The store describes itself: every file kind read with plain h5py, as an h5ls/h5dump user would.

No attribute holds JSON text; every float array with rows carries HDF5's fletcher32 checksum
(merged.h5's memory-mapped datasets carry a sha256 instead); every attribute named *sha256 is the
64-hex sha256 of what it names; a prior's checkpoint is recorded by absolute path, and the same
file named from another working directory is the same prior when an extraction resumes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import coopt_fast
from coopt_fast import layout, publish, store
from coopt_fast.errors import CooptError
from coopt_fast.loader import StoreLoader
from coopt_fast.plan import load_plan
from coopt_fast.priors import build_backbone, resolve_prior_spec, save_checkpoint
from coopt_fast.store import file_sha256

from .conftest import requires_fmnist

pytestmark = requires_fmnist

HEX64 = re.compile(r"[0-9a-f]{64}")
NAMES = ("alice", "bob", "carol")


def _objects(path: Path) -> dict:
    """{object name: (attributes as Python, the dataset's facts or None for a group)}, root included."""
    out = {}

    def take(name, obj):
        facts = None
        if isinstance(obj, h5py.Dataset):
            facts = {"shape": obj.shape, "kind": obj.dtype.kind, "fletcher32": obj.fletcher32, "chunks": obj.chunks}
        out[name] = ({k: store.plain(v) for k, v in obj.attrs.items()}, facts)

    with h5py.File(path, "r") as f:
        take("/", f)
        f.visititems(take)
    return out


def _files(run: Path) -> list[Path]:
    kinds = [run / "merged.h5"]
    for nm in NAMES:
        kinds += [layout.features_path(run, nm), layout.upload_path(run, nm), layout.shared_path(run, nm)]
    assert all(p.exists() for p in kinds)
    return kinds


def _json_container(v) -> bool:
    if not isinstance(v, str):
        return False
    try:
        return isinstance(json.loads(v), (dict, list))
    except ValueError:
        return False


def test_no_attribute_is_json_text(small_run):
    found = [f"{p.name}:{name}@{k}" for p in _files(small_run) for name, (attrs, _) in _objects(p).items()
             for k, v in attrs.items() if _json_container(v)]
    assert not found, found


def test_every_float_array_with_rows_is_checksummed(small_run):
    for p in _files(small_run):
        for name, (attrs, ds) in _objects(p).items():
            if ds is None or ds["kind"] != "f" or not ds["shape"] or ds["shape"][0] == 0:
                continue
            if p.name == "merged.h5" and name == "targets":  # memory-mapped: contiguous, a sha256 instead
                assert ds["chunks"] is None and not ds["fletcher32"]
                continue
            assert ds["fletcher32"], f"{p}:{name} has no checksum"
    with h5py.File(small_run / "merged.h5", "r") as f:
        for name, ds in f.items():
            if isinstance(ds, h5py.Dataset):
                assert store.plain(ds.attrs["sha256"]) == store.dataset_sha256(ds), name


def test_create_checked_stores_an_empty_array_plain(tmp_path):
    """HDF5 takes no filter on an empty dataset: it is stored plain, as create_rows does."""
    with h5py.File(tmp_path / "e.h5", "w") as f:
        empty = store.create_checked(f, "empty", np.zeros((0, 4), np.float32))
        full = store.create_checked(f, "full", np.ones((3, 4), np.float16))
        assert empty.shape == (0, 4) and not empty.fletcher32
        assert full.fletcher32 and full.chunks == (3, 4) and full[:].sum() == 12


def test_every_sha256_attribute_is_the_hash_it_names(small_run, small_ckpt):
    for p in _files(small_run):
        for name, (attrs, _) in _objects(p).items():
            for k, v in attrs.items():
                if k.endswith("sha256") and not (k == "checkpoint_sha256" and v == ""):  # "": no checkpoint
                    assert HEX64.fullmatch(str(v)), f"{p}:{name}@{k} = {v!r}"
    for nm in NAMES:
        feats = file_sha256(layout.features_path(small_run, nm))
        for p in (layout.upload_path(small_run, nm), layout.shared_path(small_run, nm)):
            with h5py.File(p, "r") as f:
                assert store.plain(f.attrs["features_sha256"]) == feats, p
        assert publish.read_record(small_run, nm)["features_sha256"] == feats
    with h5py.File(layout.features_path(small_run, "carol"), "r") as f:
        assert store.plain(f.attrs["checkpoint_sha256"]) == file_sha256(small_ckpt)
    with h5py.File(layout.features_path(small_run, "bob"), "r") as f:
        assert store.plain(f.attrs["checkpoint_sha256"]) == ""  # convnet, randomly initialised


def test_merged_metadata_is_groups_of_attributes(small_run):
    plan = load_plan(small_run)
    with h5py.File(small_run / "merged.h5", "r") as f:
        assert "participants" not in f.attrs and "fingerprint" not in f.attrs and "inputs" not in f.attrs
        owner = f["participant"][:]
        members = {nm: {k: store.plain(v) for k, v in g.attrs.items()} for nm, g in f["participants"].items()}
        fp = f["fingerprint"].attrs
        assert (int(fp["n"]), fp["shape"].tolist(), store.plain(fp["sha256"])) == \
            (plan["fingerprint"]["n"], plan["fingerprint"]["shape"], plan["fingerprint"]["sha256"])
        meta = store.merged_meta(f, small_run / "merged.h5")
    assert list(members) == list(NAMES)  # listed in `participant`'s order
    for nm, m in members.items():
        assert set(m) == set(store.MEMBER_ATTRS)
        upload = layout.upload_path(small_run, nm)
        with h5py.File(layout.features_path(small_run, nm), "r") as f:
            prior, shard = store.plain(f.attrs["prior"]), int(f.attrs["shard"])
        assert m["rows"] == int((owner == m["position"]).sum()) == len(plan["shards"][shard])
        assert (m["shard"], m["round"], m["prior"]) == (shard, 0, prior)
        assert m["upload"] == str(upload.relative_to(small_run)) and m["aligned_sha256"] == file_sha256(upload)
        assert m["features_sha256"] == file_sha256(layout.features_path(small_run, nm))
    assert meta == {"participants": list(NAMES), "rounds": {nm: 0 for nm in NAMES},
                    "inputs": {m["upload"]: m["aligned_sha256"] for m in members.values()},
                    "fingerprint": plan["fingerprint"]}


def _to_json_attrs(path: Path) -> None:
    """Rewrite a merged.h5's metadata as the previous version wrote it: JSON text attributes."""
    with h5py.File(path, "r+") as f:
        meta = store.merged_meta(f, path)
        del f["participants"], f["fingerprint"]
        for k in ("participants", "inputs", "fingerprint", "rounds"):
            f.attrs[k] = json.dumps(meta[k])


def test_a_store_merged_by_the_previous_version_still_reads(small_run, tmp_path):
    """JSON text attributes (before the groups): the loader, verify and merge's up-to-date check
    read them, so a store copied to a training machine without its uploads still trains."""
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    with h5py.File(small_run / "merged.h5", "r") as f:
        want = store.merged_meta(f, small_run / "merged.h5")
    _to_json_attrs(run / "merged.h5")
    with h5py.File(run / "merged.h5", "r") as f:
        assert store.merged_meta(f, run / "merged.h5") == want
    assert StoreLoader(run / "merged.h5", 8, fields=("targets",)).participants == list(NAMES)
    assert coopt_fast.merge(run, progress=False)["skipped"]
    checks = [c for c in coopt_fast.verify(run)["checks"] if c["file"] == "merged.h5"]
    assert all(c["ok"] for c in checks) and sum(c["check"].startswith("input ") for c in checks) == len(NAMES)
    with h5py.File(run / "merged.h5", "r+") as f:
        del f.attrs["participants"]
    with pytest.raises(CooptError, match=r"merged.h5: no readable participants and fingerprint groups .*rerun merge --force"):
        StoreLoader(run / "merged.h5", 8, fields=("targets",))


def test_prior_checkpoints_are_recorded_by_absolute_path(small_run, small_ckpt):
    want = f"resnet18:{small_ckpt.resolve()}"
    assert Path(want.partition(":")[2]).is_absolute()
    for p in (layout.features_path(small_run, "carol"), layout.upload_path(small_run, "carol")):
        with h5py.File(p, "r") as f:
            assert store.plain(f.attrs["prior"]) == want, p
    assert publish.read_record(small_run, "carol")["prior"] == want
    with h5py.File(small_run / "merged.h5", "r") as f:
        assert store.plain(f["participants/carol"].attrs["prior"]) == want
        assert store.plain(f["participants/alice"].attrs["prior"]) == "labels"


def test_a_relative_prior_resumes_from_another_directory(tmp_path, monkeypatch):
    """Interrupted with a relative checkpoint path in one directory, resumed with the absolute
    path, then rerun from a third directory: one prior throughout (resumed, then up to date)."""
    run = tmp_path / "run"
    coopt_fast.split("fashion-mnist", run, participants=2, shared_fraction=0.05, seed=1, limit=200)
    (tmp_path / "ck").mkdir()
    (tmp_path / "elsewhere").mkdir()
    model, _, _ = build_backbone("convnet", seed=5)
    save_checkpoint(tmp_path / "ck" / "c.safetensors", model, {"arch": "convnet"})
    absolute = f"convnet:{(tmp_path / 'ck' / 'c.safetensors').resolve()}"
    real, calls = store.append_rows, {"n": 0}

    def dying(ds, block):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(ds, block)

    monkeypatch.chdir(tmp_path / "ck")
    assert resolve_prior_spec("convnet:c.safetensors") == absolute
    monkeypatch.setattr(store, "append_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        coopt_fast.extract(run, "p", 0, "convnet:c.safetensors", batch_size=16, progress=False)
    monkeypatch.setattr(store, "append_rows", real)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert coopt_fast.extract(run, "p", 0, absolute, batch_size=16, progress=False)["resumed"]
    again = coopt_fast.extract(run, "p", 0, f"convnet:{os.path.join('..', 'ck', 'c.safetensors')}", progress=False)
    assert again["skipped"] and again["prior"] == absolute
