"""FashionMNISTDataModule: IDX files read and split, clear errors for missing or corrupt data, the fixed validation
subset."""
import gzip

import pytest
import torch

from siftguide.data import FashionMNISTDataModule, find_fashion_mnist, load_fashion_mnist
from tests.helpers import write_idx


def test_reads_idx_files_and_splits(tmp_path, monkeypatch):
    monkeypatch.setattr("siftguide.data.formats.DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
    write_idx(tmp_path / "fm")
    x, y = load_fashion_mnist(str(tmp_path / "fm"), cache_dir=str(tmp_path), download=False)
    assert x.shape == (40, 1, 28, 28) and x.dtype == torch.uint8 and y.tolist()[:3] == [0, 1, 2]
    dm = FashionMNISTDataModule(root=str(tmp_path / "fm"), cache_dir=str(tmp_path), batch_size=8, val_size=10,
                                download=False)
    dm.setup()
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10 and len(dm.test_set) == 12
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 1, 28, 28)
    # the split is fixed by split_seed, not by the global seed
    torch.manual_seed(123)
    dm2 = FashionMNISTDataModule(root=str(tmp_path / "fm"), cache_dir=str(tmp_path), val_size=10, download=False)
    dm2.setup()
    assert torch.equal(dm.val_set.images, dm2.val_set.images)


def test_missing_data_error_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("siftguide.data.formats.DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(None, str(tmp_path / "cache"), download=False)


def test_corrupt_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr("siftguide.data.formats.DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
    write_idx(tmp_path / "fm")
    with gzip.open(tmp_path / "fm" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00" * 100)
    with pytest.raises(RuntimeError, match="not a valid Fashion-MNIST IDX"):
        load_fashion_mnist(str(tmp_path / "fm"), cache_dir=str(tmp_path), download=False)


def test_val_size_must_leave_training_images(tmp_path, monkeypatch):
    monkeypatch.setattr("siftguide.data.formats.DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
    write_idx(tmp_path / "fm")
    dm = FashionMNISTDataModule(root=str(tmp_path / "fm"), cache_dir=str(tmp_path), val_size=40, download=False)
    with pytest.raises(ValueError, match="no training images"):
        dm.setup()


def test_val_subset_validates_on_a_fixed_prefix(tmp_path, monkeypatch):
    monkeypatch.setattr("siftguide.data.formats.DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
    write_idx(tmp_path / "fm")
    kw = dict(root=str(tmp_path / "fm"), cache_dir=str(tmp_path), batch_size=4, val_size=10, download=False)
    dm = FashionMNISTDataModule(val_subset=6, **kw)
    dm.setup()
    idx = [i for b in dm.val_dataloader() for i in b["index"].tolist()]
    assert idx == list(range(6)) and len(dm.val_set) == 10  # the split itself is unchanged
    full = FashionMNISTDataModule(**kw)
    full.setup()
    assert len(full.train_set) == len(dm.train_set)  # training data identical to a run without the subset
    with pytest.raises(ValueError, match="val_subset"):
        FashionMNISTDataModule(val_subset=11, **kw)
