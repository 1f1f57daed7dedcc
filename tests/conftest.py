"""Shared fixtures: composed Hydra configs shrunk for CPU tests, tiny timm ViTs, synthetic images."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "siftguide" / "conf")

# a few optimizer steps of a 2-block ViT on 32 px images: the real pipeline, small
TINY_DATA = ["data.train_subset=256", "data.val_size=128", "data.batch_size=32"]
TINY = [
    "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.img_size=32", "model.patch_size=8",
    *TINY_DATA,
    "trainer.max_steps=4", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "module.warmup_steps=1", "logger=csv",
]


def compose_cfg(output_dir: Path, overrides: list[str] = (), fashion_mnist: bool = True):
    """The real config, shrunk; ``fashion_mnist=False`` leaves out the Fashion-MNIST-only data overrides."""
    tiny = TINY if fashion_mnist else [o for o in TINY if o not in TINY_DATA]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        # keypoint caches of each test's own (tmp) directory: tests never write into the checkout's data/
        cfg = compose("train.yaml", overrides=[*tiny, f"paths.output_dir={output_dir}",
                                               f"relevance.cache_dir={Path(output_dir).parent / 'keypoint_cache'}",
                                               *overrides])
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda overrides=(), name="run", fashion_mnist=True: compose_cfg(tmp_path / name, list(overrides),
                                                                            fashion_mnist)


@pytest.fixture
def usage_error(capsys):
    """``err = usage_error(main)``; ``err(argv)`` asserts that the CLI ``main(argv)`` exits 2 and returns its stderr."""
    def wrap(main):
        def err(argv) -> str:
            with pytest.raises(SystemExit) as e:
                main(argv)
            assert e.value.code == 2
            return capsys.readouterr().err
        return err
    return wrap


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def blob_image(size: int = 64, center=(20.0, 40.0), sigma: float = 3.0, batch: int = 1) -> torch.Tensor:
    """Bright Gaussian blob on a dark background: ``(B, 1, size, size)`` in [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    g = torch.exp(-((xx - center[0]) ** 2 + (yy - center[1]) ** 2) / (2 * sigma**2))
    return (0.1 + 0.8 * g).expand(batch, 1, size, size).clone()
