"""Settings changed on resume: which a resumed run takes from the new command line, which stop it, and the run's
history of changes.

A resumed run is the saved run continued, so the settings that define *what* is trained (model, data, objective,
seed, relevance, the guidance modes and their structure, the number of processes) cannot change: such a resume
stops with the keys named (:func:`check_resume`), unless the user starts a *new* run from the checkpoint's
weights (``resume.new_run=true``, in a new run directory). The settings of *how* training goes on can change at the
resumed step: optimizer hyper-parameters and the LR schedule (:class:`~siftguide.run.resume.ResumeState` applies them
to the restored optimizer), guidance weights and schedules (the modes are built from the config, they keep no
saved state), the run's length, validation, logging and evaluation (:data:`APPLIED_ON_RESUME`). Anything not listed
there stops the resume: a key nobody has thought about is safer refused than silently half applied.

Each start of a run directory appends one entry to ``config_history.yaml`` beside ``config.yaml``
(:func:`record`): the step it started from and the keys it changed (``before`` / ``after``). ``config.yaml`` is the
config in effect now; when a resume changed something, its first lines are comments that list the changes and
the steps they took effect (:func:`write_config`).
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from .errors import UserError

log = logging.getLogger("siftguide.run.resume")

__all__ = ["APPLIED_ON_RESUME", "IDENTITY", "guidance_modes", "HISTORY_FILE", "check_resume", "record", "write_config", "diff", "ResumeRefused"]

HISTORY_FILE = "config_history.yaml"
# resolved config keys (fnmatch patterns) a resumed run takes from the new config at the resumed step
APPLIED_ON_RESUME = (
    # optimisation: the restored optimizer gets them (ResumeState); the schedule is rebuilt from the config
    "optimizer.lr", "optimizer.weight_decay", "optimizer.betas", "optimizer.eps", "module.warmup_steps", "module.min_lr_factor",
    "trainer.gradient_clip_val", "trainer.precision",
    # guidance weights and schedules: the modes are built from the config and keep no state in the checkpoint
    "guidance.weight", "guidance.*.weight", "guidance.*.schedule.*", "guidance.*.beta", "guidance.*.total_steps",
    "guidance.*.full_after", "guidance.*.curriculum_steps", "guidance.*.at_eval",
    # the run's length (trainer.max_steps: not below the checkpoint's step), validation, logging, evaluation
    "trainer.max_steps", "trainer.max_time", "trainer.val_check_interval", "trainer.check_val_every_n_epoch",
    "trainer.log_every_n_steps", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.num_sanity_val_steps", "trainer.accelerator", "trainer.benchmark", "trainer.deterministic",
    "logger.*", "callbacks.*", "test", "optimized_metric",
    "task_name", "compile", "cpu_threads", "resume.*",
    # how data is loaded (not which data)
    "data.num_workers", "data.pin_memory", "data.download", "data.cache_dir", "data.val_subset",
    "data.max_skip_fraction",
)
_IGNORED = ("paths.*", "hydra.*", "ckpt_path", "overwrite", "*save_dir", "*default_root_dir",
            "*dirpath")  # where the run lives
# what is trained: a key of these groups that appears or disappears on resume is a change (refused), as a changed
# value is; elsewhere a key only one side has is a setting added or removed by another siftguide version
IDENTITY = ("objective.*", "relevance.kind", "data.*", "model.*", "num_classes")
_ABSENT = "<absent>"


class ResumeRefused(UserError, ValueError):
    """The config differs from the checkpoint's in settings a resumed run cannot change."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _match(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def diff(saved: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` for every resolved key that differs (``"<absent>"`` where a side lacks
    it), the run's location left out."""
    a, b = _flat(saved), _flat(now)
    return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, _ABSENT) != b.get(k, _ABSENT) and not _match(k, _IGNORED)}


def guidance_modes(config: dict) -> list[str]:
    """The guidance modes a resolved config trains with (``guidance=none``: none)."""
    return sorted(k for k, v in (config.get("guidance") or {}).items() if isinstance(v, dict))


def check_resume(saved: dict, now: dict, step: int, ckpt: Path) -> dict[str, tuple[Any, Any]]:
    """The changes a resume from ``ckpt`` (at optimizer step ``step``, saved with config ``saved``) makes; raises
    :class:`ResumeRefused` naming the keys that cannot change: what is trained (the set of guidance modes, the
    objective, the relevance kind, the data, the model, the classes: :data:`IDENTITY`; a key there that appears or
    disappears counts as a change) and every other key whose value differs, unless :data:`APPLIED_ON_RESUME` lets it
    change. Outside the identity groups, a key only one side has (a setting added or removed by another siftguide
    version) is applied, not refused."""
    changes = diff(saved, now)
    modes = (guidance_modes(saved), guidance_modes(now))
    refused = [k for k, (old, new) in changes.items() if not _match(k, APPLIED_ON_RESUME)
               and ((old != _ABSENT and new != _ABSENT) or _match(k, IDENTITY))]
    if modes[0] != modes[1]:  # a mode swapped in or out: its keys only appear or disappear
        changes = {"guidance modes": (modes[0] or ["none"], modes[1] or ["none"]), **changes}
        refused = ["guidance modes", *(k for k in refused if not k.startswith("guidance."))]
    max_steps = changes.get("trainer.max_steps", (None, None))[1]
    if isinstance(max_steps, int) and 0 <= max_steps < step:
        refused.append("trainer.max_steps")
    if refused:
        lines = "\n".join(f"  - {k}: {changes[k][0]} -> {changes[k][1]}" for k in refused)
        past = (f"\n(trainer.max_steps={max_steps} is below the checkpoint's step {step}.)"
                if "trainer.max_steps" in refused else "")
        raise ResumeRefused(
            f"cannot resume {ckpt} (step {step}) with these settings changed:\n{lines}{past}\n"
            f"They define what is trained (model, data, objective, seed, relevance, guidance modes, processes): the "
            f"result would not be the saved run continued. Resume with the checkpoint's values (its run directory's "
            f"config.yaml), or start a new run from its weights, at step 0 with a fresh optimizer and schedule: "
            f"ckpt_path={ckpt} resume.new_run=true hydra.run.dir=<a new run directory>.")
    return changes


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _read(path: Path) -> list[dict]:
    try:
        entries = yaml.safe_load(path.read_text()) if path.is_file() else []
    except (OSError, yaml.YAMLError) as e:
        log.warning("%s cannot be read (%s): a new history is started", path, e)
        entries = []
    return entries if isinstance(entries, list) else []


def record(out_dir: Path, event: str, step: int, changes: dict[str, tuple[Any, Any]] | None = None,
           source: Path | None = None) -> list[dict]:
    """Append this start of the run to ``out_dir/config_history.yaml`` and return the whole history.

    Args:
        event: ``start`` (a new run), ``resume`` (a checkpoint continued) or ``new_run`` (a new run from a
            checkpoint's weights).
        step: the optimizer step this process starts at.
        changes: ``{key: (before, after)}``: the settings this start changed (relative to the checkpoint).
        source: the checkpoint resumed or whose weights were taken.
    """
    path = out_dir / HISTORY_FILE
    entries = _read(path)
    entry: dict[str, Any] = {"event": event, "step": int(step),
                             "at": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    if source is not None:
        entry["from"] = str(source)
    if changes:
        entry["changed"] = {k: {"before": _plain(a), "after": _plain(b)} for k, (a, b) in changes.items()}
    entries.append(entry)
    header = ("# This run directory's starts and resumes, oldest first: the optimizer step each started at and the\n"
              "# settings it changed (in effect from that step on). config.yaml holds the settings in effect now.\n")
    path.write_text(header + yaml.safe_dump(entries, sort_keys=False, default_flow_style=None))
    return entries


def write_config(cfg: DictConfig, path: Path, history: list[dict] | None = None) -> None:
    """``config.yaml``: the resolved config, under comments listing the changes of ``history`` (if any) with the
    step each took effect, so that the file says what ran."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    changed = [e for e in history or [] if e.get("changed") and e.get("event") == "resume"]
    if changed:
        lines = ["# Settings changed on resume (config_history.yaml); the values below are those in effect now:"]
        for e in changed:
            for k, v in e["changed"].items():
                lines.append(f"#   from step {e['step']}: {k}: {v['before']} -> {v['after']}")
        text = "\n".join(lines) + "\n" + text
    path.write_text(text)
