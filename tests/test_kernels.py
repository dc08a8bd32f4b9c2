"""Kernels against their references (kernels/reference.py).

Without CUDA the Triton kernels run on the CPU under TRITON_INTERPRET=1, at small irregular
shapes with small tiles (the interpreter runs every program in numpy). The variable is set
below, at collection, before anything in the session imports triton: triton fixes interpreter
vs compiler for its own helpers (tl.sum, tl.cdiv, ...) when triton.language is imported, and
coopt_fast.kernels imports triton only when a kernel first runs. With CUDA the same kernel
tests run compiled on the GPU; tests marked `gpu` add bigger shapes and skip without CUDA.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import coopt_fast.kernels as K  # noqa: E402
from coopt_fast.kernels.align_apply_triton import align_apply_triton  # noqa: E402
from coopt_fast.kernels.reference import align_apply_ref, uniformity_ref, uniformity_tiled_ref  # noqa: E402
from coopt_fast.kernels.torch_ops import (align_apply_torch, finish_uniformity,  # noqa: E402
                                          uniformity_log2sum_torch, uniformity_torch)
from coopt_fast.kernels.uniformity_triton import (interpreting, uniformity_log2sum_triton,  # noqa: E402
                                                  uniformity_triton)

HAS_TRITON = importlib.util.find_spec("triton") is not None
# where the Triton kernels can run in this session: compiled on CUDA, or interpreted on the CPU
KDEV = "cpu" if interpreting() else ("cuda" if torch.cuda.is_available() else None)
WHY = "needs triton, and CUDA or TRITON_INTERPRET=1"
if "triton" in sys.modules and interpreting():  # imported before this module, maybe compiled
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(sys.modules["triton"].language.cdiv, InterpretedFunction):
        KDEV, WHY = None, "triton was imported before TRITON_INTERPRET=1 was set: set it in the environment"
needs_triton = pytest.mark.skipif(not HAS_TRITON or KDEV is None, reason=WHY)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs CUDA (compiled)")

# interpreter-sized tiles: tl.dot needs every dimension >= 16
SMALL_U = dict(block=16, block_k=16, group=2)
SMALL_A = dict(block_m=16, block_n=16, block_k=16)


@pytest.fixture
def kdev(monkeypatch):
    """The device the Triton kernels run on here; the dispatcher is told to use them."""
    if not HAS_TRITON or KDEV is None:
        pytest.skip(WHY)
    monkeypatch.setenv("COOPT_KERNELS", "triton")
    return KDEV


def assert_close(actual, expected, atol, rtol, what=""):
    """torch-style closeness that names the first mismatching index and refuses NaN/inf surprises."""
    actual = torch.as_tensor(actual).double().cpu()
    expected = torch.as_tensor(expected).double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same_nonfinite = (actual == expected) | (actual.isnan() & expected.isnan())
    bad = ~(((actual - expected).abs() <= atol + rtol * expected.abs()) | same_nonfinite)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0]) if actual.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} mismatches (atol={atol}, rtol={rtol}); first at {idx}: "
            f"actual {actual[idx].item()!r} vs expected {expected[idx].item()!r} "
            f"(max |diff| {(actual - expected).abs()[bad].max().item():.3g})"
        )


def uniformity_f64(xh: torch.Tensor, t: float) -> float:
    """U of already-normalised rows in fp64 with a log-sum-exp: finite where fp32 underflows."""
    e = torch.pdist(xh.double(), p=2).pow(2).mul(-t)
    return (torch.logsumexp(e, 0) - math.log(e.numel())).item()


# ---------------------------------------------------------------- uniformity: kernel vs reference

# (dtype, atol vs the fp32 reference): the cast of the normalised rows dominates the error
DTYPES = [(torch.float32, 1e-5), (torch.float16, 3e-4), (torch.bfloat16, 3e-3)]


@pytest.mark.parametrize("n,l", [(67, 45), (33, 20), (100, 64), (17, 1)])
@pytest.mark.parametrize("dtype,atol", DTYPES)
def test_uniformity_kernel_matches_reference(kdev, n, l, dtype, atol):
    torch.manual_seed(n * 1000 + l)
    x = (torch.randn(n, l) + 0.3).to(dtype)  # + 0.3: not centred, so U is not at its minimum
    got = uniformity_triton(x.to(kdev), **SMALL_U)
    assert got.dtype == torch.float32 and got.dim() == 0 and got.device.type == kdev
    assert_close(got, uniformity_ref(x), atol, 1e-5, f"kernel vs reference {n}x{l} {dtype}")
    # and tightly against fp64 math on exactly the rows the kernel sees (normalised, then cast)
    xh = F.normalize(x.float(), dim=1).to(dtype)
    assert_close(got, uniformity_f64(xh, 2.0), 2e-6, 2e-6, f"kernel vs fp64 on its inputs {n}x{l} {dtype}")


def test_uniformity_kernel_weird_shape(kdev):
    """The tutorial's 1823 x 781 scaled to what the interpreter does in about a second: many
    tiles (T = 9: the fold adds a padding row block), a partial GROUP, l padded 181 -> 192."""
    torch.manual_seed(8)
    x = torch.randn(523, 181).half()
    got = uniformity_triton(x.to(kdev), block=64, block_k=32, group=4)
    assert_close(got, uniformity_ref(x), 3e-4, 1e-5, "kernel 523x181 fp16")
    assert_close(got, uniformity_f64(F.normalize(x.float(), dim=1).half(), 2.0), 2e-6, 2e-6, "kernel 523x181 vs fp64")


def test_dispatcher_runs_the_kernel(kdev, monkeypatch):
    calls = []
    real = K._uniformity_mod.uniformity_triton
    monkeypatch.setattr(K._uniformity_mod, "uniformity_triton", lambda x, t: calls.append(1) or real(x, t, **SMALL_U))
    x = torch.randn(40, 24)
    assert_close(K.uniformity(x.to(kdev)), uniformity_ref(x), 1e-5, 1e-5, "dispatcher, COOPT_KERNELS=triton")
    assert calls, "COOPT_KERNELS=triton did not run the Triton kernel"


# ------------------------------------------------- uniformity: edge cases, every implementation

def _fallback(x, t=2.0):
    return uniformity_torch(x, t, block=16, block_cols=40)  # tiny tiles: many edges and diagonals


def _kernel(x, t=2.0):
    return uniformity_triton(x.to(KDEV), t, **SMALL_U).cpu()


IMPLS = [pytest.param(_fallback, id="torch"), pytest.param(_kernel, id="triton", marks=needs_triton)]


@pytest.mark.parametrize("impl", IMPLS)
def test_uniformity_two_rows(impl):
    for x in (torch.tensor([[3.0], [-2.0]]), torch.tensor([[3.0], [2.0]])):  # d^2 = 4, then 0
        assert_close(impl(x), uniformity_ref(x), 1e-6, 1e-6, f"n=2 l=1 {x.tolist()}")


@pytest.mark.parametrize("impl", IMPLS)
def test_uniformity_duplicates_and_zero_rows(impl):
    torch.manual_seed(1)
    x = torch.randn(37, 19)
    x[5] = x[2]  # duplicate: the Gram form's d^2 = 2 - 2 a.b cancels to ~0
    x[30] = 7.0 * x[2]  # same direction, other scale: a duplicate after normalisation
    x[11] = 0.0  # zero rows stay zero: squared distance 1 to unit rows ...
    x[12] = 0.0  # ... and 0 to each other
    assert_close(impl(x), uniformity_ref(x), 1e-5, 1e-5, "duplicates + zero rows")
    z = torch.zeros(5, 8)
    assert_close(impl(z), uniformity_ref(z), 1e-6, 0, "all-zero rows: U = log 1 = 0")


@pytest.mark.parametrize("impl", IMPLS)
def test_uniformity_t_zero_and_bad_arguments(impl):
    x = torch.randn(20, 5)
    assert_close(impl(x, 0.0), 0.0, 1e-7, 0, "t=0: every term is 1")
    with pytest.raises(ValueError, match="at least 2 rows"):
        impl(torch.randn(1, 5))
    with pytest.raises(ValueError, match="t >= 0"):
        impl(x, -1.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t", [30.0, 1000.0])
def test_uniformity_large_t(impl, t):
    """Large t takes the max-shift path. Where the fp32 reference is finite we match it; where it
    underflows to -inf (no near-duplicates) we return the true value, checked against fp64."""
    torch.manual_seed(2)
    x = torch.randn(41, 23)
    x[9] = x[4]  # the duplicate pair keeps the reference finite at any t
    ref = uniformity_ref(x, t)
    assert math.isfinite(ref.item())
    assert_close(impl(x, t), ref, 1e-4, 1e-5, f"t={t} with a duplicate pair")
    y = torch.randn(41, 23)
    got = impl(y, t)
    if t == 1000.0:
        assert uniformity_ref(y, t).item() == -math.inf, "the fp32 reference was expected to underflow here"
    assert math.isfinite(got.item()), f"t={t}: got {got.item()}"
    assert_close(got, uniformity_f64(F.normalize(y, dim=1), t), 1e-3, 1e-5, f"t={t}, no duplicates, vs fp64")


@pytest.mark.parametrize("impl", IMPLS)
def test_uniformity_deterministic(impl):
    x = torch.randn(70, 33)
    a, b = impl(x), impl(x)
    assert torch.equal(a, b), f"same input, different bits: {a.item()!r} vs {b.item()!r}"


# ------------------------------------------------------ uniformity: torch fallback, bigger shapes

@pytest.mark.parametrize("n,l,dtype,block,block_cols", [
    (3000, 100, torch.float32, 1024, 2048),  # the defaults
    (1823, 78, torch.float16, 256, 700),  # irregular: no tile edge lines up
])
def test_uniformity_fallback_matches_reference(n, l, dtype, block, block_cols):
    torch.manual_seed(3)
    x = (torch.randn(n, l) + 0.1).to(dtype)
    got = uniformity_torch(x, block=block, block_cols=block_cols)
    assert_close(got, uniformity_ref(x), 2e-5, 2e-6, f"fallback vs reference {n}x{l} {dtype}")


# ------------------------------------------- uniformity in row bands: what each rank computes

def _banded(log2sum, x, t, bands):
    return finish_uniformity(K.combine_log2([log2sum(x, t, b) for b in bands]), x.shape[0])


BAND_IMPLS = [  # (log2sum, whole, bands): irregular bands; the torch path's last one has no pairs
    pytest.param(lambda x, t, b: uniformity_log2sum_torch(x, t, b, block=16, block_cols=40), _fallback,
                 [(0, 13), (13, 64), (64, 100), (100, 101)], id="torch"),
    # whole 16-row blocks; (16, 64) has 3 blocks: the fold pads a 4th, rows 64-79, which are the
    # next band's and must be masked; (96, 101) pads one past n
    pytest.param(lambda x, t, b: uniformity_log2sum_triton(x.to(KDEV), t, b, **SMALL_U), _kernel,
                 [(0, 16), (16, 64), (64, 96), (96, 101)], id="triton", marks=needs_triton),
]


@pytest.mark.parametrize("log2sum, whole, bands", BAND_IMPLS)
@pytest.mark.parametrize("t", [2.0, 1000.0])
def test_uniformity_bands_add_up_to_the_whole(log2sum, whole, bands, t):
    """The bands' log2 sums, combined as a log-sum-exp, are U over all pairs. At t = 1000 every
    band's plain fp32 sum would underflow; combined from log2 pieces U stays finite and matches fp64."""
    torch.manual_seed(4)
    x = torch.randn(101, 29) + 0.2
    got = _banded(log2sum, x, t, bands)
    assert_close(got, whole(x, t), 1e-5, 1e-6, f"bands {bands} vs one pass, t={t}")
    assert_close(got, uniformity_f64(F.normalize(x, dim=1), t), 1e-3 if t > 20 else 2e-6, 1e-6, f"bands vs fp64, t={t}")
    assert log2sum(x, t, (32, 32)) == -math.inf  # an empty band (a rank with no rows) weighs nothing


def test_uniformity_band_arguments():
    x = torch.randn(40, 3)
    assert uniformity_log2sum_torch(x, 2.0, (39, 40)) == -math.inf  # the last row pairs with nobody
    with pytest.raises(ValueError, match="not a range"):
        uniformity_log2sum_torch(x, 2.0, (10, 41))
    with pytest.raises(ValueError, match="whole blocks of 16"):
        uniformity_log2sum_triton(x, 2.0, (8, 40), block=16)  # checked before triton is needed
    assert K.combine_log2([-math.inf, -math.inf]) == -math.inf
    assert math.isnan(K.combine_log2([1.0, float("nan")]))


@pytest.mark.parametrize("n, parts, unit", [(300, 2, 128), (1000, 3, 16), (100_000, 8, 128), (50, 4, 128)])
def test_row_bands_cover_every_row_with_equal_pairs(n, parts, unit):
    bands = K.row_bands(n, parts, unit)
    assert len(bands) == parts and bands[0][0] == 0 and bands[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:])) and all(r0 <= r1 for r0, r1 in bands)
    assert all(r0 % unit == 0 for r0, _ in bands)
    pairs = [r1 * (n - 1) - r1 * (r1 - 1) // 2 - (r0 * (n - 1) - r0 * (r0 - 1) // 2) for r0, r1 in bands]
    assert sum(pairs) == n * (n - 1) // 2
    # each cut is within unit/2 rows of its ideal place and a row holds < n pairs: a band is
    # within unit * n pairs of an equal share (100,000 rows on 8 ranks: +-2% of a share)
    assert max(abs(p - n * (n - 1) / 2 / parts) for p in pairs) <= unit * n, (bands, pairs)
    if n == 300:
        assert bands == [(0, 128), (128, 300)]  # the 2-rank test's uneven split (ideal cut: row 88)


def test_uniformity_sharded_without_a_group_is_uniformity():
    x = torch.randn(90, 11)
    assert torch.equal(K.uniformity_sharded(x, 2.0, None), K.uniformity(x, 2.0))


SHARDED_SCRIPT = """
import json, sys
import torch
from coopt_fast import distributed
from coopt_fast.kernels import row_bands, uniformity_log2sum, uniformity_sharded

w = distributed.world()
torch.manual_seed(5)
x = torch.randn(300, 37) + 0.2  # every rank builds the same rows
with distributed.process_group(torch.device("cpu"), w):
    g = distributed.coord_group()
    band = row_bands(300, w.size)[w.rank]
    out = {"band": band, "part": uniformity_log2sum(x, 2.0, band),
           "u": {t: float(uniformity_sharded(x, t, g)) for t in (2.0, 1000.0)}}
with open(f"{sys.argv[1]}/rank{w.rank}.json", "w") as f:
    json.dump(out, f)
"""


def test_uniformity_sharded_two_gloo_ranks_equal_one_process(tmp_path):
    """torchrun, 2 gloo ranks, 300 rows split unevenly (128 / 172 rows, ~equal pairs): every rank
    gets the same bits, equal to one process within 2e-6 + 1e-6 relative at t = 2 (fp32 tiles cut
    elsewhere, 1 thread vs 2, another fp64 combine order; measured: equal in fp32) and 1e-4 + 1e-6
    relative at t = 1000 (U = -742.8: each band's fp32 sum would underflow, so this checks the
    log-sum-exp across ranks)."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    (tmp_path / "s.py").write_text(SHARDED_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", COOPT_KERNELS="torch")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(tmp_path / "s.py"), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [tuple(o["band"]) for o in ranks] == [(0, 128), (128, 300)]
    assert ranks[0]["u"] == ranks[1]["u"], "ranks disagree"
    torch.manual_seed(5)
    x = torch.randn(300, 37) + 0.2
    parts = [uniformity_log2sum_torch(x, 2.0, tuple(o["band"])) for o in ranks]
    # each rank summed its own band (fp32 tile sums: 1 thread there, 2 here)
    assert [o["part"] for o in ranks] == pytest.approx(parts, rel=1e-6) and abs(parts[0] - parts[1]) > 0.1
    for t, tol in (("2.0", 2e-6), ("1000.0", 1e-4)):
        print(f"t={t}: 2 ranks {ranks[0]['u'][t]!r}, 1 process {K.uniformity(x, float(t)).item()!r}")
        assert_close(ranks[0]["u"][t], K.uniformity(x, float(t)), tol, 1e-6, f"2 ranks vs 1 process, t={t}")
        assert math.isfinite(ranks[0]["u"][t])


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-3)])
def test_tiled_baseline_is_right(dtype, atol):
    """bench_uniformity's competent baseline must compute U, or its timings compare nothing."""
    torch.manual_seed(6)
    x = (torch.randn(301, 40) + 0.2).to(dtype)
    assert_close(uniformity_tiled_ref(x, 2.0, block=64, block_cols=100), uniformity_ref(x), atol, 1e-5, f"tiled {dtype}")


# ---------------------------------------------------------------------------------- dispatcher

def test_dispatcher_auto_and_torch_use_the_fallback_on_cpu(monkeypatch):
    monkeypatch.delenv("COOPT_KERNELS", raising=False)
    monkeypatch.setattr(K._uniformity_mod, "uniformity_triton", lambda *a, **k: pytest.fail("triton on CPU"))
    x = torch.randn(50, 9)
    assert_close(K.uniformity(x), uniformity_ref(x), 1e-5, 1e-5, "auto on CPU")
    monkeypatch.setenv("COOPT_KERNELS", "torch")
    assert_close(K.uniformity(x), uniformity_ref(x), 1e-5, 1e-5, "COOPT_KERNELS=torch")


def test_dispatcher_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("COOPT_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.uniformity(torch.randn(10, 4))
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        K.align_apply([torch.randn(4, 3).half()], [torch.randn(3, 2)])


def test_dispatcher_triton_not_importable_raises(monkeypatch):
    monkeypatch.setenv("COOPT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(K._uniformity_mod, "triton", None)  # forget a triton imported earlier ...
    monkeypatch.setitem(sys.modules, "triton", None)  # ... and make the next import fail
    with pytest.raises(RuntimeError, match="triton is not importable"):
        K.uniformity(torch.randn(10, 4))
    monkeypatch.setenv("COOPT_KERNELS", "auto")  # auto falls back instead
    assert torch.isfinite(K.uniformity(torch.randn(10, 4)))


def test_dispatcher_bad_mode_and_public_names(monkeypatch):
    monkeypatch.setenv("COOPT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="COOPT_KERNELS='cuda'"):
        K.uniformity(torch.randn(10, 4))
    # the Triton modules (uniformity_triton, align_apply_triton) are named apart from the functions
    assert callable(K.uniformity) and callable(K.align_apply)


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # an import of triton now raises ImportError
        "import torch, coopt_fast.kernels as K\n"
        "x = torch.randn(30, 7)\n"
        "assert abs(K.uniformity(x).item() - K.uniformity_ref(x).item()) < 1e-5\n"
        "K.align_apply([x.half()], [torch.randn(7, 3)])\n"
    )
    env = {**os.environ, "COOPT_KERNELS": "auto"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, f"coopt_fast.kernels without triton failed:\n{r.stderr[-2000:]}"


# ------------------------------------------------------------------------- align_apply

def _groups(ms, ls, n, xdt, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(m, l, generator=g).to(xdt) for m, l in zip(ms, ls)]
    maps = [torch.randn(l, n, generator=g) / max(l, 1) ** 0.5 for l in ls]
    return xs, maps


def _check_align(got, ref, out_dtype, atol, rtol, what):
    ys, s, ss = (got[0], got[1].cpu(), got[2].cpu())
    yr, sr, ssr = ref
    assert len(ys) == len(yr) and s.shape == sr.shape and ss.shape == ssr.shape, f"{what}: {s.shape} vs {sr.shape}"
    assert s.dtype == ss.dtype == torch.float64, what
    for g, (y, r) in enumerate(zip(ys, yr)):
        y = y.cpu()
        assert y.dtype == out_dtype and y.shape == r.shape, f"{what} group {g}: {y.dtype} {tuple(y.shape)}"
        assert_close(y, r.cpu(), atol, rtol, f"{what} group {g} targets")
        # the statistics are those of the values actually returned, taken in the same pass;
        # fp32 partial sums: error relative to sum |y|, not to a sum that may cancel
        yd = y.double()
        assert_close(s[g], yd.sum(0), 1e-9 + 1e-6 * yd.abs().sum(0), 0, f"{what} group {g} sum vs its own targets")
        assert_close(ss[g], yd.square().sum(0), 1e-9, 1e-6, f"{what} group {g} sumsq vs its own targets")
    rows = max(max(y.shape[0] for y in ys), 1)
    assert_close(s, sr.cpu(), atol * rows, rtol, f"{what} sums vs reference")
    assert_close(ss, ssr.cpu(), 10 * atol * rows, 10 * rtol, f"{what} sumsqs vs reference")


ALIGN_DTYPES = [  # (features, targets, atol, rtol): fp16/bf16 output rounding (maps: hi + lo halves)
    (torch.float16, torch.float16, 4e-3, 2e-3),
    (torch.bfloat16, torch.bfloat16, 3e-2, 1.6e-2),
    (torch.float16, torch.float32, 2e-5, 2e-5),  # fp16 features are exact and the map is split: ~fp32
    (torch.float32, torch.float32, 1e-3, 1e-3),  # tf32x3 on GPU, exact fp32 under the interpreter
]


@pytest.mark.parametrize("xdt,odt,atol,rtol", ALIGN_DTYPES)
@pytest.mark.parametrize("ms,ls,n", [([37, 0, 50], [45, 20, 17], 33), ([5], [16], 16), ([70, 3], [1, 64], 40)])
def test_align_kernel_matches_reference(kdev, ms, ls, n, xdt, odt, atol, rtol):
    xs, maps = _groups(ms, ls, n, xdt)
    got = align_apply_triton([x.to(kdev) for x in xs], [m.to(kdev) for m in maps], odt, **SMALL_A)
    _check_align(got, align_apply_ref(xs, maps, odt), odt, atol, rtol, f"kernel {ms}x{ls}->{n} {xdt}->{odt}")


def test_align_kernel_weird_shape(kdev):
    xs, maps = _groups([1823, 300], [181, 97], 130, torch.float16, seed=9)
    got = align_apply_triton([x.to(kdev) for x in xs], [m.to(kdev) for m in maps], torch.float16,
                             block_m=64, block_n=64, block_k=32)
    _check_align(got, align_apply_ref(xs, maps), torch.float16, 4e-3, 2e-3, "kernel [1823, 300]x[181, 97]->130")


def test_align_kernel_strided_features_and_big_maps(kdev):
    # column-sliced views (row stride > l) go through the group table as they are
    wide = torch.randn(30, 50).half()
    xs = [wide[:, :21], torch.randn(19, 7).half()]
    maps = [torch.randn(21, 18), torch.randn(7, 18)]
    maps[1][0, 0] = 1e5  # beyond fp16: the map's scale brings it in range, no inf
    got = align_apply_triton([x.to(kdev) for x in xs], [m.to(kdev) for m in maps], torch.float32, **SMALL_A)
    _check_align(got, align_apply_ref(xs, maps, torch.float32), torch.float32, 1e-2, 2e-5, "strided / big map")


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e4])
def test_align_kernel_fitted_map_that_cancels(kdev, scale):
    """A map like a least-squares fit: large entries whose products cancel (sum_k |x_k m_kj| ~100x
    |y_j|). Rounding the map to fp16 once moved such targets by ~6% of a row's largest value (a
    256-dim convnet's fit); its hi + lo halves keep them within fp16 output rounding of the fp64
    product, at any overall scale (1e-6: below fp16's normal range; 1e4: near its top)."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(90, 64, generator=g) * 0.01 + 0.08).half()  # features share an offset ...
    base = torch.randn(64, 24, generator=g) * 30
    m = (base - base.mean(0)) * scale  # ... that the map's zero column sums cancel
    exact = x.double() @ m.double()
    assert ((x.double().abs() @ m.double().abs()) / exact.abs()).median() > 20, "the map does not cancel"
    # fp16 targets only at scale 1: at 1e-6 they are fp16 subnormals whatever the kernel does
    for odt, tol in ((torch.float32, 2e-5),) + (((torch.float16, 1.2e-3),) if scale == 1.0 else ()):
        y = align_apply_triton([x.to(kdev)], [m.to(kdev)], odt, **SMALL_A)[0][0].cpu().double()
        err = ((y - exact).abs() / exact.abs().amax(1, keepdim=True)).max().item()
        assert err < tol, f"scale {scale}, {odt}: error {err:.2e} of the row max (limit {tol})"


def test_align_dispatcher_and_determinism(kdev):
    xs, maps = _groups([45, 18], [30, 12], 20, torch.float16, seed=4)
    dxs, dmaps = [x.to(kdev) for x in xs], [m.to(kdev) for m in maps]
    a = K.align_apply(dxs, dmaps)
    b = K.align_apply(dxs, dmaps)
    for u, v in zip(a[0], b[0]):
        assert torch.equal(u, v), "targets differ between two identical runs"
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]), "statistics differ between two identical runs"
    _check_align(a, align_apply_ref(xs, maps), torch.float16, 4e-3, 2e-3, "dispatcher")


@pytest.mark.parametrize("xdt,odt,atol,rtol", [(torch.float16, torch.float16, 2e-3, 1e-3), (torch.float32, torch.bfloat16, 2e-2, 8e-3)])
def test_align_fallback_matches_reference(xdt, odt, atol, rtol):
    xs, maps = _groups([1000, 0, 777, 1], [64, 8, 130, 3], 96, xdt, seed=5)
    got = align_apply_torch(xs, maps, odt, block_rows=128)
    _check_align(got, align_apply_ref(xs, maps, odt), odt, atol, rtol, f"fallback {xdt}->{odt}")
    got64 = align_apply_torch(xs, maps, torch.float64)  # other output dtypes: the reference path
    assert got64[0][0].dtype == torch.float64


def test_align_bad_groups():
    for impl in (align_apply_torch, K.align_apply):
        with pytest.raises(ValueError, match="one map per group"):
            impl([], [])
        with pytest.raises(ValueError, match="do not chain"):
            impl([torch.randn(4, 3).half()], [torch.randn(5, 2)])


# ------------------------------------------------------- sm_90 build, checked without a GPU

SM90_CHECK = r"""
import inspect, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import coopt_fast.kernels as K

def ptx(fn, types, const, div16):  # types: non-i32 runtime args; div16: what the JIT infers at launch
    params = inspect.signature(fn).parameters
    sig = {p: "constexpr" if "constexpr" in str(v.annotation) else types.get(p, "i32") for p, v in params.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p in div16}
    src = ASTSource(fn=K._uniformity_mod.jit(fn), signature=sig, constexprs=const, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
    return k.asm["ptx"], k.metadata.shared

f32 = "*fp32"
u = ptx(K._uniformity_mod._uniformity_kernel,
        {"x_ptr": "*bf16", "rowc_ptr": f32, "part_s_ptr": f32, "part_m_ptr": f32, "coef": "fp32"},
        {"BLOCK": 128, "BLOCK_K": 64, "GROUP": 8, "SHIFT": False, "DOT_F32": False, "PRECISION": "tf32"},
        ("x_ptr", "rowc_ptr", "part_s_ptr", "part_m_ptr", "l_pad", "stride_x"))
a = ptx(K._align_mod._align_kernel,
        {"tab_ptr": "*i64", "tiles_ptr": "*i64", "w_ptr": "*fp16", "wlo_ptr": "*fp16", "inv_ptr": f32,
         "y_ptr": "*fp16", "psum_ptr": f32, "psq_ptr": f32},
        {"NTAB": 6, "X_DTYPE": tl.float16, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "DOT_F32": False,
         "PRECISION": "tf32", "ALIGN": 8, "SPLIT": True},
        ("tab_ptr", "tiles_ptr", "w_ptr", "wlo_ptr", "inv_ptr", "y_ptr", "psum_ptr", "psq_ptr", "n", "stride_w",
         "stride_y"))
for name, (code, shared) in (("uniformity", u), ("align_apply", a)):
    assert "wgmma.mma_async" in code, name + ": no Hopper tensor-core MMA"
    assert "cp.async.cg.shared.global" in code, name + ": no 16-byte async copies"
    assert "ld.global.b16" not in code, name + ": 2-byte global loads (lost alignment facts)"
    assert shared >= 3 * 32768, name + ": the 3-stage pipeline is gone (shared %d)" % shared
    print(name, "shared memory", shared)
print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernels_build_for_sm90_without_a_gpu():
    """Compile both kernels for sm_90 with triton's own ptxas (no GPU needed) and check the PTX for
    what their speed depends on: wgmma, 16-byte cp.async loads in a 3-stage pipeline. Guards the
    trap of values read from the group table losing their alignment facts (2-byte loads).
    In a subprocess: this session's triton is in interpreter mode."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SM90_CHECK], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0 and ("ImportError" in r.stderr or "ptxas" in r.stderr.lower()):
        pytest.skip(f"triton's sm_90 toolchain is not usable here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0 and "ok" in r.stdout, f"sm_90 build check failed:\n{r.stderr[-3000:]}"


# ------------------------------------------------------------------ GPU (compiled, bigger shapes)

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("t", [2.0, 1000.0])
@pytest.mark.parametrize("n,l", [(1823, 781), (4096, 512)])
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 3e-3), (torch.float16, 3e-4), (torch.float32, 2e-5)])
def test_gpu_uniformity(monkeypatch, n, l, dtype, atol, t):
    monkeypatch.setenv("COOPT_KERNELS", "triton")
    torch.manual_seed(6)
    x = torch.randn(n, l, device="cuda")
    x[7] = x[3]
    xd = x.to(dtype)
    got = K.uniformity(xd, t)
    assert torch.equal(got, K.uniformity(xd, t)), "GPU run not bitwise deterministic"
    want = uniformity_f64(F.normalize(xd.float(), dim=1).to(dtype), t)
    tol = atol if t == 2.0 else 100 * atol  # the Gram form's d^2 error (~eps(dtype)) is amplified by t
    assert_close(got, want, tol, 1e-5, f"GPU {n}x{l} {dtype} t={t}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("odt,atol,rtol", [(torch.float16, 8e-3, 2e-3), (torch.bfloat16, 6e-2, 1.6e-2)])
def test_gpu_align(monkeypatch, odt, atol, rtol):
    monkeypatch.setenv("COOPT_KERNELS", "triton")
    xs, maps = _groups([70001, 0, 12345, 999], [512, 64, 2048, 300], 512, torch.float16, seed=7)
    xs, maps = [x.cuda() for x in xs], [m.cuda() for m in maps]
    got = K.align_apply(xs, maps, odt)
    assert all(torch.equal(u, v) for u, v in zip(got[0], K.align_apply(xs, maps, odt)[0]))
    _check_align(got, align_apply_ref(xs, maps, odt), odt, atol, rtol, "GPU align")
