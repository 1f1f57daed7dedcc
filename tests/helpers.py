"""Helpers more than one test file uses: fake data on disk (a Fashion-MNIST IDX folder, image folders with
good, unreadable and blank files), the killed and resumed runs of the resume tests, small tensors with known
structure. Fixtures live in ``tests/conftest.py``; the OpenCV oracle in ``tests/oracle.py``."""
from __future__ import annotations

import gzip
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from PIL import Image

import siftguide.train as train_py


# ---------------------------------------------------------------------------------------------- data on disk
def write_idx(folder, n_train=40, n_test=12):
    """A Fashion-MNIST IDX folder of ``n_train`` / ``n_test`` noise images, labels ``i % 10``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write((2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + imgs.tobytes())
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + (np.arange(n) % 10).astype(np.uint8).tobytes())


def write_folder(root: Path, n_per_class: int = 6, size: int = 56, seed: int = 0) -> None:
    """``root/train/<a|b>/*.png`` and ``root/val/<a|b>/*.png``: bright blobs on dark noise (SIFT finds them)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                img = rng.uniform(0, 40, (size, size))
                for _ in range(3):
                    cx, cy, s = rng.uniform(10, size - 10), rng.uniform(10, size - 10), rng.uniform(2, 4)
                    img += 200 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
                Image.fromarray(img.clip(0, 255).astype(np.uint8), "L").save(root / split / c / f"{i}.png")


# ---------------------------------------------------------------------------------------------- image folders, bad input
S = 32  # decoded image side in these tests


def good_png(path: Path, seed: int, size=(40, 48)):
    """A textured grey PNG with a bright square (SIFT finds keypoints on it)."""
    g = np.random.default_rng(seed)
    a = (g.random(size) * 60).astype(np.uint8)
    a[8:24, 8 + seed % 8 : 24 + seed % 8] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def bad_files(d: Path) -> list[Path]:
    """A zero-byte file, a truncated PNG and a text file named .png, in ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "empty.png").write_bytes(b"")
    good_png(d / "whole.png", 99)
    data = (d / "whole.png").read_bytes()
    (d / "whole.png").unlink()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "notes.png").write_text("not an image\n")
    return [d / "empty.png", d / "truncated.png", d / "notes.png"]


def bad_files_of(root: Path) -> list[Path]:
    """The files ``image_folder(root, bad=True)`` made unreadable."""
    return [root / "train" / "c0" / n for n in ("empty.png", "truncated.png", "notes.png")]


def image_folder(root: Path, n: int = 8, bad: bool = False, val_bad: bool = False, blank: bool = False) -> Path:
    """``root/{train,val}/{c0,c1}`` with ``n`` images per training class (4 per val class)."""
    for split, k in (("train", n), ("val", 4)):
        for c in (0, 1):
            for i in range(k):
                p = root / split / f"c{c}" / f"{i}.png"
                if blank:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("L", (40, 40), 128).save(p)
                else:
                    good_png(p, 10 * c + i)
    if bad:
        bad_files(root / "train" / "c0")
    if val_bad:
        (root / "val" / "c1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def run_metrics(cfg) -> pd.DataFrame:
    return pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")


def folder_cfg(tiny_cfg, root: Path, extra=(), name="folder"):
    return tiny_cfg(["data=image_folder", f"data.root={root}", "data.num_workers=0", "data.batch_size=4",
                     "num_classes=2", "model.in_chans=1", "callbacks.knn.bank_size=8", "callbacks.knn.query_size=8",
                     "trainer.max_steps=3", *extra], name=name, fashion_mnist=False)


# ---------------------------------------------------------------------------------------------- killed and resumed runs
COMPARED = ["step", "train/lr/decay", "train/loss", "train/task_loss", "val/acc", "val/loss"]


class Kill(L.Callback):
    """Stands in for a killed process: the run dies after optimizer step ``k`` (mid-epoch, between checkpoints)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.k:
            raise RuntimeError("killed")


def killed_at(monkeypatch, k: int):
    build = train_py.build

    def with_kill(cfg, ckpt=None):
        module, data, trainer = build(cfg, ckpt)
        trainer.callbacks.append(Kill(k))
        return module, data, trainer

    monkeypatch.setattr(train_py, "build", with_kill)


def logged_rows(run_dir: Path) -> pd.DataFrame:
    m = pd.read_csv(run_dir / "metrics.csv")
    return m[[c for c in COMPARED if c in m.columns]]


def keep_trainer(monkeypatch, trainers: list):
    build = train_py.build

    def keep(cfg, ckpt=None):
        module, data, trainer = build(cfg, ckpt)
        trainers.append(trainer)
        return module, data, trainer

    monkeypatch.setattr(train_py, "build", keep)


CHEAP = ["callbacks.knn=null", "callbacks.attention_divergence.batches=0", "data.val_size=64"]


# ---------------------------------------------------------------------------------------------- small stand-ins
class TrainerStub:
    """A trainer's rank and world size: all the code under test reads of it."""

    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size = rank, world


def corner_relevance(b=4, grid=4, rich=(0, 1, 4, 5)):
    """All relevance on the top-left 2x2 patches."""
    r = torch.zeros(b, grid * grid)
    r[:, list(rich)] = 1.0 / len(rich)
    return r.view(b, grid, grid)


def close(a, b, tol=1e-5) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return bool(torch.allclose(a, b, atol=tol, rtol=tol, equal_nan=True))
