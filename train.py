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

from siftguide.callbacks import NonFiniteCheck, StepProgressBar, TrainTimer, ValidateAtEnd
from siftguide.checks import validate_config
from siftguide.eval import KNNEvaluator
from siftguide.guidance import Guidance
from siftguide.module import PretrainModule
from siftguide.resume import (RESULTS_FILE, ResumeState, checkpoint_info, config_changes, continue_csv,
                              resolve_ckpt_path, same_run, wandb_id)

log = logging.getLogger("siftguide.train")
# Third-party warnings that are not the user's business, each matched by its message and the module issuing it
# (found in a default run's log); warnings about the user's settings stay visible.
_QUIET = (
    # the module's on_after_batch_transfer (device pipeline) is meant to take precedence over the datamodule's
    (".*on_after_batch_transfer.*", "lightning.pytorch.trainer.connectors.data_connector"),
    # the run directory already holds config.yaml; a resumed run keeps its rows (siftguide.resume.continue_csv)
    ("Experiment logs directory .* exists and is not empty", "lightning.fabric.loggers.csv_logs"),
    # a run resumed in place writes its checkpoints where they were
    ("Checkpoint directory .* exists and is not empty", "lightning.pytorch.callbacks.model_checkpoint"),
    # the training sampler does resume mid-epoch (siftguide.sampler), Lightning cannot see it
    ("You're resuming from a checkpoint that ended before the epoch ended",
     "lightning.pytorch.loops.training_epoch_loop"),
    # Lightning's own use of a torch API deprecated in torch 2.10+
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated", "lightning.pytorch.utilities._pytree"),
)


def quiet_warnings() -> None:
    """Install the filters of ``_QUIET`` (at import, and again in ``build``: tests and tools reset filters)."""
    for message, module in _QUIET:
        warnings.filterwarnings("ignore", message=message, module=module)


quiet_warnings()


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
    if cfg.get("compile"):  # regional: each block compiled in place (same module, same state_dict keys)
        for block in net.blocks:
            block.compile()
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


def build(cfg: DictConfig, ckpt: Path | None = None) -> tuple[PretrainModule, L.LightningDataModule, L.Trainer]:
    """Instantiate module, data and trainer from a composed config (seeds first: same init for every run).
    ``ckpt``: the checkpoint ``train`` resumes from; one of this run directory continues its metrics.csv and
    wandb run."""
    validate_config(cfg)  # values that do not fit: one clear error before anything is built or written
    quiet_warnings()
    L.seed_everything(cfg.seed, workers=True)
    _wandb_group(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)

    datamodule = instantiate(cfg.data)
    module = build_module(cfg, config=resolved)
    in_place = ckpt is not None and same_run(ckpt, out_dir)
    if ckpt is not None:
        step, saved = checkpoint_info(ckpt)
        changes = config_changes(saved, resolved)
        log.info("resuming from %s (step %d)%s", ckpt, step, "" if in_place else
                 ": a checkpoint of another run directory, this run keeps its own metrics.csv and wandb run")
        if changes:
            log.warning("the config differs from the checkpoint's (%s): the resumed run is not the saved run "
                        "continued. Resume with the original command's overrides for an exact resume.",
                        "; ".join(changes))
    loggers = []
    for c in cfg.get("logger", {}).values():
        if str(c.get("_target_", "")).endswith("WandbLogger"):  # the id kept in the run directory: resumed in place,
            loggers.append(instantiate(c, id=wandb_id(out_dir, in_place), resume="allow"))  # the wandb run continues
            if loggers[-1]._wandb_init.get("anonymous", 0) is None:  # Lightning passes None, wandb 0.31 warns
                del loggers[-1]._wandb_init["anonymous"]
        else:
            loggers.append(instantiate(c))
            if in_place and isinstance(loggers[-1], L.pytorch.loggers.CSVLogger):
                continue_csv(loggers[-1], step)
    for lg in loggers:
        if isinstance(lg, L.pytorch.loggers.WandbLogger):
            lg.log_hyperparams(resolved)
    callbacks = [
        # written after each validation (its rows logged, its random draws made): a run resumes from there exactly
        ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False,
                        save_on_train_epoch_end=False),  # no monitor: the latest, as last.ckpt
        TrainTimer(),
        ValidateAtEnd(),
        ResumeState(),
        NonFiniteCheck(),
    ]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())  # steps done / trainer.max_steps, time left
    knn = dict(cfg.get("knn") or {})
    if knn.pop("enabled", False):
        callbacks.append(KNNEvaluator(**knn))
    monitor = dict(cfg.get("attention_monitor") or {})
    if monitor.pop("enabled", False):  # attention/SIFT agreement logged during training
        from siftguide.analysis.callback import AttentionMonitor

        callbacks.append(AttentionMonitor(**monitor))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return module, datamodule, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (resuming from ``cfg.ckpt_path`` if given), make sure the final step is validated, save
    ``checkpoints/last.ckpt``, optionally test, write ``results.json`` (status, final step and metrics).
    Returns the final metrics. A failed run (an exception, e.g. a non-finite loss) is marked failed in
    ``results.json``, the loggers and wandb, and the exception propagates (non-zero exit)."""
    out_dir = Path(cfg.paths.output_dir)
    ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir)
    module, datamodule, trainer = build(cfg, ckpt)
    status, metrics, error = "failed", {}, None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        ValidateAtEnd.run(trainer, module, datamodule)
        trainer.save_checkpoint(out_dir / "checkpoints" / "last.ckpt", weights_only=False)
        if cfg.get("test"):
            trainer.test(module, datamodule=datamodule)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        status = "finished"
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        if trainer.is_global_zero:  # status finished: the marker of a finished run (study scripts skip such runs)
            (out_dir / RESULTS_FILE).write_text(json.dumps(
                {"status": status, "global_step": int(trainer.global_step), "metrics": metrics,
                 **({"error": error} if error else {})}, indent=1))
        for lg in trainer.loggers:
            lg.finalize("success" if status == "finished" else "failed")
        try:
            import wandb

            wandb.finish(exit_code=0 if status == "finished" else 1)  # close the run (state failed on failure)
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
