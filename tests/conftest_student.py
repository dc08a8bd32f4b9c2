"""Fixtures for the loader/student/ssl/evaluate tests: a small merged store made with h5py.

Imported by those test files (`from .conftest_student import ...`); not a conftest.py, so it
stays independent of the data side's fixtures. The store follows merge's schema: contiguous,
unfiltered `targets` (float16) and `images` (uint8), `index`, `participant`, target_mean/std.
Targets are label-derived (one-hot @ a random matrix + noise), so a student that learns them
learns the classes: what makes "train beats untrained" a robust margin rather than a coin flip.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
import pytest

from coopt_fast import store
from coopt_fast.data import load_dataset


@lru_cache(maxsize=2)
def fmnist(split: str = "train"):
    return load_dataset("fashion-mnist" if split == "train" else "fashion-mnist:test")


def make_merged(path: Path, n: int = 384, dim: int = 16, *, images: bool = True, index=None,
                chunked: bool = False, seed: int = 0, noise: float = 0.1) -> Path:
    """Write RUN/merged.h5 from Fashion-MNIST rows `index` (default: the first n)."""
    ds = fmnist()
    rng = np.random.default_rng(seed)
    index = np.arange(n, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    n = len(index)
    labels = ds.labels[index]
    proj = rng.standard_normal((10, dim)).astype(np.float32)
    targets = (np.eye(10, dtype=np.float32)[labels] @ proj + noise * rng.standard_normal((n, dim))).astype(np.float16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update(format_version=1, complete=True, dataset="fashion-mnist", dim=dim, target_dtype="float16")
        store.write_merged_meta(f, [{"name": nm} for nm in ("a", "b", "c")],
                                {"n": len(ds), "shape": list(ds.shape), "sha256": "synthetic"})
        kw = {"chunks": (64, dim), "compression": "gzip"} if chunked else {}
        f.create_dataset("targets", data=targets, **kw)
        f.create_dataset("index", data=index)
        f.create_dataset("participant", data=(index % 3).astype(np.int16))
        f.create_dataset("target_mean", data=targets.astype(np.float32).mean(0))
        f.create_dataset("target_std", data=targets.astype(np.float32).std(0))
        if images:
            f.create_dataset("images", data=ds.images[index])
    return path


@pytest.fixture
def merged_run(tmp_path) -> Path:
    """A run folder with a 384-row merged store (images inside)."""
    make_merged(tmp_path / "run" / "merged.h5")
    return tmp_path / "run"
