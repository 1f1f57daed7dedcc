"""The training entry point: ``siftguide-train [overrides]`` (installed), ``python -m siftguide.train`` or, in a
checkout, ``python train.py`` (a wrapper). :func:`build` instantiates module, data and trainer from a composed
config, :func:`train` fits a run (importable for tests and tools), :func:`main` is the Hydra command. The configs
are package data (``siftguide/conf/``, ``configs/`` in a checkout)."""
from __future__ import annotations

import os

# Before torch loads its OpenMP runtime: waiting threads sleep instead of spinning, so process CPU time (the cost
# axis on CPUs) counts work, not spin-waits for a sibling thread another process has descheduled (docs/metrics.md)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from .callbacks import RelevanceSetup, ValidateAtEnd, instantiate_callbacks  # noqa: E402
from .callbacks.preemption import Interrupted, Preemption, SignalStop  # noqa: E402
from .guidance import Guidance  # noqa: E402
from .module import PretrainModule  # noqa: E402
from .run import changes  # noqa: E402
from .run import directory as run_directory  # noqa: E402
from .run.checkpoint import safe_loading  # noqa: E402
from .run.checks import validate_config  # noqa: E402
from .run.errors import UserError  # noqa: E402
from .run.lock import RunLock  # noqa: E402
from .run.resume import (LAST_CKPT, RESULTS_FILE, RotatingCheckpointIO, checkpoint_info, continue_csv,  # noqa: E402
                         load_weights, resolve_ckpt_path, same_run, wandb_id)

log = logging.getLogger("siftguide.train")
# Third-party warnings that are not the user's business, each matched by its message and the module issuing it
# (found in a default run's log); warnings about the user's settings stay visible.
_QUIET = (
    # the module's on_after_batch_transfer (device pipeline) is meant to take precedence over the datamodule's
    (".*on_after_batch_transfer.*", "lightning.pytorch.trainer.connectors.data_connector"),
    # the run directory already holds config.yaml; a resumed run keeps its rows (siftguide.run.resume.continue_csv)
    ("Experiment logs directory .* exists and is not empty", "lightning.fabric.loggers.csv_logs"),
    # a run resumed in place writes its checkpoints where they were
    ("Checkpoint directory .* exists and is not empty", "lightning.pytorch.callbacks.model_checkpoint"),
    # the training sampler does resume mid-epoch (siftguide.data.sampler), Lightning cannot see it
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


def cpu_threads(cfg: DictConfig) -> None:
    """A run on the CPU computes with ``cfg.cpu_threads`` threads (``torch.set_num_threads``; null: torch's default,
    one per core). One thread keeps ``train/cost_s`` (process CPU time) a measure of the work beside other processes:
    within 3 % beside two busy ones, against 0.78x with two threads and passive waiting, and 1.9x with OpenMP's
    spin-waiting (``python bench/cost.py``, docs/metrics.md)."""
    n, accel = cfg.get("cpu_threads"), str(cfg.trainer.get("accelerator", "auto"))
    if n and (accel == "cpu" or (accel == "auto" and not torch.cuda.is_available())):
        torch.set_num_threads(int(n))


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
    settings = OmegaConf.to_container(cfg.module, resolve=True)  # the module's own settings (configs/module/)
    return PretrainModule(
        net=net, objective=objective, transform=instantiate(cfg.transform), relevance=instantiate(cfg.relevance),
        guidance=build_guidance(cfg, net), optimizer=instantiate(cfg.optimizer), config=config, **settings,
    )


def _resume_options(cfg: DictConfig) -> tuple[bool, bool]:
    """``(new_run, trust_checkpoint)`` of ``cfg.resume``."""
    node = cfg.get("resume") or {}
    return bool(node.get("new_run", False)), bool(node.get("trust_checkpoint", False))


def _start(cfg: DictConfig, ckpt: Path | None, out_dir: Path, resolved: dict) -> tuple[bool, int]:
    """Check a resume against the checkpoint's config (before anything is written), record this start in the run's
    history and write ``config.yaml``. Returns ``(in_place, step)``: whether ``ckpt`` belongs to this run directory
    (its metrics.csv and wandb run continue) and the checkpoint's step (0 without one)."""
    new_run, trust = _resume_options(cfg)
    in_place, step, diff, event = False, 0, {}, "start"
    if ckpt is not None:
        step, saved = checkpoint_info(ckpt, trust)
        in_place = same_run(ckpt, out_dir)
        if new_run:
            if in_place:
                raise ValueError(f"resume.new_run=true starts a new run from the weights of {ckpt}: give it its own "
                                 f"run directory (hydra.run.dir=...), not the checkpoint's")
            event, diff, in_place = "new_run", changes.diff(saved, resolved), False
            log.info("a new run from the weights of %s (step %d); optimizer, schedule and step start afresh", ckpt,
                     step)
        else:
            event, diff = "resume", changes.check_resume(saved, resolved, step, ckpt)  # refuses what cannot change
            log.info("resuming from %s (step %d)%s", ckpt, step, "" if in_place else
                     ": a checkpoint of another run directory, this run keeps its own metrics.csv and wandb run")
            if diff:
                log.warning("settings changed on resume, in effect from step %d (recorded in %s): %s", step,
                            changes.HISTORY_FILE, "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items()))
    if rank_zero_only.rank == 0:  # one writer (DDP ranks share the run directory)
        history = changes.record(out_dir, event, 0 if event == "new_run" else step, diff, ckpt)
        changes.write_config(cfg, out_dir / "config.yaml", history)
    return in_place, step


def build(cfg: DictConfig, ckpt: Path | None = None) -> tuple[PretrainModule, L.LightningDataModule, L.Trainer]:
    """Instantiate module, data and trainer from a composed config (seeds first: same init for every run).
    ``ckpt``: the checkpoint ``train`` resumes from (or, with ``resume.new_run=true``, whose weights a new run
    starts from); one of this run directory continues its metrics.csv and wandb run. A resume with settings that
    cannot change within a run stops here, before anything is written (:mod:`siftguide.run.changes`)."""
    validate_config(cfg)  # values that do not fit: one clear error before anything is built or written
    quiet_warnings()
    cpu_threads(cfg)
    L.seed_everything(cfg.seed, workers=True)
    _wandb_group(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    in_place, step = _start(cfg, ckpt, out_dir, resolved)

    datamodule = instantiate(cfg.data)
    module = build_module(cfg, config=resolved)
    new_run, trust = _resume_options(cfg)
    if ckpt is not None and new_run:
        loaded, left = load_weights(module, ckpt, trust)
        log.info("loaded %d weights of %s; %d keep their initialisation%s", len(loaded), ckpt, len(left),
                 f" ({', '.join(left[:8])}{' ...' if len(left) > 8 else ''})" if left else "")
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
    # configs/callbacks/: the checkpoint written after each validation (a run resumes from there exactly), timers
    # and the cost axis, validation at the end, resume state, the non-finite stop, pre-emption, skipped files,
    # guidance balance, the progress bar, kNN (callbacks.knn=null: off), the attention monitor when selected
    callbacks = instantiate_callbacks(cfg.get("callbacks"), progress_bar=cfg.trainer.get("enable_progress_bar", True))
    callbacks.insert(0, RelevanceSetup())  # keypoint caches, mean map, datasets carrying keypoints, prefetch
    # checkpoints: last.ckpt, the previous one kept as last.prev.ckpt
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[RotatingCheckpointIO()])
    return module, datamodule, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (resuming from ``cfg.ckpt_path`` if given), make sure the final step is validated, save
    ``checkpoints/last.ckpt``, optionally test, write ``results.json`` (status, final step and metrics).
    Returns the final metrics. A failed run (an exception, e.g. a non-finite loss) is marked failed in
    ``results.json``, the loggers and wandb, and the exception propagates (non-zero exit). SIGTERM or SIGINT end
    the run at the current step with its checkpoint written, ``results.json`` ``"status": "interrupted"``, and
    :class:`~siftguide.callbacks.preemption.Interrupted` (exit code 128 + signal). The run directory is locked while the run
    trains (:class:`~siftguide.run.lock.RunLock`)."""
    validate_config(cfg)  # a config error leaves no trace (not even the run directory's lock)
    out_dir = Path(cfg.paths.output_dir)
    new_run, trust = _resume_options(cfg)
    stop = SignalStop()
    stop.install()  # from here on a signal ends the run at the next step boundary, not in the middle of a write
    try:
        with RunLock(out_dir, enabled=rank_zero_only.rank == 0):
            return _train(cfg, out_dir, stop, new_run, trust)
    finally:
        stop.restore()


def _train(cfg: DictConfig, out_dir: Path, stop: SignalStop, new_run: bool, trust: bool) -> dict[str, float]:
    ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir, trust=trust)
    # a run directory holds one run: another run's files are replaced only with overwrite=true (moved aside)
    continues = str(cfg.get("ckpt_path")) == "last" or (ckpt is not None and not new_run and same_run(ckpt, out_dir))
    run_directory.claim(out_dir, continues, bool(cfg.get("overwrite")), rank_zero_only.rank == 0)
    module, datamodule, trainer = build(cfg, ckpt)
    for cb in trainer.callbacks:
        if isinstance(cb, Preemption):
            cb.stop = stop
    last = out_dir / "checkpoints" / LAST_CKPT
    status, metrics, error = "failed", {}, None
    try:
        fit_kwargs = {"weights_only": not trust} if "weights_only" in inspect.signature(trainer.fit).parameters else {}
        with safe_loading():
            trainer.fit(module, datamodule=datamodule, ckpt_path=None if new_run else ckpt, **fit_kwargs)
        if not stop.requested:
            ValidateAtEnd.run(trainer, module, datamodule)
        trainer.save_checkpoint(last, weights_only=False)
        if stop.requested:  # after the checkpoint of this step: a resume loses nothing
            raise Interrupted(stop.signum, trainer.global_step)
        if cfg.get("test"):
            trainer.test(module, datamodule=datamodule)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        status = "finished"
    except Interrupted:
        status = "interrupted"
        raise
    except (SystemExit, KeyboardInterrupt) as e:
        if stop.requested:  # Lightning's SIGTERMException (exit code 0), a second Ctrl+C: still non-zero
            status = "interrupted"
            raise Interrupted(stop.signum, trainer.global_step) from e
        error = f"{type(e).__name__}: {e}"
        raise
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        if trainer.is_global_zero:  # status finished: the marker of a finished run (study scripts skip such runs)
            extra = {"signal": signal.Signals(stop.signum).name} if status == "interrupted" else {}
            (out_dir / RESULTS_FILE).write_text(json.dumps(
                {"status": status, "global_step": int(trainer.global_step), "metrics": metrics, **extra,
                 **({"error": error} if error else {})}, indent=1))
        for lg in trainer.loggers:
            lg.finalize("success" if status == "finished" else status)
        try:
            import wandb

            if status == "interrupted" and wandb.run is not None:
                wandb.run.mark_preempting()  # wandb shows the run as pre-empted, not crashed
            wandb.finish(exit_code=0 if status == "finished" else 1)  # close the run (state failed on failure)
        except Exception:  # noqa: BLE001
            pass
    log.info("final metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    log.info("run directory: %s", os.path.abspath(cfg.paths.output_dir))
    return metrics


def report_user_error(e: BaseException) -> None:
    """One paragraph on stderr for an error the user can act on; its traceback to the run's log file(s)."""
    logs = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    text = "".join(traceback.format_exception(e))
    for path in logs:
        with open(path, "a") as f:
            f.write(f"[{type(e).__name__}] the error below, with its traceback:\n{text}")
    where = f" (traceback in {', '.join(logs)}; HYDRA_FULL_ERROR=1 shows it here)" if logs else ""
    print(f"error: {e}{where}", file=sys.stderr, flush=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except (UserError, ValueError, FileNotFoundError) as e:  # what the user can act on: the message is the story
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report_user_error(e)
        sys.exit(1)
    return metrics.get(cfg.get("optimized_metric"))  # for hparams_search sweepers


if __name__ == "__main__":
    main()
