"""Compressed targets: error bounds per dtype, and align -> merge round trips."""

import h5py
import numpy as np
import pytest
import torch

from coopt_fast import codec
from coopt_fast.errors import CooptError

from .conftest import realign, requires_fmnist


@pytest.mark.parametrize("name", codec.TARGET_DTYPES)
def test_quantisation_error_bounds(name):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(257, 33, generator=g) * torch.logspace(-2, 2, 33)  # dims of very different scales
    y[5] = 0  # an all-zero row must survive (scale 1, not 0/0)
    scale = codec.dim_scale(y[:64]) if name == "int8-dim" else None
    stored, row_scale = codec.encode(y.to(codec.kernel_dtype(name)), name, scale)
    assert stored.dtype == codec.storage_dtype(name)
    s = torch.from_numpy(row_scale) if row_scale is not None else scale
    back = codec.decode(torch.from_numpy(stored), name, s)
    err = (back - y).abs()
    if name == "float16":
        bound = y.abs() * 2**-11 + 1e-7
    elif name == "bfloat16":
        bound = y.abs() * 2**-8 + 1e-30
    elif name == "int8":
        bound = s[:, None] / 2 + 1e-6
    else:  # clipped values excepted: beyond 127 * scale the error is the overshoot
        bound = scale / 2 + (y.abs() - 127 * scale).clamp_min(0) + 1e-6
    assert (err <= bound).all(), (name, (err - bound).max())
    assert not back[5].any()


def test_bad_target_dtype():
    with pytest.raises(CooptError, match="--target-dtype"):
        codec.check("float8")


@requires_fmnist
@pytest.mark.parametrize("name", ["bfloat16", "int8", "int8-dim"])
def test_align_merge_round_trip(tmp_path, small_run, name):
    run = tmp_path / "run"
    s = realign(small_run, run, name)
    assert s["target_dtype"] == name
    with h5py.File(small_run / "merged.h5", "r") as f:
        ref = f["targets"][:].astype(np.float32)
    with h5py.File(run / "merged.h5", "r") as f:
        assert f.attrs["target_dtype"] == name and f["targets"].dtype == codec.storage_dtype(name)
        stored = torch.from_numpy(f["targets"][:])
        scale = torch.from_numpy(f["target_scale"][:]) if "target_scale" in f else None
        if name == "int8-dim":
            scale = scale[torch.from_numpy(f["participant"][:]).long()]
        back = codec.decode(stored, name, scale).numpy()
        mean = f["target_mean"][:]
    rel = np.linalg.norm(back - ref) / np.linalg.norm(ref)
    assert rel < {"bfloat16": 4e-3, "int8": 1e-2, "int8-dim": 2e-2}[name], rel
    np.testing.assert_allclose(mean, back.astype(np.float64).mean(0), rtol=1e-4, atol=1e-5)


@requires_fmnist
def test_loader_decodes_compressed_targets(tmp_path, small_run):
    from coopt_fast.loader import StoreLoader

    run = tmp_path / "run"
    realign(small_run, run, "int8-dim")
    loader = StoreLoader(run / "merged.h5", 300, fields=("targets", "index"), shuffle=True, seed=3)
    with h5py.File(run / "merged.h5", "r") as f:
        full = codec.decode(torch.from_numpy(f["targets"][:]), "int8-dim",
                            torch.from_numpy(f["target_scale"][:])[torch.from_numpy(f["participant"][:]).long()])
    seen = 0
    for b in loader:
        assert b["targets"].dtype == torch.float32
        rows = b["index"].numpy()  # index == row here (no missing shards)
        assert torch.equal(b["targets"], full[rows])
        seen += len(rows)
    assert seen == 2000
