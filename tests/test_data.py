import gzip

import numpy as np
import pytest
import torch

from siftguide.data import DeviceTransform, FashionMNISTDataModule, find_fashion_mnist, load_fashion_mnist


def write_idx(folder, n_train=40, n_test=12):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write((2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + imgs.tobytes())
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + (np.arange(n) % 10).astype(np.uint8).tobytes())


def test_reads_idx_files_and_splits(tmp_path, monkeypatch):
    monkeypatch.setattr("siftguide.data.DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
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
    monkeypatch.setattr("siftguide.data.DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(None, str(tmp_path / "cache"), download=False)


def test_corrupt_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr("siftguide.data.DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
    write_idx(tmp_path / "fm")
    with gzip.open(tmp_path / "fm" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00" * 100)
    with pytest.raises(RuntimeError, match="not a valid Fashion-MNIST IDX"):
        load_fashion_mnist(str(tmp_path / "fm"), cache_dir=str(tmp_path), download=False)


def test_val_size_must_leave_training_images(tmp_path, monkeypatch):
    monkeypatch.setattr("siftguide.data.DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
    write_idx(tmp_path / "fm")
    dm = FashionMNISTDataModule(root=str(tmp_path / "fm"), cache_dir=str(tmp_path), val_size=40, download=False)
    with pytest.raises(ValueError, match="no training images"):
        dm.setup()


def test_device_transform_resizes_and_augments():
    tf = DeviceTransform(64)
    x8 = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    a = tf(x8, train=False)
    assert a.shape == (4, 1, 64, 64) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    torch.manual_seed(0)
    b = tf(x8, train=True)
    assert b.shape == (4, 1, 64, 64) and not torch.equal(a, b)
    torch.testing.assert_close(tf(x8, train=False), a)  # evaluation is deterministic
    n = tf.normalize(a)
    assert n.shape == a.shape
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        tf(torch.rand(28, 28), train=False)


def test_take_reads_protocol_datasets_in_memory_and_by_item(tmp_path):
    """siftguide.data.protocol.take: one way to read images outside the loaders (kNN bank, monitor, analysis)."""
    from siftguide.data.protocol import take

    class InMemory:
        images = torch.arange(5 * 4).view(5, 1, 2, 2).to(torch.uint8)
        labels = torch.tensor([0, 1, 2, 3, 4])

        def __getitem__(self, i):  # never called: in-memory datasets are sliced
            raise AssertionError("item access on an in-memory dataset")

    x, y, kept = take(InMemory(), [4, 1])
    assert torch.equal(x, InMemory.images[[4, 1]]) and y.tolist() == [4, 1] and kept == [4, 1]

    class Files:  # items as image folders give them; item 1 an unreadable file
        def __getitem__(self, i):
            return {"image": torch.full((1, 2, 2), i, dtype=torch.uint8), "label": torch.tensor(i % 2), "index": i,
                    "valid": i != 1}

    x, y, kept = take(Files(), range(3))
    assert kept == [0, 2] and x[:, 0, 0, 0].tolist() == [0, 2] and y.tolist() == [0, 0] and y.dtype == torch.long
    assert take(Files(), [1])[2] == []  # nothing readable: empty, the caller says what to do
