"""Shared fixtures (lightning-hydra-template's ``tests/conftest.py`` style): composed Hydra configs shrunk for CPU
tests, one tiny timm ViT factory, tiny runs trained once per pytest session and shared read-only, synthetic images.

The tests mirror the package: the tests of ``siftguide/X/y.py`` live in ``tests/X/test_y.py`` (``tests/test_y.py``
for top-level modules); runs of the commands in subprocesses live in ``tests/e2e/`` (marked ``e2e``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "siftguide" / "conf")

# a few optimizer steps of a 2-block ViT on 32 px images: the real pipeline, small (`++`: also shrinks a model config
# that leaves depth and width to timm, e.g. vit_small_patch16_224)
TINY_DATA = ["data.train_subset=256", "data.val_size=128", "data.batch_size=32"]
TINY = [
    "++model.depth=2", "++model.embed_dim=64", "++model.num_heads=2", "model.img_size=32", "model.patch_size=8",
    *TINY_DATA,
    "trainer.max_steps=4", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "module.warmup_steps=1", "logger=csv",
]
# the shared tiny checkpoints: a supervised one (2 steps, guided, read by analyze, prompt and export) and an MAE one
# (4 steps with the kNN probe, read by the training test of MAE and by export)
SUPERVISED_RUN = ("trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.knn=null",
                  "data.train_subset=64", "data.val_size=32", "data.batch_size=16")
MAE_RUN = ("objective=mae", "objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2",
           "callbacks.knn.bank_size=64", "callbacks.knn.query_size=64")


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


def _tiny_vit(model_name: str = "vit_tiny_patch16_224", seed: int | None = 0, **kw) -> torch.nn.Module:
    import timm

    if seed is not None:
        torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, in_chans=1, num_classes=3)
    return timm.create_model(model_name, pretrained=False, **{**args, **kw})


@pytest.fixture(scope="session")
def tiny_vit():
    """``tiny_vit(**kw)``: a tiny timm ViT (32 px, 8 px patches, 2 blocks of width 32 with 2 heads, 1 channel, 3
    classes), initialised after ``torch.manual_seed(seed)`` (``seed=None``: no seeding); ``kw`` overrides any
    ``timm.create_model`` argument (``model_name`` the architecture)."""
    return _tiny_vit


class TrainedRun(NamedTuple):
    """A tiny run trained by :func:`tiny_run`: its config, run directory and the metrics ``train`` returned."""

    cfg: object
    dir: Path
    final: dict

    @property
    def ckpt(self) -> Path:
        return self.dir / "checkpoints" / "last.ckpt"

    def metrics(self) -> pd.DataFrame:
        return pd.read_csv(self.dir / "metrics.csv")


def _manifest(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``tiny_run(overrides)``: the tiny config with these overrides, trained once per pytest session and shared by
    every test that asks for the same overrides; a :class:`TrainedRun`. Shared read-only: a test that writes into a
    run directory (a resume, a damaged checkpoint) copies it first; the session's end checks that none changed."""
    from siftguide.train import train

    runs: dict[tuple, tuple[TrainedRun, dict]] = {}

    def get(overrides=()) -> TrainedRun:
        key = tuple(overrides)
        if key not in runs:
            out = tmp_path_factory.mktemp("tiny_run") / "run"
            cfg = compose_cfg(out, list(key))
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("WANDB_MODE", "offline")
                mp.setenv("WANDB_SILENT", "true")
                torch.set_num_threads(min(2, os.cpu_count() or 1))
                final = train(cfg)
            runs[key] = TrainedRun(cfg, out, final), _manifest(out)
        return runs[key][0]

    yield get
    changed = [f"{run.dir}: {sorted(set(_manifest(run.dir).items()) ^ set(files.items()))[:3]}"
               for run, files in runs.values() if _manifest(run.dir) != files]
    assert not changed, f"a test wrote into a shared run directory (copy it first): {changed}"


@pytest.fixture(scope="session")
def supervised_run(tiny_run) -> TrainedRun:
    """The shared supervised tiny checkpoint (2 optimizer steps, attention guidance, no kNN)."""
    return tiny_run(SUPERVISED_RUN)


@pytest.fixture(scope="session")
def mae_run(tiny_run) -> TrainedRun:
    """The shared MAE tiny checkpoint (4 optimizer steps, attention guidance, kNN probe, a 1-block decoder)."""
    return tiny_run(MAE_RUN)


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
