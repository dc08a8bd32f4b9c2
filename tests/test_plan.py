import json

import numpy as np
import pytest

import coopt_fast
from coopt_fast.data import fingerprint, load_dataset
from coopt_fast.errors import CooptError
from coopt_fast.plan import load_plan, plan_dataset


@pytest.fixture
def npy_data(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(101, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, size=101)
    np.save(tmp_path / "x.npy", imgs)
    np.save(tmp_path / "y.npy", labels)
    return f"npy:{tmp_path / 'x.npy'},{tmp_path / 'y.npy'}"


def test_shards_disjoint_cover_and_deterministic(tmp_path, npy_data):
    a = coopt_fast.split(npy_data, tmp_path / "a", participants=4, shared_fraction=0.1, seed=7)
    b = coopt_fast.split(npy_data, tmp_path / "b", participants=4, shared_fraction=0.1, seed=7)
    c = coopt_fast.split(npy_data, tmp_path / "c", participants=4, shared_fraction=0.1, seed=8)
    allidx = np.concatenate(a["shards"])
    assert sorted(allidx.tolist()) == list(range(101)), "shards must partition range(N)"
    assert [len(s) for s in a["shards"]] == [26, 25, 25, 25]
    assert all(s == sorted(s) for s in a["shards"]), "plan order is ascending"
    assert len(a["shared"]) == 10 and len(set(a["shared"])) == 10
    assert a["shards"] == b["shards"] and a["shared"] == b["shared"]
    assert a["shards"] != c["shards"]
    assert json.loads((tmp_path / "a" / "plan.json").read_text())["shards"] == a["shards"]


def test_weighted_sizes_and_limit(tmp_path, npy_data):
    p = coopt_fast.split(npy_data, tmp_path / "r", participants=3, sizes=[1, 2, 7], limit=50, shared_fraction=0.001)
    assert [len(s) for s in p["shards"]] == [5, 10, 35]
    assert p["fingerprint"]["n"] == 50
    assert len(p["shared"]) == 1, "round(F·N) >= 1"


@pytest.mark.parametrize("kwargs, msg", [
    ({"participants": 0}, "--participants"),
    ({"participants": 500}, "larger than the data set"),
    ({"shared_fraction": 0.0}, "--shared-fraction"),
    ({"shared_fraction": -0.5}, "--shared-fraction"),
    ({"participants": 2, "sizes": [1, 0]}, "positive"),
    ({"participants": 2, "sizes": [1, -1]}, "positive"),
    ({"participants": 2, "sizes": [1]}, "weights for 2"),
])
def test_bad_split_arguments(tmp_path, npy_data, kwargs, msg):
    with pytest.raises(CooptError, match=msg):
        coopt_fast.split(npy_data, tmp_path / "r", **kwargs)
    assert not (tmp_path / "r" / "plan.json").exists()


def test_changed_dataset_is_refused(tmp_path, npy_data):
    coopt_fast.split(npy_data, tmp_path / "r", participants=2)
    x = np.load(tmp_path / "x.npy")
    x[5, 0, 0] ^= 1
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(CooptError, match="changed since split"):
        plan_dataset(load_plan(tmp_path / "r"))


def test_folder_dataset(tmp_path):
    import torch
    from torchvision.io import write_png

    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            write_png(torch.full((1, 5, 4), i * 40, dtype=torch.uint8), str(tmp_path / "imgs" / c / f"{i}.png"))
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}")
    assert len(ds) == 6 and ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.read([4])[0].shape == (5, 4, 1)
    fp = fingerprint(ds)
    (tmp_path / "imgs" / "dog" / "0.png").write_bytes(b"garbage")
    assert fingerprint(ds)["sha256"] != fp["sha256"]
    with pytest.raises(CooptError, match="cannot decode"):
        ds.read([3])


@pytest.mark.parametrize("spec, msg", [
    ("imagenet", "unknown dataset spec"),
    ("folder:/nonexistent", "not a directory"),
    ("npy:/nonexistent.npy", "cannot load"),
    ("fashion-mnist:val", "unknown split"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(CooptError, match=msg):
        load_dataset(spec)
