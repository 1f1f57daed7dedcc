"""Every option of every config group composes and instantiates: the data module, the LightningModule (model,
objective, transform, relevance stage, guidance modes, optimizer, module settings), the callbacks, the loggers and
the trainer, as ``siftguide.train.build`` makes them, without training. The options are read from the package's
``conf/`` folders, so a new ``.yaml`` is tested the day it is added."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from siftguide.callbacks import instantiate_callbacks
from siftguide.train import build_module
from tests.conftest import CONFIGS, compose_cfg
from tests.helpers import write_folder

CONF = Path(CONFIGS)
# modes of another objective (a clear error with objective=supervised, tested in tests/guidance): what they need
NEEDS = {("guidance", "masking"): ["objective=mae"], ("guidance", "recon_weight"): ["objective=mae"],
         ("guidance", "attmask"): ["experiment=ibot_fm"]}
FOLDER_OPTIONS = {("data", "image_folder"), ("experiment", "vit_s16_imagefolder"),
                  ("experiment", "mae_vit_s16_imagefolder")}


def options() -> list[tuple[str, str]]:
    return [(g.name, f.stem) for g in sorted(CONF.iterdir()) if g.is_dir() and not g.name.startswith("_")
            for f in sorted(g.glob("*.yaml"))]


def test_every_group_has_options():
    groups = {g for g, _ in options()}
    assert {"data", "model", "guidance", "objective", "relevance", "trainer", "callbacks", "module",
            "experiment"} <= groups
    assert len(options()) >= 30


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    write_folder(root, n_per_class=2, size=40)
    return root


@pytest.mark.parametrize("group,option", options(), ids=[f"{g}={o}" for g, o in options()])
def test_option_composes_and_instantiates(group, option, folder, tmp_path):
    overrides = [f"{group}={option}"]
    on_folder = (group, option) in FOLDER_OPTIONS
    if on_folder:  # the image-folder presets: a 2-class folder, grey, tiny
        overrides += [f"data.root={folder}", "data.num_workers=0", "num_classes=2", "model.in_chans=1",
                      "data.batch_size=4", "transform=grey"]
    overrides += NEEDS.get((group, option), [])
    if group in ("trainer", "experiment") and not torch.cuda.is_available():
        overrides.append("trainer.accelerator=cpu")  # the GPU presets, built on this CPU
    cfg = compose_cfg(tmp_path / "run", overrides, fashion_mnist=not on_folder)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # no missing or unresolvable value
    assert resolved["paths"]["output_dir"] == str(tmp_path / "run")

    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, L.LightningDataModule)
    module = build_module(cfg)
    assert isinstance(module, L.LightningModule)
    assert len(module.guidance.modes) == len([k for k in cfg.guidance if k != "weight"])
    callbacks = instantiate_callbacks(cfg.callbacks, progress_bar=cfg.trainer.get("enable_progress_bar", True))
    assert all(isinstance(c, L.Callback) for c in callbacks)
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert isinstance(trainer, L.Trainer) and trainer.max_steps == cfg.trainer.max_steps
    # the option's own node is what was built
    if group == "model":
        assert type(module.net).__name__ == "VisionTransformer"
    if group == "guidance":  # mode file = config name; `sift` is the default's name for `attention`
        assert set(module.guidance.modes) == ({"attention"} if option == "sift" else set() if option == "none"
                                              else {option})
    if group == "objective":
        assert type(module.objective).__name__.lower().startswith(option[:3])
