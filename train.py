"""Hydra entry point: ``python train.py [overrides]``. ``train(cfg)`` is importable for tests and tools."""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from siftguide.callbacks import TrainTimer, ValidateAtEnd
from siftguide.eval import KNNEvaluator
from siftguide.guidance import Guidance
from siftguide.module import PretrainModule

log = logging.getLogger("siftguide.train")
RESULTS_FILE = "results.json"  # written in the run directory when a run ends normally
# the module's on_after_batch_transfer (device pipeline) is meant to take precedence over the datamodule's
warnings.filterwarnings("ignore", message=".*on_after_batch_transfer.*")


def _wandb_group(cfg: DictConfig) -> None:
    """Multirun jobs share a wandb group named after the sweep directory (unless one was set)."""
    if "wandb" not in cfg.get("logger", {}) or cfg.logger.wandb.get("group"):
        return
    try:
        hc = HydraConfig.get()
    except ValueError:  # compose API (tests): no Hydra runtime
        return
    if hc.mode == hydra.types.RunMode.MULTIRUN:
        with open_dict(cfg):
            cfg.logger.wandb.group = Path(hc.sweep.dir).name


def build_guidance(cfg: DictConfig, net) -> Guidance:
    """The composed guidance modes of ``cfg.guidance``: ``weight`` plus one node per mode (a partial taking the
    net); ``guidance=none`` has no mode."""
    modes = {name: instantiate(node) for name, node in cfg.guidance.items() if name != "weight"}
    return Guidance(net, modes, weight=cfg.guidance.get("weight", 1.0))


def build_module(cfg: DictConfig, config: dict | None = None) -> PretrainModule:
    """The LightningModule of a composed config (also used by bench/throughput.py)."""
    net = instantiate(cfg.model)  # first: the same seed gives the same init whatever else is configured
    objective = instantiate(cfg.objective)
    if getattr(objective, "needs_labels", False) and not cfg.data.get("labels", True):
        raise ValueError("objective=supervised needs labels but data.labels=false: use objective=mae for "
                         "unlabelled pre-training (evaluated by the online probe and kNN on the labelled val set)")
    return PretrainModule(
        net=net, objective=objective, transform=instantiate(cfg.transform), relevance=instantiate(cfg.relevance),
        guidance=build_guidance(cfg, net), optimizer=instantiate(cfg.optimizer),
        warmup_steps=cfg.scheduler.warmup_steps, min_lr_factor=cfg.scheduler.min_lr_factor,
        align_batches=cfg.align_batches, align_layers=list(cfg.get("align_layers", [-1])), config=config,
    )


def build(cfg: DictConfig) -> tuple[PretrainModule, L.LightningDataModule, L.Trainer]:
    """Instantiate module, data and trainer from a composed config (seeds first: same init for every run)."""
    L.seed_everything(cfg.seed, workers=True)
    _wandb_group(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)

    datamodule = instantiate(cfg.data)
    module = build_module(cfg, config=resolved)
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    for lg in loggers:
        if isinstance(lg, L.pytorch.loggers.WandbLogger):
            lg.log_hyperparams(resolved)
    callbacks = [
        ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True, save_top_k=0,
                        every_n_train_steps=cfg.trainer.get("val_check_interval") or None),
        TrainTimer(),
        ValidateAtEnd(),
    ]
    knn = dict(cfg.get("knn") or {})
    if knn.pop("enabled", False):
        callbacks.append(KNNEvaluator(**knn))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return module, datamodule, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (resuming from ``cfg.ckpt_path`` if given), make sure the final step is validated, save
    ``checkpoints/last.ckpt``, optionally test, write ``results.json`` (status, final step and metrics).
    Returns the final metrics."""
    module, datamodule, trainer = build(cfg)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        ValidateAtEnd.run(trainer, module, datamodule)
        trainer.save_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
        if cfg.get("test"):
            trainer.test(module, datamodule=datamodule)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        if trainer.is_global_zero:  # the marker of a finished run (study and experiment scripts skip such runs)
            (Path(cfg.paths.output_dir) / RESULTS_FILE).write_text(json.dumps(
                {"status": "finished", "global_step": int(trainer.global_step), "metrics": metrics}, indent=1))
    finally:
        for lg in trainer.loggers:
            lg.finalize("success")
        try:
            import wandb

            wandb.finish()  # close the offline run even when training failed
        except Exception:  # noqa: BLE001
            pass
    log.info("final metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    log.info("run directory: %s", os.path.abspath(cfg.paths.output_dir))
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))  # for hparams_search sweepers


if __name__ == "__main__":
    main()
