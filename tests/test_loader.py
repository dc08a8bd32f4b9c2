"""StoreLoader: memmap == h5py, every row once per epoch in the seeded order, refusals."""
import h5py
import numpy as np
import pytest
import torch

from coopt_fast.errors import CooptError
from coopt_fast.loader import StoreLoader, epoch_permutation, memmap_dataset

from .conftest import realign, requires_fmnist
from .conftest_student import fmnist, make_merged, merged_run  # noqa: F401  (fixture)

pytestmark = requires_fmnist
FIELDS = ("images", "targets", "index", "participant")


def test_memmap_equals_h5py_read(merged_run):
    path = merged_run / "merged.h5"
    with h5py.File(path, "r") as f:
        for name in FIELDS:
            mm = memmap_dataset(path, f[name])
            ref = f[name][()]
            assert mm.dtype == ref.dtype and mm.shape == ref.shape
            assert np.array_equal(mm, ref), name
            assert isinstance(mm, np.memmap)  # zero-copy: a view on the file, not a read


@pytest.mark.parametrize("batch_size, drop_last", [(64, False), (37, False), (37, True), (1000, False)])
def test_every_row_once_per_epoch_in_seeded_order(merged_run, batch_size, drop_last):
    loader = StoreLoader(merged_run, batch_size, fields=FIELDS, seed=5, drop_last=drop_last)
    n = loader.n
    assert len(loader) == (n // batch_size if drop_last else -(-n // batch_size))
    with h5py.File(merged_run / "merged.h5", "r") as f:
        ref = {k: f[k][()] for k in FIELDS}
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        rows = np.concatenate([b["index"].numpy() for b in batches])  # index == row here (0..n-1)
        order = epoch_permutation(n, 5, epoch).numpy()
        kept = len(loader) * batch_size if drop_last else n
        assert np.array_equal(rows, order[:kept]), f"epoch {epoch}: not the seeded permutation"
        if not drop_last:
            assert np.array_equal(np.sort(rows), np.arange(n)), "a row missing or repeated"
        for b in batches:  # each field is the store's row for that index, dtype kept
            r = b["index"].numpy()
            for k in FIELDS:
                assert b[k].dtype == torch.from_numpy(ref[k][:1]).dtype
                assert np.array_equal(b[k].numpy(), ref[k][r]), k
        orders.append(rows)
    assert not np.array_equal(orders[0], orders[1]), "epochs must differ"
    loader.set_epoch(1)
    assert np.array_equal(np.concatenate([b["index"].numpy() for b in loader]), orders[1]), "not reproducible"


def test_seed_changes_order_and_no_shuffle_is_identity(merged_run):
    a = np.concatenate([b["index"].numpy() for b in StoreLoader(merged_run, 50, fields=("index",), seed=0)])
    b = np.concatenate([b["index"].numpy() for b in StoreLoader(merged_run, 50, fields=("index",), seed=1)])
    c = np.concatenate([b["index"].numpy() for b in StoreLoader(merged_run, 50, fields=("index",), shuffle=False)])
    assert not np.array_equal(a, b)
    assert np.array_equal(c, np.arange(len(c)))


def test_mid_epoch_start_skips_batches(merged_run):
    loader = StoreLoader(merged_run, 50, fields=("index",), seed=3)
    loader.set_epoch(2)
    full = [b["index"] for b in loader]
    loader.set_epoch(2, start_batch=3)
    rest = [b["index"] for b in loader]
    assert len(rest) == len(full) - 3 and all(torch.equal(x, y) for x, y in zip(full[3:], rest))


def test_images_read_from_dataset_when_not_stored(tmp_path):
    index = np.arange(5, 905, 3)  # a strided subset: rows map to global samples by `index`
    path = make_merged(tmp_path / "merged.h5", images=False, index=index)
    loader = StoreLoader(path, 64, fields=("images", "index"), seed=0)
    assert loader.image_shape == (28, 28, 1)
    for b in loader:
        assert np.array_equal(b["images"].numpy(), fmnist().images[b["index"].numpy()])


def test_folder_images_of_mixed_size_are_resized(tmp_path):
    from torchvision.io import write_png

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            side = 10 + 4 * i
            write_png(torch.full((3 if c == "a" else 1, side, side + 2), 40 * i, dtype=torch.uint8), str(root / c / f"{i}.png"))
    with h5py.File(tmp_path / "merged.h5", "w") as f:
        f.attrs.update(format_version=1, complete=True, participants='["p"]', dataset=f"folder:{root}", limit=-1,
                       dim=4, target_dtype="float16", fingerprint='{"n": 6}', inputs="{}")
        f.create_dataset("targets", data=np.ones((6, 4), np.float16))
        f.create_dataset("index", data=np.arange(6))
        f.create_dataset("participant", data=np.zeros(6, np.int16))
        f.create_dataset("target_mean", data=np.ones(4, np.float32))
        f.create_dataset("target_std", data=np.zeros(4, np.float32))
    loader = StoreLoader(tmp_path / "merged.h5", 4, fields=("images", "targets"), image_size=8)
    assert loader.image_shape is None
    shapes = [tuple(b["images"].shape) for b in loader]
    assert shapes == [(4, 8, 8, 3), (2, 8, 8, 3)]


def test_refuses_chunked_store_with_clear_error(tmp_path):
    path = make_merged(tmp_path / "merged.h5", n=100, chunked=True)
    with pytest.raises(CooptError, match=r"targets: dataset is chunked and gzip-compressed"):
        StoreLoader(path, 10, fields=("targets",))


def test_refuses_missing_and_incomplete_store(tmp_path):
    with pytest.raises(CooptError, match="merged store not found"):
        StoreLoader(tmp_path, 10)
    path = make_merged(tmp_path / "merged.h5", n=20)
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(CooptError, match="incomplete"):
        StoreLoader(path, 10)
    with pytest.raises(CooptError, match="unknown loader field"):
        make_merged(path, n=20)
        StoreLoader(path, 10, fields=("labels",))


# ---- placement: host, resident, staged (CUDA) ---------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def epoch_batches(loader, epoch=1, start=0):
    loader.set_epoch(epoch, start)
    return [{k: v.cpu() for k, v in b.items()} for b in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("batch_size, start", [(37, 0), (1000, 0), (64, 5)])
def test_resident_store_gives_the_host_batches(merged_run, batch_size, start):
    host = StoreLoader(merged_run, batch_size, fields=FIELDS, seed=2)
    res = StoreLoader(merged_run, batch_size, fields=FIELDS, seed=2, resident=True)
    assert not host.resident and res.resident and set(res.on_device) == set(FIELDS)
    assert res.store_bytes == sum(res.on_device[k].numel() * res.on_device[k].element_size() for k in FIELDS)
    assert_same_batches(epoch_batches(res, 1, start), epoch_batches(host, 1, start))


@pytest.mark.parametrize("rows", [np.array([7, 0, 3]), np.arange(199, -1, -2), np.array([5])])
def test_gather_into_reused_buffers_equals_fancy_indexing(merged_run, rows):
    from coopt_fast.loader import gather_into, staging_buffers

    loader = StoreLoader(merged_run, 100, fields=FIELDS)
    bufs = staging_buffers(loader.arrays, 100, pin=False)
    gather_into(bufs, loader.arrays, np.arange(100))  # dirty the buffers first: reuse must overwrite
    got = gather_into(bufs, loader.arrays, rows)
    for k, arr in loader.arrays.items():
        assert got[k].shape[0] == len(rows) and got[k].data_ptr() == bufs[k].data_ptr()  # no temporary
        assert np.array_equal(got[k].numpy(), arr[rows]), k


def test_resident_default_follows_free_gpu_memory(merged_run, monkeypatch):
    loader = StoreLoader(merged_run, 10, fields=("targets",))
    need = loader.store_bytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(1.9 * need), 10 * need))
    loader.device = torch.device("cuda")
    assert not loader._choose_resident(None)  # under half the free memory only
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (2 * need, 10 * need))
    assert loader._choose_resident(None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (need - 1, 10 * need))
    with pytest.raises(CooptError, match="resident store needs .* GiB free; use resident=False"):
        loader._choose_resident(True)
    assert not StoreLoader(merged_run, 10, fields=("targets",)).resident  # CPU: the page cache is enough


@needs_cuda
@pytest.mark.parametrize("resident", [False, True])
@pytest.mark.parametrize("batch_size, start", [(37, 0), (64, 3)])
def test_cuda_batches_equal_host_batches(merged_run, resident, batch_size, start):
    host = StoreLoader(merged_run, batch_size, fields=FIELDS, seed=4)
    dev = StoreLoader(merged_run, batch_size, fields=FIELDS, seed=4, device="cuda", resident=resident)
    dev.set_epoch(1, start)
    got = []
    for b in dev:
        assert all(t.is_cuda for t in b.values())
        torch.cuda._sleep(2_000_000)  # a slow step: the next copy must not overwrite a live buffer
        got.append({k: v.cpu() for k, v in b.items()})
    assert_same_batches(got, epoch_batches(host, 1, start))


@needs_cuda
@pytest.mark.parametrize("name", ["int8", "int8-dim", "bfloat16"])
def test_cuda_decodes_compressed_targets_like_cpu(tmp_path, small_run, name):
    run = tmp_path / "run"
    realign(small_run, run, name)
    host = epoch_batches(StoreLoader(run, 300, fields=("targets", "index"), seed=1))
    for resident in (False, True):
        dev = StoreLoader(run, 300, fields=("targets", "index"), seed=1, device="cuda", resident=resident)
        assert_same_batches(epoch_batches(dev), host)
