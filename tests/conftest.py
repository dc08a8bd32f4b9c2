"""Shared fixtures: a small Fashion-MNIST run through the data side, built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("COOPT_PROGRESS", "0")
torch.set_num_threads(2)
# Without CUDA the Triton kernels are tested in the interpreter; it must be chosen before
# anything imports triton (whose helpers fix their mode at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FMNIST = Path(os.environ.get("COOPT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
requires_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed"
)


def make_npy(folder: Path, n: int, seed: int = 0, classes: int = 16, hw: int = 8) -> str:
    """Random uint8 hw x hw images with labels covering every class: an `npy:` data set spec."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(folder / "x.npy", rng.integers(0, 256, size=(n, hw, hw), dtype=np.uint8))
    y = rng.integers(0, classes, size=n)
    y[:classes] = np.arange(classes)
    np.save(folder / "y.npy", y)
    return f"npy:{folder / 'x.npy'},{folder / 'y.npy'}"


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory) -> Path:
    """A random resnet18 checkpoint that asks for 32 px inputs: the ARCH:CKPT path, CPU-cheap."""
    from coopt_fast.priors import build_backbone, save_checkpoint

    model, _, _ = build_backbone("resnet18", seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "r18.safetensors"
    save_checkpoint(path, model, {"arch": "resnet18", "input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    return path


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, small_ckpt) -> Path:
    """2,000 Fashion-MNIST samples, 3 participants (labels, convnet, resnet18:ckpt), aligned and merged."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist not installed")
    import coopt_fast

    run = tmp_path_factory.mktemp("run")
    coopt_fast.split("fashion-mnist", run, participants=3, shared_fraction=0.1, seed=0, limit=2000)
    for k, (name, prior) in enumerate([("alice", "labels"), ("bob", "convnet"), ("carol", f"resnet18:{small_ckpt}")]):
        coopt_fast.extract(run, name, k, prior, batch_size=128, progress=False)
    coopt_fast.align(run, dim=32, progress=False)
    coopt_fast.merge(run, progress=False)
    return run


def realign(small_run: Path, to: Path, target_dtype: str) -> dict:
    """A copy of small_run at `to`, aligned again with `target_dtype` and merged; merge's summary."""
    import shutil

    import coopt_fast

    shutil.copytree(small_run, to)
    coopt_fast.align(to, dim=32, target_dtype=target_dtype, progress=False, force=True)
    return coopt_fast.merge(to, progress=False, force=True)  # over small_run's merged.h5
