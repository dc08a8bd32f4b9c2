"""StoreLoader: memmap == h5py, every row once per epoch in the seeded order, refusals."""
import h5py
import numpy as np
import pytest
import torch

from coopt_fast.errors import CooptError
from coopt_fast.loader import StoreLoader, epoch_permutation, memmap_dataset

from .conftest import requires_fmnist
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
        f.attrs.update(format_version=1, complete=True, participants='["p"]', dataset=f"folder:{root}", limit=-1)
        f.create_dataset("targets", data=np.ones((6, 4), np.float16))
        f.create_dataset("index", data=np.arange(6))
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
