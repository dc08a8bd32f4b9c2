"""score and align on a chosen --device, and score's uniformity split across torchrun ranks.

The run: 1,500 random 8x8 images, 2 participants (linear: 64 features, convnet: 256), |S| = 300,
so 2 ranks split S unevenly (rows 0-127 and 128-299: about equal pairs, see kernels.row_bands).
Without CUDA, the Triton path runs under TRITON_INTERPRET=1 (conftest); tests marked gpu compare
CUDA against the CPU and skip without it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import coopt_fast
from coopt_fast.cli import app
from coopt_fast.errors import CooptError

from .conftest import make_npy

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SCORES = ("uniformity", "uniformity_centred", "effective_rank")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    spec = make_npy(root / "data", 1500, hw=8)
    run = root / "run"
    coopt_fast.split(spec, run, participants=2, shared_fraction=0.2, seed=0)
    for k, (name, prior) in enumerate((("a", "linear"), ("b", "convnet"))):
        coopt_fast.extract(run, name, k, prior, batch_size=256, progress=False)
    return run


@pytest.fixture
def run(base, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base, dst)
    return dst


def _scores(summary) -> dict:
    return {r["participant"]: [r[k] for k in SCORES] for r in summary["participants"]}


def test_score_recompute_on_cpu_is_what_extract_published(base):
    published, again = coopt_fast.score(base), coopt_fast.score(base, device="cpu", recompute=True)
    assert not published["recomputed"] and again["recomputed"] and again["device"] == "cpu"
    assert [r["shared_rows"] for r in again["participants"]] == [300, 300]
    assert _scores(again) == _scores(published)  # the same CPU code path: the same bits


def test_score_torchrun_two_gloo_ranks_equal_one_process(base):
    """`torchrun --nproc_per_node=2 -m coopt_fast score RUN --recompute`: each rank sums its band of
    U's pairs on S (kernels.uniformity_sharded), rank 0 alone prints, and the scores equal one
    process's within 2e-6 + 1e-6 relative (fp32 tiles cut elsewhere, another summation order)."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "coopt_fast", "score", str(base), "--recompute",
           "--device", "cpu", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)  # one JSON document: rank 1 printed nothing
    assert got["recomputed"] and got["device"] == "cpu"
    one = _scores(coopt_fast.score(base, device="cpu", recompute=True))
    for name, vals in _scores(got).items():
        np.testing.assert_allclose(vals, one[name], rtol=1e-6, atol=2e-6, err_msg=name)


def test_device_refusals_are_one_line(run):
    runner = CliRunner()
    for cmd in (["score", str(run), "--device", "tpu"], ["align", str(run), "--dim", "8", "--device", "cuda:x"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2 and r.stderr.strip().startswith("error: --device"), (cmd, r.stderr)
    if not torch.cuda.is_available():
        with pytest.raises(CooptError, match="CUDA is not available"):
            coopt_fast.align(run, dim=8, device="cuda", progress=False)
    with pytest.raises(CooptError, match="b's workspace is elsewhere"):
        (run / "participants" / "b" / "features.h5").unlink()
        coopt_fast.score(run, recompute=True)


def _targets(run, name):
    with h5py.File(run / "participants" / name / "aligned.h5", "r") as f:
        return (f["shard/targets"][:].astype(np.float32), f["shared/targets"][:], f["stats/sum"][:],
                f.attrs["s_star"])


def _same_alignment(a, b, name):
    """Shard targets within one fp16 rounding of the map (the Triton kernel multiplies in fp16,
    the CPU fallback in fp32): |diff| <= 4e-3 * (row scale); statistics agree to match."""
    ta, sa, suma, star_a = _targets(a, name)
    tb, sb, sumb, star_b = _targets(b, name)
    scale = np.abs(ta).max(1, keepdims=True) + 1e-3
    assert (np.abs(ta - tb) / scale).max() < 4e-3, name
    np.testing.assert_allclose(suma, sumb, rtol=1e-2, atol=4e-3 * np.abs(ta).max() * len(ta) ** 0.5, err_msg=name)
    return sa, sb, star_a, star_b


def test_align_shard_through_the_triton_kernel(run, tmp_path, monkeypatch):
    """COOPT_KERNELS=triton (interpreted on this CPU): the shard apply takes the Triton kernel's
    path, as on CUDA, and the targets match the CPU fallback's within fp16 rounding."""
    cpu = tmp_path / "cpu"
    shutil.copytree(run, cpu)
    coopt_fast.align(cpu, dim=8, progress=False, device="cpu")
    calls = []
    import coopt_fast.kernels as K

    real = K._align_mod.align_apply_triton
    monkeypatch.setattr(K._align_mod, "align_apply_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("COOPT_KERNELS", "triton")
    coopt_fast.align(run, dim=8, progress=False, device="cpu")
    assert calls, "align did not reach the Triton kernel"
    for name in ("a", "b"):
        _same_alignment(cpu, run, name)


@needs_cuda
def test_score_and_align_on_cuda_match_the_cpu(run, tmp_path):
    """--device cuda: U through the compiled Triton kernel (fp32 rows: tf32x3) within 1e-5 of the
    CPU; the shard targets within fp16 rounding; S* (computed on the CPU) the same bits."""
    cpu, gpu = coopt_fast.score(run, device="cpu", recompute=True), coopt_fast.score(run, device="cuda", recompute=True)
    assert gpu["device"].startswith("cuda")
    for name, vals in _scores(gpu).items():
        np.testing.assert_allclose(vals, _scores(cpu)[name], rtol=1e-6, atol=1e-5, err_msg=name)
    on_cpu = tmp_path / "cpu"
    shutil.copytree(run, on_cpu)
    coopt_fast.align(on_cpu, dim=8, progress=False, device="cpu")
    coopt_fast.align(run, dim=8, progress=False, device="cuda")
    for name in ("a", "b"):
        sa, sb, star_a, star_b = _same_alignment(on_cpu, run, name)
        assert np.array_equal(sa, sb) and star_a == star_b, name
