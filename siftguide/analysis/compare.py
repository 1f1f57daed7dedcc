"""Compare convergence across runs: ``python -m siftguide.compare RUN_DIR [RUN_DIR ...] --out DIR``.

Each RUN_DIR is a run directory (``metrics.csv`` + ``config.yaml`` or ``.hydra/config.yaml``) or any folder
above run directories (a multirun sweep). Runs are grouped by the config values that differ between them
(seed, paths and logging excluded), with seeds pooled. Each group gets a short label made of those values
(``baseline``, ``sift w=1``, ``shuffled w=1 steps=350``; see ``group_labels``), and its full ``key=value``
description is kept beside it. For each group:

* final metric (mean and sample std over seeds, ddof=1, as everywhere in this module);
* steps-to-target and cost-to-target of the group's seed-averaged curve (mean metric and mean training compute
  ``val/cost_s`` at each validation step; see "Time axes" below): the first point where it reaches the target,
  linearly interpolated between validations. With the default target the baseline's mean curve reaches it at the
  latest at its last validation. The spread is shown per seed: how many seeds reach the target on their own
  curve, and the min..max of their steps-to-target;
* area under the validation curve, normalised to the run length (the mean metric value over [0, last step],
  see ``auc``), of the seed-averaged curve and per seed (mean and std);
* ratios to the baseline group (no guidance: weight 0, ``guidance=none``, no guidance modes; see
  ``is_baseline``): < 1 means faster than the baseline;
* paired per-seed differences to the baseline (group - baseline, runs paired by seed) of the final value, the
  AUC, the steps-to-target and the cost-to-target (each seed's own curve, to the common target; a seed that does
  not reach it is counted at its run length, and at its run's total cost, and flagged), with a percentile
  bootstrap confidence interval over the pairs (fixed RNG seed, so tables regenerate identically). With 3 seeds a
  95 % interval spans the range of the per-seed differences: "excludes 0" then means every seed moved the same
  way.

Time axes. Every run logs at each validation ``val/step``, ``val/elapsed_s`` (training wall-clock) and
``val/cost_s`` (the compute its training steps consumed: GPU time on CUDA, process CPU time on CPU). Wall-clock
follows whatever else runs on the machine; the cost does not, so time to target is reported on the cost axis
(``cost_to_target_s``, ``cost_ratio``). Wall-clock (``time_to_target_s``, ``time_ratio``) is shown only where the
runs' conditions were equal, decided as follows:

* a run's *contention factor* is ``val/elapsed_s / val/cost_s`` at its last validation (``contention``): how much
  longer the wall-clock ran than the compute the steps consumed (below 1 when a CPU run uses several cores);
* the *reference* factor is the median of the baseline runs' factors (of all runs' when there is no baseline);
* a run *agrees* when its factor is within 10 % of the reference: ``|factor / reference - 1| <= 0.10``
  (``WALL_TOLERANCE``);
* a group's wall-clock figures are *reliable* when every run of the group and every run of the baseline agree
  (``wall_clock_reliable``). Otherwise the table shows "unreliable" instead of the number, the verdict quotes no
  wall-clock ratio (it says it was left out and why) and ``curves.png`` has no wall-clock panel.

Runs made before ``val/cost_s`` was logged have no cost data: their groups are reported on steps only (no cost,
no wall-clock, since their conditions cannot be checked), with a note. The table keeps the raw wall-clock figures
in ``table.csv`` beside a ``wall_reliable`` column (True, False, or empty when unknown).

The target defaults to the baseline group's mean final value. Writes ``curves.png`` (metric against steps, against
cost, and against wall-clock when it is reliable for every group; mean line, min-max band over seeds),
``table.md`` and ``table.csv`` into ``--out``, and with ``--verdict`` a plain-text summary per group
(``verdict.md``) and the same in machine-readable form (``verdict.json``, see ``verdict_data``). Needs no wandb
account: everything is read from the run directories.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

__all__ = ["Run", "load_runs", "group_runs", "group_labels", "is_baseline", "reach", "mean_curve", "auc",
           "paired_differences", "bootstrap_ci", "summarize", "to_markdown", "verdict", "plot", "main", "contention",
           "wall_clock_reliable", "control_comparisons", "verdict_data", "WALL_TOLERANCE"]

# config keys that never define a group: seeds, where things are written, how they are logged
IGNORED_PREFIXES = ("seed", "guidance.target.seed", "relevance.seed", "paths.", "hydra.", "logger.", "ckpt_path",
                    "task_name", "trainer.default_root_dir", "data.cache_dir", "guidance.cache_dir",
                    "relevance.cache_dir", "trainer.enable_progress_bar", "trainer.enable_model_summary",
                    "optimized_metric", "test")

# How a config key reads in a group label, matched on the key's last components (the longest match wins):
# "" = the value alone (names that read as words: "sift", "token_drop", "cosine"), other text = a short prefix
# ("w=1"). A key matched by none shows as "<last component>=<value>". The order here is the order in a label.
LABEL_ALIASES: dict[str, str] = {
    "relevance.kind": "", "target.kind": "", "guidance._name": "", "guidance.name": "", "guidance.modes": "",
    "guidance.mode": "", "objective._name": "", "objective.name": "", "_name": "", "kind": "", "mode": "",
    "modes": "", "guidance.weight": "w", "token_drop.keep": "keep", "prior.beta": "beta",
    "trainer.max_steps": "steps", "schedule.total_steps": "sched_steps", "optimizer.lr": "lr",
    "data.batch_size": "bs",
}
# config roots that only matter when guidance is on: left out of a baseline's label
GUIDANCE_PREFIXES = ("guidance", "relevance.")
# values of a guidance switch that mean "no guidance"
BASELINE_NAMES = ("none", "off", "baseline", "null")
# keys naming the map guidance uses; "sift" is the real map, these kinds are controls that use a wrong one
KIND_KEYS = ("relevance.kind", "guidance.target.kind")
REFERENCE_KIND = "sift"
WRONG_MAP_KINDS = ("shuffled", "rolled", "uniform", "mean", "random")
# a child node of ``guidance`` whose ``_target_`` starts with this is a guidance mode (``guidance.attention``)
MODE_TARGET_PREFIX = "siftguide.guidance."
# wall-clock figures are shown only when every run's contention factor (wall-clock / cost) is within this relative
# distance of the baseline runs' median factor (see the module docstring, "Time axes")
WALL_TOLERANCE = 0.10


@dataclass
class Run:
    path: Path
    config: dict
    metrics: pd.DataFrame
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def seed(self):
        return self.config.get("seed")

    def curve(self, metric: str) -> pd.DataFrame:
        """Validation curve: columns ``step``, ``time`` (``val/elapsed_s``), ``cost`` (``val/cost_s``, nan in runs
        made before it was logged), ``value`` (one row per validation), sorted by step."""
        if metric not in self.curves:
            m = self.metrics
            if metric not in m.columns:
                raise KeyError(f"{self.path}: metric {metric!r} not in metrics.csv (has: "
                               f"{', '.join(c for c in m.columns if '/' in c)})")
            rows = m[m[metric].notna()]
            step = rows["val/step"] if "val/step" in rows and rows["val/step"].notna().all() else rows["step"]
            time = rows["val/elapsed_s"] if "val/elapsed_s" in rows else pd.Series(np.nan, index=rows.index)
            cost = rows["val/cost_s"] if "val/cost_s" in rows else pd.Series(np.nan, index=rows.index)
            df = pd.DataFrame({"step": step.to_numpy(float), "time": time.to_numpy(float),
                               "cost": cost.to_numpy(float), "value": rows[metric].to_numpy(float)})
            self.curves[metric] = df.sort_values("step").drop_duplicates("step", keep="last").reset_index(drop=True)
        return self.curves[metric]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def _read_config(run_dir: Path) -> dict:
    for name in ("config.yaml", ".hydra/config.yaml"):
        p = run_dir / name
        if p.is_file():
            with open(p) as f:
                return yaml.safe_load(f) or {}
    return {}


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Every run directory (holding ``metrics.csv``) at or below the given paths."""
    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        files = [p / "metrics.csv"] if (p / "metrics.csv").is_file() else sorted(p.rglob("metrics.csv"))
        if not files:
            raise FileNotFoundError(f"no metrics.csv at or below {p}")
        for f in files:
            runs.append(Run(f.parent, _with_modes(_with_run_seed(_flatten(_read_config(f.parent)))), pd.read_csv(f)))
    return runs


def _with_run_seed(config: dict) -> dict:
    """A nested ``*.seed`` that holds the run's own seed (``seed: ${seed}`` in a mode's config, resolved when the
    config was saved) reads ``${seed}`` again, so runs of one setting over seeds stay one group; a nested seed
    set apart from the run's seed keeps its value and defines a group."""
    seed = config.get("seed")
    return {k: "${seed}" if k != "seed" and k.endswith(".seed") and seed is not None and v == seed else v
            for k, v in config.items()}


def _with_modes(config: dict) -> dict:
    """Add ``guidance.modes`` (the names of the ``guidance.<name>`` nodes that instantiate a guidance mode, in
    config order) to a flat config that has such nodes but no explicit mode list, so runs that use different
    modes fall into different groups."""
    if "guidance.modes" in config:
        return config
    modes = tuple(k.split(".")[1] for k, v in config.items() if k.startswith("guidance.") and k.count(".") == 2
                  and k.endswith("._target_") and str(v).startswith(MODE_TARGET_PREFIX))
    return {**config, "guidance.modes": modes} if modes else config


def _varying_keys(runs: list[Run]) -> list[str]:
    """Config keys (seeds, paths, logging excluded) on which the runs that have the key disagree."""
    keys = sorted({k for r in runs for k in r.config})
    varying = []
    for k in keys:
        if k.startswith(IGNORED_PREFIXES):
            continue
        # guidance.modes is derived (``_with_modes``): a run without it uses no mode, which is a value of its own
        values = {repr(r.config.get(k)) for r in runs if k in r.config or k == "guidance.modes"}
        if len(values) > 1:
            varying.append(k)
    return varying


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Group runs by the config values that differ between them (ignoring seeds, paths, logging).

    The dict keys are the full descriptions (``guidance.target.kind=sift, guidance.weight=1``); ``group_labels``
    gives each group its short label. A key that only some runs have (an option added after older runs were
    made) differs only if the runs that have it disagree: runs made before the option existed are grouped with
    runs that use its default.
    """
    varying = _varying_keys(runs)
    groups: dict[str, list[Run]] = {}
    for r in runs:
        label = ", ".join(f"{k}={_fmt(r.config.get(k))}" for k in varying) or "all runs"
        groups.setdefault(label, []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: _sort_key(kv[1][0])))


def _fmt(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _kind(config: dict) -> str:
    return next((str(config[k]) for k in KIND_KEYS if config.get(k) is not None), "")


def _sort_key(run: Run):
    w = run.config.get("guidance.weight", 0.0)
    try:
        w = float(w or 0.0)
    except (TypeError, ValueError):
        w = 0.0
    return (0 if is_baseline(run) else 1, _kind(run.config), w)


def is_baseline(run: Run) -> bool:
    """Whether a run trains without guidance. Tolerant of config layouts: ``guidance: null`` or a guidance
    choice named ``none``/``off``; ``guidance.enabled: false``; an empty ``guidance.modes`` list, or modes that are
    all inert; without a mode list, ``guidance.weight == 0`` (a run without any guidance key counts as a
    baseline). A mode ``m`` is inert when its own ``guidance.m.weight`` is 0, or when it has an own weight (a
    loss mode) and the global ``guidance.weight`` is 0; a mode without its own weight (token drop, prior) acts
    whatever the global weight."""
    c = run.config

    def off(v) -> bool:
        return v is None or v == () or (isinstance(v, str) and v.lower() in BASELINE_NAMES)

    def zero(v) -> bool:
        try:
            return float(v or 0.0) == 0.0
        except (TypeError, ValueError):
            return False

    if "guidance" in c and off(c["guidance"]):
        return True
    if any(k in c and off(c[k]) for k in ("guidance._name", "guidance.name")):
        return True
    if c.get("guidance.enabled") is False:
        return True
    if "guidance.modes" in c:
        modes = c["guidance.modes"]
        if off(modes):
            return True
        modes = (modes,) if isinstance(modes, str) else modes
        own = [c.get(f"guidance.{m}.weight") for m in modes]
        glob = c.get("guidance.weight", 1.0)
        return all((w is not None and zero(w)) or (w is not None and zero(glob)) for w in own)
    return zero(c.get("guidance.weight", 0.0))


def _value_text(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "+".join(map(_value_text, v)) if v else "none"
    return str(v)


def _alias(key: str) -> tuple[int, str | None]:
    """(position in LABEL_ALIASES, alias) of the longest alias matching the key's tail; (len, None) if none."""
    best, pos = None, len(LABEL_ALIASES)
    for i, (tail, alias) in enumerate(LABEL_ALIASES.items()):
        if (key == tail or key.endswith("." + tail)) and (best is None or len(tail) > len(best[0])):
            best, pos = (tail, alias), i
    return pos, (best[1] if best else None)


def _inactive(values: dict, config: dict, mode_names: set) -> set:
    """Keys of guidance modes the group does not use (``guidance.<mode>.*`` with <mode> not in its
    ``guidance.modes``): they do not act on the run, so its label leaves them out."""
    modes = config.get("guidance.modes")
    if modes is None:
        return set()
    modes = {modes} if isinstance(modes, str) else set(modes)
    return {k for k in values if k.startswith("guidance.") and k.split(".")[1] in mode_names - modes}


def _label(values: dict, baseline: bool, level: int, inactive: set = frozenset()) -> str:
    """Label of one group from its varying config values (the keys its runs have). level 0: aliases, a
    baseline shows only its non-guidance keys; 1: a baseline shows its ``guidance.*`` keys too (the relevance
    stage does not run without guidance, so ``relevance.*`` waits for level 2); 2:
    ``<last component>=<value>`` for every key, unused modes' keys included (level 3, the full description, is
    the group's key in ``group_runs``)."""
    hidden = (() if level >= 2 else ("relevance.",) if level == 1 else GUIDANCE_PREFIXES) if baseline else ()
    items = [(k, v) for k, v in values.items() if not (level < 2 and k in inactive) and not k.startswith(hidden)]
    parts = []
    for k, v in sorted(items, key=lambda kv: (_alias(kv[0])[0], kv[0])):
        alias = _alias(k)[1] if level < 2 else None
        if k.endswith("_target_") and isinstance(v, str) and level < 2:
            parts.append(v.rsplit(".", 1)[-1])  # a class path reads as its class name
        elif alias == "":
            parts.append(_value_text(v))
        else:
            parts.append(f"{alias or k.rsplit('.', 1)[-1]}={_value_text(v)}")
    if baseline:
        parts.insert(0, "baseline")
    return " ".join(parts) or "all runs"


def group_labels(groups: dict[str, list[Run]]) -> dict[str, str]:
    """Short, unique label of each group (keyed like ``groups``), made of the config keys that differ.

    Keys read through ``LABEL_ALIASES`` (``guidance.weight`` -> ``w=1``, kinds and mode names -> the value
    itself, ``trainer.max_steps`` -> ``steps=350``), else as ``<last component>=<value>``; a baseline group is
    ``baseline`` (plus its non-guidance keys); settings of guidance modes a group does not use are left out.
    Groups whose labels collide get longer forms, up to the full
    description. Example: ``{"guidance.target.kind=shuffled, guidance.weight=1": ...}`` -> ``shuffled w=1``.
    """
    runs = [r for rs in groups.values() for r in rs]
    varying = _varying_keys(runs)
    values = {g: {k: rs[0].config[k] for k in varying if k in rs[0].config} for g, rs in groups.items()}
    base = {g: all(is_baseline(r) for r in rs) for g, rs in groups.items()}
    modes = [r.config.get("guidance.modes") for r in runs]
    mode_names = {m for ms in modes if ms for m in ((ms,) if isinstance(ms, str) else ms)}
    inactive = {g: _inactive(values[g], rs[0].config, mode_names) for g, rs in groups.items()}
    level = dict.fromkeys(groups, 0)
    while True:
        labels = {g: g if level[g] >= 3 else _label(values[g], base[g], level[g], inactive[g]) for g in groups}
        seen: dict[str, list[str]] = {}
        for g, lab in labels.items():
            seen.setdefault(lab, []).append(g)
        clash = [g for gs in seen.values() if len(gs) > 1 for g in gs if level[g] < 3]
        if not clash:
            return labels
        for g in clash:
            level[g] += 1


def reach(curve: pd.DataFrame, target: float, higher_is_better: bool = True,
          columns: tuple[str, ...] = ("step", "time")) -> tuple[float, ...]:
    """The values of ``columns`` (default: step, time) where the curve first reaches ``target``, linearly
    interpolated between the validation before and the one at which it is reached; nan for each if never reached.
    ``columns=("step", "cost")`` gives the steps and the compute to the target."""
    v = curve["value"].to_numpy()
    cols = [curve[c].to_numpy(float) if c in curve else np.full(len(v), np.nan) for c in columns]
    ok = v >= target if higher_is_better else v <= target
    if not ok.any():
        return tuple(math.nan for _ in columns)
    i = int(np.argmax(ok))
    if i == 0 or v[i] == v[i - 1]:
        return tuple(float(x[i]) for x in cols)
    f = (target - v[i - 1]) / (v[i] - v[i - 1])
    return tuple(float(x[i - 1] + f * (x[i] - x[i - 1])) for x in cols)


def mean_curve(runs: list[Run], metric: str) -> pd.DataFrame:
    """Seed-averaged validation curve (``step``, ``time``, ``cost``, ``value``) on the validation steps all runs
    share (``cost`` nan when a run has no cost data)."""
    curves = [r.curve(metric).set_index("step") for r in runs]
    steps = sorted(set.intersection(*(set(c.index) for c in curves)))
    if not steps:
        raise ValueError(f"runs {[str(r.path) for r in runs]} share no validation step for {metric}")
    return pd.DataFrame({"step": steps, **{col: [np.mean([c.loc[s, col] for c in curves]) for s in steps]
                                           for col in ("time", "cost", "value")}})


def auc(curve: pd.DataFrame) -> float:
    """Area under a validation curve normalised to the run length: the mean metric value over [0, last step].

    Trapezoid rule between validations; before the first validation the first value is held back to step 0
    (no value is measured there), so ``sum_i (s_i - s_{i-1}) (v_i + v_{i-1}) / 2 / s_last`` with ``s_0 = 0``,
    ``v_0 = v_1``. A curve with a single validation gives that value.

    >>> auc(pd.DataFrame({"step": [100.0, 200.0, 400.0], "value": [0.5, 0.7, 0.8]}))  # (50 + 60 + 150) / 400
    0.65
    """
    s = curve["step"].to_numpy(float)
    v = curve["value"].to_numpy(float)
    if len(s) == 0:
        return math.nan
    if s[0] > 0:
        s, v = np.concatenate([[0.0], s]), np.concatenate([[v[0]], v])
    if s[-1] <= s[0]:
        return float(v[-1])
    return float(np.sum(np.diff(s) * (v[1:] + v[:-1]) / 2) / (s[-1] - s[0]))


def _seed_stats(runs: list[Run], metric: str, target: float | None, higher_is_better: bool) -> dict:
    """Per seed: (final value, AUC, steps to target, not reached, cost to target) on its own curve; a seed that
    does not reach the target counts at its run length and at its run's total cost (``val/cost_s`` at the last
    validation), flagged. Runs sharing a seed are averaged; runs without a seed are left out."""
    per_seed: dict = {}
    for r in runs:
        if r.seed is None:
            continue
        c = r.curve(metric)
        step, cost = reach(c, target, higher_is_better, ("step", "cost")) if target is not None else (math.nan,) * 2
        censored = target is not None and math.isnan(step)
        if censored:
            step, cost = float(c["step"].iloc[-1]), float(c["cost"].iloc[-1])
        per_seed.setdefault(r.seed, []).append((c["value"].iloc[-1], auc(c), step, cost, censored))
    return {s: (*np.mean([x[:3] for x in xs], axis=0), any(x[4] for x in xs), float(np.mean([x[3] for x in xs])))
            for s, xs in per_seed.items()}


def paired_differences(runs: list[Run], reference: list[Run], metric: str, target: float | None = None,
                       higher_is_better: bool = True) -> dict:
    """Per-seed differences ``runs - reference`` of final value, AUC, steps and cost to target, paired by seed.

    Steps and cost to target come from each seed's own curve; a seed that never reaches ``target`` counts at its
    run length (last validation step) and its run's total cost, and the pair is counted in ``steps_censored``: its
    difference is then a bound. Seeds present on one side only are skipped and counted in ``unpaired``. Returns
    ``pairs`` (n), ``unpaired``, ``steps_censored``, ``seeds`` and arrays (n,) ``final``, ``auc``, ``steps``,
    ``cost`` (nan when no target; ``cost`` nan where a run has no cost data).
    """
    a = _seed_stats(runs, metric, target, higher_is_better)
    b = _seed_stats(reference, metric, target, higher_is_better)
    seeds = sorted(set(a) & set(b), key=repr)
    unpaired = len(set(a) ^ set(b)) + sum(r.seed is None for r in [*runs, *reference])
    diff = {name: np.array([a[s][i] - b[s][i] for s in seeds], float)
            for i, name in ((0, "final"), (1, "auc"), (2, "steps"), (4, "cost"))}
    return {"pairs": len(seeds), "unpaired": unpaired, "seeds": seeds,
            "steps_censored": sum(bool(a[s][3] or b[s][3]) for s in seeds), **diff}


def contention(run: Run, metric: str) -> float:
    """A run's contention factor: wall-clock / cost (``val/elapsed_s / val/cost_s``) at its last validation with
    both logged; nan without cost data. Runs under equal conditions have equal factors; a run that shared its
    cores or GPU has a larger one (its wall-clock ran longer for the same compute)."""
    c = run.curve(metric)
    ok = np.isfinite(c["time"]) & np.isfinite(c["cost"]) & (c["cost"] > 0)
    if not ok.any():
        return math.nan
    last = c[ok].iloc[-1]
    return float(last["time"] / last["cost"])


def wall_clock_reliable(groups: dict[str, list[Run]], metric: str, base: str | None,
                        tolerance: float = WALL_TOLERANCE) -> dict[str, bool | None]:
    """Per group: whether its wall-clock figures can be compared with the baseline's (module docstring, "Time
    axes"). True when every run of the group and of the baseline has a contention factor within ``tolerance``
    (relative) of the baseline runs' median factor (all runs' median without a baseline); False when one does not;
    None when a run of the group or of the baseline has no cost data."""
    factors = {g: np.array([contention(r, metric) for r in rs], float) for g, rs in groups.items()}
    ref_runs = factors[base] if base is not None else np.concatenate(list(factors.values()) or [np.array([])])
    ref = float(np.median(ref_runs)) if len(ref_runs) and np.isfinite(ref_runs).all() else math.nan

    def agree(f: np.ndarray) -> bool:
        return bool(np.all(np.abs(f / ref - 1) <= tolerance + 1e-12))

    out: dict[str, bool | None] = {}
    for g, f in factors.items():
        if math.isnan(ref) or not np.isfinite(f).all():
            out[g] = None
        else:
            out[g] = agree(f) and (base is None or agree(factors[base]))
    return out


def bootstrap_ci(diffs, ci: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): mean of ``diffs`` (n,) and its percentile bootstrap interval (resampling the n values
    with replacement ``n_resamples`` times, RNG seeded with ``seed`` so the result is reproducible). With fewer
    than 2 finite values the interval is (nan, nan).

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0, 1.0)
    """
    d = np.asarray(diffs, float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return math.nan, math.nan, math.nan
    if len(d) < 2:
        return float(d.mean()), math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_resamples, len(d)))
    lo, hi = np.quantile(d[idx].mean(axis=1), [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(d.mean()), float(lo), float(hi)


def summarize(groups: dict[str, list[Run]], metric: str, target: float | None = None,
              higher_is_better: bool | None = None, baseline: str | None = None, ci: float = 0.95,
              n_resamples: int = 10_000,
              bootstrap_seed: int = 0) -> tuple[pd.DataFrame, float | None, str | None, list[str]]:
    """Table of final metric, AUC, steps/cost/time to target, ratios and paired differences to the baseline.

    ``baseline``: text that picks one of several baseline groups by its description or label (e.g.
    ``trainer.max_steps=500``). Columns: ``group`` (full description), ``label``, ``seeds``, ``final_mean/std``,
    ``auc`` (seed-averaged curve), ``auc_seed_mean/std``, ``steps_to_target``, ``cost_to_target_s``,
    ``time_to_target_s``, ``seeds_reached``, ``seed_steps_min/max``, ``total_time_s``, ``total_cost_s``,
    ``contention`` (mean of the runs' wall/cost factors) with ``contention_min/max``, ``wall_reliable`` (see
    ``wall_clock_reliable``: True, False, None = no cost data); with a baseline also ``steps_ratio``,
    ``cost_ratio``, ``time_ratio`` (raw: read it only where ``wall_reliable`` is True), ``final_delta``, ``pairs``,
    ``unpaired``, ``steps_censored`` and, for X in final, auc, steps, cost, ``d_X`` (mean paired difference),
    ``d_X_lo``, ``d_X_hi`` (bootstrap CI). Returns (table, target used, baseline group or None, notes).
    """
    if higher_is_better is None:
        higher_is_better = "loss" not in metric and "div" not in metric
    notes = []
    labels = group_labels(groups)
    baselines = [g for g, rs in groups.items() if all(is_baseline(r) for r in rs)]
    if baseline is not None:
        chosen = [g for g in baselines if baseline in g or baseline in labels[g]]
        if len(chosen) != 1:
            raise ValueError(f"--baseline {baseline!r} must match exactly one baseline (no guidance) group, matched "
                             f"{len(chosen)}; the baseline groups are {baselines}")
        baselines = chosen
    base = baselines[0] if baselines else None
    if len(baselines) > 1:
        notes.append(f"several groups have guidance weight 0; using '{base}' as the baseline (choose with --baseline)")
    if base is None:
        notes.append("no baseline group (guidance.weight=0 / guidance=none) among the runs: ratios are not computed")
    finals = {g: np.array([r.curve(metric)["value"].iloc[-1] for r in rs]) for g, rs in groups.items()}
    if target is None:
        if base is None:
            notes.append("no --target given and no baseline: steps/time to target are not computed")
        else:
            target = float(finals[base].mean())
    reliable = wall_clock_reliable(groups, metric, base)
    rows = []
    for g, rs in groups.items():
        nan3 = (math.nan,) * 3
        mc = mean_curve(rs, metric)
        step, time, cost = reach(mc, target, higher_is_better, ("step", "time", "cost")) if target is not None \
            else nan3
        seeds = np.array([reach(r.curve(metric), target, higher_is_better)[0] if target is not None else math.nan
                          for r in rs])
        hit = seeds[~np.isnan(seeds)]
        aucs = np.array([auc(r.curve(metric)) for r in rs])
        factors = np.array([contention(r, metric) for r in rs])
        row = {
            "group": g, "label": labels[g], "seeds": len(rs), "final_mean": finals[g].mean(),
            "final_std": _sample_std(finals[g]), "auc": auc(mc), "auc_seed_mean": aucs.mean(),
            "auc_seed_std": _sample_std(aucs), "steps_to_target": step, "time_to_target_s": time,
            "seeds_reached": f"{len(hit)}/{len(rs)}",
            "seed_steps_min": hit.min() if len(hit) else math.nan,
            "seed_steps_max": hit.max() if len(hit) else math.nan,
            "total_time_s": float(np.mean([r.curve(metric)["time"].iloc[-1] for r in rs])),
            "cost_to_target_s": cost, "total_cost_s": float(np.mean([r.curve(metric)["cost"].iloc[-1] for r in rs])),
            "contention": float(factors.mean()), "contention_min": float(factors.min()),
            "contention_max": float(factors.max()), "wall_reliable": reliable[g],
        }
        if base is not None and g != base:
            p = paired_differences(rs, groups[base], metric, target, higher_is_better)
            row.update(pairs=p["pairs"], unpaired=p["unpaired"], steps_censored=p["steps_censored"])
            for name in ("final", "auc", "steps", "cost"):
                m, lo, hi = bootstrap_ci(p[name], ci, n_resamples, bootstrap_seed)
                row.update({f"d_{name}": m, f"d_{name}_lo": lo, f"d_{name}_hi": hi})
            if p["unpaired"]:
                notes.append(f"'{g}': {p['unpaired']} run(s) without a seed partner in the baseline, left out of "
                             f"the paired differences")
        rows.append(row)
        if target is not None and math.isnan(step):
            notes.append(f"'{g}': its mean curve never reaches the target {target:.4f}")
    table = pd.DataFrame(rows)
    table["wall_reliable"] = pd.Series([reliable[g] for g in table["group"]], index=table.index, dtype=object)
    if base is not None:
        b = table.set_index("group").loc[base]
        table["steps_ratio"] = table["steps_to_target"] / b["steps_to_target"]
        table["time_ratio"] = table["time_to_target_s"] / b["time_to_target_s"]
        table["cost_ratio"] = table["cost_to_target_s"] / b["cost_to_target_s"]
        table["final_delta"] = table["final_mean"] - b["final_mean"]
        for col in ("pairs", "unpaired", "steps_censored", *(f"d_{n}{s}" for n in ("final", "auc", "steps", "cost")
                                                               for s in ("", "_lo", "_hi"))):
            if col not in table:
                table[col] = math.nan
    return table, target, base, notes


def _label_of(table: pd.DataFrame, group: str) -> str:
    if "label" not in table:
        return group
    return str(table.set_index("group").loc[group, "label"])


def _excludes_zero(lo: float, hi: float) -> bool:
    return not (math.isnan(lo) or math.isnan(hi)) and (lo > 0 or hi < 0)


def _diff_text(m: float, lo: float, hi: float, fmt: str, star: bool = True) -> str:
    if math.isnan(m):
        return "—"
    s = fmt.format(m)
    if not (math.isnan(lo) or math.isnan(hi)):
        s += f" [{fmt.format(lo)}, {fmt.format(hi)}]"
    return s + (" *" if star and _excludes_zero(lo, hi) else "")


def _range_text(lo: float, hi: float, fmt: str = "{:.2f}") -> str:
    if math.isnan(lo):
        return "—"
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}..{fmt.format(hi)}"


def _flag(v) -> bool | None:
    """A ``wall_reliable`` cell as True, False or None (unknown; also nan, as read back from a table)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return bool(v)


def _wall_text(r, value: float, fmt: str) -> str:
    """A wall-clock cell: the number where it is reliable, "unreliable" where contention bent it, — where unknown."""
    ok = _flag(r.get("wall_reliable"))
    if ok:
        return "not reached" if math.isnan(value) else fmt.format(value)
    return "unreliable" if ok is False else "—"


def _time_notes(table: pd.DataFrame) -> list[str]:
    """Why wall-clock figures are missing or marked unreliable (module docstring, "Time axes")."""
    if "wall_reliable" not in table:
        return []
    lab = table["label"] if "label" in table else table["group"]
    notes = []
    no_cost = [str(x) for x, c in zip(lab, table["total_cost_s"]) if math.isnan(c)]
    if no_cost:
        notes.append("No cost data (`val/cost_s`, logged since the cost axis was added) in "
                     + ", ".join(f"`{x}`" for x in no_cost) + ": steps only; wall-clock is left out where it cannot "
                     "be checked for contention (it needs the cost of the group's runs and of the baseline's).")
    bad = [str(x) for x, v in zip(lab, table["wall_reliable"]) if _flag(v) is False]
    if bad:
        factors = [f"`{x}` {_range_text(lo, hi)}" for x, lo, hi in
                   zip(lab, table["contention_min"], table["contention_max"]) if not math.isnan(lo)]
        notes.append(
            "Wall-clock unreliable for " + ", ".join(f"`{x}`" for x in bad) + ": a run's contention factor "
            f"(wall-clock / cost at its last validation) is more than {WALL_TOLERANCE:.0%} from the baseline runs' "
            "median, so wall-clock measured the machine's load, not the method; compare on cost. Factors: "
            + ", ".join(factors) + ".")
    return notes


def to_markdown(table: pd.DataFrame, metric: str, target: float | None, base: str | None, ci: float = 0.95,
                n_resamples: int = 10_000) -> str:
    """The table as Markdown: one convergence table (steps and cost to target; wall-clock only where it is
    reliable, see the module docstring), one table of paired differences to the baseline, notes on the time axes,
    and the list of group labels with their full config descriptions."""
    head = (f"metric `{metric}`, target {target:.4f}" if target is not None else f"metric `{metric}`, no target") \
        + (f", baseline group `{_label_of(table, base)}`" if base else ", no baseline")

    lines = [head, "", "| group | seeds | final (mean ± sample std) | AUC (mean curve) "
             "| AUC per seed (mean ± sample std) | steps to target (mean curve) | cost to target (s) "
             "| steps ratio | cost ratio | time to target (s) | time ratio | contention (wall/cost) "
             "| seeds reaching target (steps min..max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def num(v, fmt):
        return "not reached" if math.isnan(v) else fmt.format(v)

    def ratio(v):
        return "—" if math.isnan(v) else f"{v:.2f}"

    for _, r in table.iterrows():
        cost = r.get("cost_to_target_s", math.nan)
        cost = ("—" if not math.isnan(r["steps_to_target"]) else "not reached") if math.isnan(cost) else f"{cost:.1f}"
        spread = r["seeds_reached"] + ("" if math.isnan(r["seed_steps_min"]) else
                                       f" ({r['seed_steps_min']:.0f}..{r['seed_steps_max']:.0f})")
        lines.append(
            f"| {r.get('label', r['group'])} | {r['seeds']} | {r['final_mean']:.4f} ± {r['final_std']:.4f} | "
            f"{r['auc']:.4f} | {r['auc_seed_mean']:.4f} ± {r['auc_seed_std']:.4f} | "
            f"{num(r['steps_to_target'], '{:.0f}')} | {cost} | {ratio(r.get('steps_ratio', math.nan))} | "
            f"{ratio(r.get('cost_ratio', math.nan))} | {_wall_text(r, r['time_to_target_s'], '{:.1f}')} | "
            f"{_wall_text(r, r.get('time_ratio', math.nan), '{:.2f}').replace('not reached', '—')} | "
            f"{_range_text(r.get('contention_min', math.nan), r.get('contention_max', math.nan))} | {spread} |")
    if base is not None and "d_final" in table and len(table) > 1:
        lines += ["", f"Paired differences to the baseline (group − baseline, runs paired by seed): mean "
                  f"[{ci:.0%} bootstrap CI over seeds, {n_resamples:,} resamples]; * = the CI excludes 0; "
                  "steps and cost to target from each seed's own curve, a seed that does not reach the target "
                  "counted at its run length and its run's total cost († = pairs with such a seed).", "",
                  "| group | pairs | Δ final | Δ AUC | Δ steps to target | Δ cost to target (s) |",
                  "|---|---|---|---|---|---|"]
        for _, r in table[table["group"] != base].iterrows():
            pairs = "0" if math.isnan(r["pairs"]) else f"{r['pairs']:.0f}"
            if r["unpaired"] > 0:
                pairs += f" ({r['unpaired']:.0f} unpaired)"
            steps = _diff_text(r["d_steps"], r["d_steps_lo"], r["d_steps_hi"], "{:+.0f}")
            cost = _diff_text(r.get("d_cost", math.nan), r.get("d_cost_lo", math.nan), r.get("d_cost_hi", math.nan),
                              "{:+.1f}")
            if r["steps_censored"] > 0:
                steps += f" † {r['steps_censored']:.0f}/{r['pairs']:.0f}"
                cost += "" if cost == "—" else f" † {r['steps_censored']:.0f}/{r['pairs']:.0f}"
            lines.append(f"| {r.get('label', r['group'])} | {pairs} | "
                         f"{_diff_text(r['d_final'], r['d_final_lo'], r['d_final_hi'], '{:+.4f}')} | "
                         f"{_diff_text(r['d_auc'], r['d_auc_lo'], r['d_auc_hi'], '{:+.4f}')} | {steps} | {cost} |")
    notes = _time_notes(table)
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    if "label" in table:
        lines += ["", "Groups:"] + [f"- `{r['label']}`: {r['group']}" for _, r in table.iterrows()]
    return "\n".join(lines) + "\n"


def _controls(groups: dict[str, list[Run]], base: str | None) -> list[tuple[str, list[str]]]:
    """(SIFT group, [wrong-map control groups]) pairs that share every varying config value but the map kind."""
    runs = [r for rs in groups.values() for r in rs]
    varying = _varying_keys(runs)
    kind_keys = [k for k in varying if k in KIND_KEYS]
    if not kind_keys:
        return []

    def rest(g):
        return tuple(repr(groups[g][0].config.get(k)) for k in varying if k not in kind_keys)

    guided = [g for g in groups if g != base and not all(is_baseline(r) for r in groups[g])]
    out = []
    for g in guided:
        if _kind(groups[g][0].config) != REFERENCE_KIND:
            continue
        ctl = [h for h in guided if _kind(groups[h][0].config) in WRONG_MAP_KINDS and rest(h) == rest(g)]
        if ctl:
            out.append((g, ctl))
    return out


def _ci_text(m: float, lo: float, hi: float, fmt: str, ci: float) -> str:
    if math.isnan(m):
        return "not available"
    if math.isnan(lo):
        return f"{fmt.format(m)} (one pair, no interval)"
    return (f"{fmt.format(m)} [{ci:.0%} CI {fmt.format(lo)}, {fmt.format(hi)}], CI "
            f"{'excludes' if _excludes_zero(lo, hi) else 'includes'} 0")


def _time_sentence(r, b) -> str:
    """The verdict's words on a group's wall-clock, against the baseline row ``b`` (module docstring, "Time axes")."""
    ok = _flag(r.get("wall_reliable"))
    if ok is None:
        return ("No cost data (`val/cost_s`) for this group or the baseline: steps only; wall-clock left out, since "
                "its conditions cannot be checked. ")
    if not ok:
        return (f"Wall-clock ratio left out: the runs' contention factors (wall-clock / cost) are "
                f"{_range_text(r['contention_min'], r['contention_max'])} here and "
                f"{_range_text(b['contention_min'], b['contention_max'])} in the baseline, more than "
                f"{WALL_TOLERANCE:.0%} apart, so wall-clock measured the machines' load, not the method. ")
    if math.isnan(r.get("time_ratio", math.nan)):
        return ""
    return (f"Wall-clock {r['time_ratio']:.2f}x the baseline's (reliable: contention factors within "
            f"{WALL_TOLERANCE:.0%}). ")


def verdict(table: pd.DataFrame, groups: dict[str, list[Run]], metric: str, target: float | None,
            base: str | None, higher_is_better: bool | None = None, ci: float = 0.95, n_resamples: int = 10_000,
            bootstrap_seed: int = 0) -> str:
    """Plain-text summary: one paragraph per non-baseline group (steps and cost ratios to the baseline, wall-clock
    only where reliable, paired differences with their CI and whether it excludes 0), then, for each SIFT group
    that has wrong-map controls with otherwise identical settings, how it compares with the best of them: on the
    final value, on per-seed steps to target and on per-seed cost to target (see ``control_comparisons``)."""
    if higher_is_better is None:
        higher_is_better = "loss" not in metric and "div" not in metric
    t = table.set_index("group")
    lab = {g: str(t.loc[g, "label"]) if "label" in t else g for g in t.index}

    def ci_text(m, lo, hi, fmt):
        return _ci_text(m, lo, hi, fmt, ci)

    out = [f"Verdict on `{metric}` ({'higher' if higher_is_better else 'lower'} is better)"
           + (f", target {target:.4f}" if target is not None else "") + "."]
    if base is None:
        out.append("No baseline group among the runs: no ratios or paired differences.")
    else:
        out[0] += f" Baseline: `{lab[base]}` ({base}), {t.loc[base, 'seeds']} seeds."
        if "total_cost_s" in t and t["total_cost_s"].notna().any():
            out[0] += (" Time to target is measured on the cost axis (`val/cost_s`: the compute of the training "
                       "steps, which contention cannot bend); wall-clock only where the runs' conditions were equal.")

    for g in (t.index if base is not None else []):
        if g == base:
            continue
        r = t.loc[g]
        s = f"`{lab[g]}` ({g}; {r['seeds']} seeds): "
        if target is None:
            s += "no target, so no steps or cost ratio. "
        elif math.isnan(r["steps_to_target"]):
            s += f"its seed-averaged curve does not reach the target ({r['seeds_reached']} seeds do on their own). "
        else:
            s += f"reaches the target in {r['steps_ratio']:.2f}x the baseline's steps"
            cr = r.get("cost_ratio", math.nan)
            s += f" and {cr:.2f}x its compute (cost). " if not math.isnan(cr) else ". "
            s += _time_sentence(r, t.loc[base])
        if not r["pairs"] or math.isnan(r["pairs"]):
            s += "No seed in common with the baseline: no paired differences."
        else:
            s += (f"Paired with the baseline over {r['pairs']:.0f} seeds (group − baseline): final "
                  f"{ci_text(r['d_final'], r['d_final_lo'], r['d_final_hi'], '{:+.4f}')}; AUC "
                  f"{ci_text(r['d_auc'], r['d_auc_lo'], r['d_auc_hi'], '{:+.4f}')}")
            if target is not None:
                s += f"; steps to target {ci_text(r['d_steps'], r['d_steps_lo'], r['d_steps_hi'], '{:+.0f}')}"
                if not math.isnan(r.get("d_cost", math.nan)):
                    s += f"; cost to target (s) {ci_text(r['d_cost'], r['d_cost_lo'], r['d_cost_hi'], '{:+.1f}')}"
                if r["steps_censored"]:
                    k = int(r["steps_censored"])
                    s += (f" ({k} of {r['pairs']:.0f} pairs {'has' if k == 1 else 'have'} a seed that does not "
                          "reach the target, counted at its run length"
                          + (" and its run's total cost)" if not math.isnan(r.get("d_cost", math.nan)) else ")"))
            s += "."
            if r["unpaired"]:
                s += f" {r['unpaired']:.0f} run(s) without a seed partner left out."
        out.append(s)

    for c in control_comparisons(table, groups, metric, target, base, higher_is_better, ci, n_resamples,
                                 bootstrap_seed):
        f, g, best = c["final"], c["sift"], c["final"]["control"]
        ctl = c["controls"]
        others = f" (of {len(ctl)}: {', '.join(f'`{lab[h]}`' for h in ctl)})" if len(ctl) > 1 else ""
        out.append(
            f"SIFT vs best wrong-map control: `{lab[g]}` vs `{lab[best]}`{others}, all other settings equal: final "
            f"{f['sift_mean']:.4f} ± {f['sift_std']:.4f} vs {f['control_mean']:.4f} ± {f['control_std']:.4f}, "
            f"difference {f['difference']:+.4f}; paired over {f['pairs']} seeds "
            f"{ci_text(*f['paired'], '{:+.4f}')}; AUC {f['sift_auc']:.4f} vs {f['control_auc']:.4f}, paired "
            f"{ci_text(*f['paired_auc'], '{:+.4f}')}. More than 2x seed std ({abs(f['difference']):.4f} vs 2 × "
            f"{f['pooled_std']:.4f}, pooled sample std)? {'yes' if f['more_than_2std'] else 'no'}.")
        for axis in ("steps", "cost"):
            if c[axis] is not None:
                out.append(_criterion_text(c[axis], lab, target, ci_text))
    return "\n\n".join(out) + "\n"


def control_comparisons(table: pd.DataFrame, groups: dict[str, list[Run]], metric: str, target: float | None,
                        base: str | None, higher_is_better: bool | None = None, ci: float = 0.95,
                        n_resamples: int = 10_000, bootstrap_seed: int = 0) -> list[dict]:
    """For each SIFT group with wrong-map controls (all other settings equal): a dict with ``sift``, ``controls``
    (group keys) and three comparisons. ``final``: against the control with the best final value (means, sample
    stds, difference, pooled sample std, ``more_than_2std`` = |difference| > 2 pooled std, paired CI of final and
    AUC). ``steps`` and ``cost`` (None without a target; ``cost`` None without cost data): per-seed steps (cost)
    to target against the fastest (cheapest) control, see :func:`_against_controls`."""
    if higher_is_better is None:
        higher_is_better = "loss" not in metric and "div" not in metric
    t = table.set_index("group")
    sign = 1 if higher_is_better else -1
    out = []
    for g, ctl in _controls(groups, base):
        best = max(ctl, key=lambda h: sign * t.loc[h, "final_mean"])
        a, b = t.loc[g], t.loc[best]
        diff = float(a["final_mean"] - b["final_mean"])
        pooled = _pooled_sample_std(_seed_column(groups[g], metric, None, higher_is_better, 0),
                                    _seed_column(groups[best], metric, None, higher_is_better, 0))
        p = paired_differences(groups[g], groups[best], metric, target, higher_is_better)
        final = {"control": best, "sift_mean": float(a["final_mean"]), "sift_std": float(a["final_std"]),
                 "control_mean": float(b["final_mean"]), "control_std": float(b["final_std"]), "difference": diff,
                 "pooled_std": pooled, "more_than_2std": bool(abs(diff) > 2 * pooled), "pairs": p["pairs"],
                 "paired": bootstrap_ci(p["final"], ci, n_resamples, bootstrap_seed),
                 "sift_auc": float(a["auc"]), "control_auc": float(b["auc"]),
                 "paired_auc": bootstrap_ci(p["auc"], ci, n_resamples, bootstrap_seed)}
        args = (groups, g, ctl, metric, target, higher_is_better, ci, n_resamples, bootstrap_seed)
        out.append({"sift": g, "controls": list(ctl), "final": final,
                    "steps": _against_controls(*args, "steps") if target is not None else None,
                    "cost": _against_controls(*args, "cost") if target is not None else None})
    return out


def _seed_table(runs: list[Run], metric: str, target: float | None, higher_is_better: bool) -> np.ndarray:
    """``_seed_stats`` as an array (seeds, 5): columns 0 final, 1 AUC, 2 steps to target, 3 target not reached (1.0
    when a run of that seed never reaches it), 4 cost to target (s)."""
    return np.array(list(_seed_stats(runs, metric, target, higher_is_better).values()), float).reshape(-1, 5)


def _seed_column(runs: list[Run], metric: str, target: float | None, higher_is_better: bool, i: int) -> np.ndarray:
    """Column ``i`` of :func:`_seed_table`: one per-seed statistic as an array over seeds."""
    return _seed_table(runs, metric, target, higher_is_better)[:, i]


def _sample_std(x: np.ndarray) -> float:
    """Sample std over seeds (ddof=1), the spread every table and criterion uses; 0 for a single seed."""
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def _pooled_sample_std(a: np.ndarray, b: np.ndarray) -> float:
    """sqrt of the mean of the two groups' sample variances (ddof=1; nan when a group has one seed)."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)


AXIS_COLUMN = {"steps": 2, "cost": 4}  # the per-seed column of each time axis in _seed_table


def _against_controls(groups, g, ctl, metric, target, higher_is_better, ci, n_resamples, bootstrap_seed,
                      axis: str = "steps") -> dict | None:
    """The convergence criterion on one time axis (``steps`` or ``cost``): SIFT's per-seed steps (cost) to target
    against the fastest (cheapest) wrong-map control, a seed that never reaches the target counted at its run
    length (its run's total cost), with the 2x-seed-std test on the difference: ``beats_by_2std`` is True when
    SIFT needs less than the control by more than twice their pooled sample std (None with fewer than 2 seeds a
    side). None on the cost axis when a run has no cost data."""
    col = AXIS_COLUMN[axis]
    # per seed: (final, AUC, steps to target, not reached, cost to target), computed once per group
    stats = {h: _seed_table(groups[h], metric, target, higher_is_better) for h in [g, *ctl]}
    if axis == "cost" and any(not np.isfinite(stats[h][:, col]).all() or not len(stats[h]) for h in [g, *ctl]):
        return None
    fastest = min(ctl, key=lambda h: stats[h][:, col].mean())
    a, b = stats[g][:, col], stats[fastest][:, col]
    out = {"axis": axis, "sift": g, "control": fastest, "reached_by_neither":
           all(len(stats[h]) and stats[h][:, 3].all() for h in (g, fastest))}
    if out["reached_by_neither"]:
        return out
    diff = float(a.mean() - b.mean())
    pooled = _pooled_sample_std(a, b)
    p = paired_differences(groups[g], groups[fastest], metric, target, higher_is_better)
    out.update(sift_mean=float(a.mean()), sift_std=_sample_std(a), sift_seeds=len(a), control_mean=float(b.mean()),
               control_std=_sample_std(b), control_seeds=len(b), difference=diff, pooled_std=pooled,
               pairs=p["pairs"], paired=bootstrap_ci(p[axis], ci, n_resamples, bootstrap_seed),
               beats_by_2std=None if math.isnan(pooled) else bool(-diff > 2 * pooled))  # less is better
    return out


def _criterion_text(c: dict, lab: dict, target: float, ci_text) -> str:
    """One paragraph of the verdict from :func:`_against_controls`."""
    g, ref = c["sift"], c["control"]
    steps = c["axis"] == "steps"
    what, ctl, fmt = ("Steps", "fastest", "{:.0f}") if steps else ("Cost", "cheapest", "{:.1f}")
    unit = "" if steps else " s"
    if c["reached_by_neither"]:
        return (f"{what} to target {target:.4f}, SIFT vs the {ctl} wrong-map control: neither `{lab[g]}` nor "
                f"`{lab[ref]}` reaches the target in any seed, so there {'are no steps' if steps else 'is no cost'} "
                "to compare.")

    def sd(n, x):
        return f" ± {fmt.format(x)}" if n > 1 else ""
    beats = "n/a (needs 2 seeds each)" if c["beats_by_2std"] is None else ("yes" if c["beats_by_2std"] else "no")
    counted = "its run length" if steps else "its run's total cost"
    return (f"{what} to target {target:.4f}, SIFT vs the {ctl} wrong-map control: `{lab[g]}` "
            f"{fmt.format(c['sift_mean'])}{sd(c['sift_seeds'], c['sift_std'])}{unit} vs `{lab[ref]}` "
            f"{fmt.format(c['control_mean'])}{sd(c['control_seeds'], c['control_std'])}{unit} (per seed, mean ± "
            f"sample std; a seed that does not reach the target counts at {counted}), difference "
            f"{('{:+' + fmt[2:]).format(c['difference'])}{unit}; paired over {c['pairs']} seeds "
            f"{ci_text(*c['paired'], '{:+' + fmt[2:])}. {'Fewer' if steps else 'Less'} by more than 2x seed std "
            f"({fmt.format(abs(c['difference']))} vs 2 × {fmt.format(c['pooled_std'])}, pooled sample std)? {beats}.")


def _json_value(v):
    """JSON-ready: numpy scalars to Python, nan to None, tuples to lists."""
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_json_value(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else float(v)
    return v


def _interval(m: float, lo: float, hi: float, better_if_positive: bool | None = None) -> dict:
    out = {"mean": m, "lo": lo, "hi": hi, "excludes_zero": _excludes_zero(lo, hi)}
    if better_if_positive is not None:  # the CI excludes 0 in the better direction
        out["better"] = bool(lo > 0) if better_if_positive else bool(hi < 0)
    return out


def verdict_data(table: pd.DataFrame, groups: dict[str, list[Run]], metric: str, target: float | None,
                 base: str | None, higher_is_better: bool | None = None, ci: float = 0.95,
                 n_resamples: int = 10_000, bootstrap_seed: int = 0) -> dict:
    """The verdict in machine-readable form (``verdict.json``; nan written as null).

    Keys: ``metric``, ``higher_is_better``, ``target``, ``ci``, ``n_resamples``, ``baseline`` (label or None),
    ``wall_tolerance``; ``groups``: one dict per group with ``label``, ``description``, ``kind`` (the relevance map:
    ``sift``, a wrong-map control, or "" for the baseline), ``is_baseline``, ``runs`` (directories), ``seeds``,
    ``final_mean``/``final_std``, ``auc``, ``steps_to_target``, ``cost_to_target_s``, ``steps_ratio``,
    ``cost_ratio``, ``wall_reliable``, ``contention`` (per run), ``time_to_target_s``/``time_ratio`` (null unless
    ``wall_reliable``) and ``paired`` (to the baseline: ``pairs``, ``steps_censored`` and for final, auc, steps,
    cost an interval ``mean``/``lo``/``hi``/``excludes_zero``, final also ``better``: the CI excludes 0 in the
    better direction); ``controls``: :func:`control_comparisons` with labels for group keys and intervals as dicts.
    """
    if higher_is_better is None:
        higher_is_better = "loss" not in metric and "div" not in metric
    t = table.set_index("group")
    lab = {g: str(t.loc[g, "label"]) if "label" in t else g for g in t.index}
    out_groups = []
    for g, rs in groups.items():
        r = t.loc[g]
        reliable = _flag(r.get("wall_reliable"))
        d = {"label": lab[g], "description": g, "kind": _kind(rs[0].config) if not all(is_baseline(x) for x in rs)
             else "", "is_baseline": g == base, "runs": [str(x.path) for x in rs],
             "seeds": sorted({x.seed for x in rs if x.seed is not None}, key=repr), "n_runs": len(rs),
             **{k: r.get(k, math.nan) for k in ("final_mean", "final_std", "auc", "steps_to_target",
                                                "cost_to_target_s", "steps_ratio", "cost_ratio", "total_cost_s")},
             "wall_reliable": reliable, "contention": [contention(x, metric) for x in rs],
             "time_to_target_s": r["time_to_target_s"] if reliable else math.nan,
             "time_ratio": r.get("time_ratio", math.nan) if reliable else math.nan}
        if base is not None and g != base:
            d["paired"] = {"pairs": r["pairs"], "steps_censored": r["steps_censored"], **{
                n: _interval(r[f"d_{n}"], r[f"d_{n}_lo"], r[f"d_{n}_hi"],
                             (higher_is_better if n in ("final", "auc") else False))
                for n in ("final", "auc", "steps", "cost")}}
        out_groups.append(d)
    comps = []
    for c in control_comparisons(table, groups, metric, target, base, higher_is_better, ci, n_resamples,
                                 bootstrap_seed):
        f = dict(c["final"], control=lab[c["final"]["control"]], paired=_interval(*c["final"]["paired"]),
                 paired_auc=_interval(*c["final"]["paired_auc"]))
        axes = {}
        for axis in ("steps", "cost"):
            a = c[axis]
            if a is not None:
                a = dict(a, sift=lab[a["sift"]], control=lab[a["control"]])
                if "paired" in a:
                    a["paired"] = _interval(*a["paired"])
            axes[axis] = a
        comps.append({"sift": lab[c["sift"]], "controls": [lab[h] for h in c["controls"]], "final": f, **axes})
    return _json_value({"metric": metric, "higher_is_better": higher_is_better, "target": target,
                        "ci": ci, "n_resamples": n_resamples, "baseline": lab[base] if base is not None else None,
                        "wall_tolerance": WALL_TOLERANCE, "groups": out_groups, "controls": comps})


def plot(groups: dict[str, list[Run]], metric: str, target: float | None, path: Path,
         labels: dict[str, str] | None = None, wall_reliable: dict[str, bool | None] | None = None) -> None:
    """``curves.png``: the metric against optimizer steps, against cost (when every group has cost data) and
    against wall-clock (only when it is reliable for every group, see ``wall_clock_reliable``; computed against
    the first baseline group when ``wall_reliable`` is not given). Mean line over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or group_labels(groups)
    if wall_reliable is None:
        base = next((g for g, rs in groups.items() if all(is_baseline(r) for r in rs)), None)
        wall_reliable = wall_clock_reliable(groups, metric, base)
    has_cost = all(np.isfinite(r.curve(metric)["cost"]).all() for rs in groups.values() for r in rs)
    axes_x = [("step", "optimizer steps")]
    if has_cost:
        axes_x.append(("cost", "training compute, cost (s)"))
    if all(v is True for v in wall_reliable.values()):
        axes_x.append(("time", "training wall-clock (s)"))
    ncol = min(3, len(groups))
    legend_h = 0.2 * math.ceil(len(groups) / ncol) + 0.2  # legend below the plots
    fig, axes = plt.subplots(1, len(axes_x), figsize=(6.5 * len(axes_x), 4.8 + legend_h), squeeze=False)
    axes = axes[0]
    for g, rs in groups.items():
        curves = [r.curve(metric) for r in rs]
        steps = np.unique(np.concatenate([c["step"].to_numpy() for c in curves]))
        vals = np.stack([np.interp(steps, c["step"], c["value"], right=np.nan) for c in curves])
        mean, lo, hi = np.nanmean(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0)
        color = None
        for ax, (col, _) in zip(axes, axes_x):
            x = steps if col == "step" else np.nanmean(
                np.stack([np.interp(steps, c["step"], c[col], right=np.nan) for c in curves]), 0)
            (line,) = ax.plot(x, mean, color=color, label=f"{labels.get(g, g)} (n={len(rs)})")
            color = line.get_color()
            ax.fill_between(x, lo, hi, alpha=0.2, color=color)
    for ax, (_, xl) in zip(axes, axes_x):
        if target is not None:
            ax.axhline(target, color="k", ls="--", lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    left_out = [] if has_cost else ["cost: no cost data"]
    if axes_x[-1][0] != "time":
        left_out.append("wall-clock: " + ("unreliable (contention)" if any(v is False for v in wall_reliable.values())
                                          else "not checkable without cost data"))
    fig.suptitle(f"{metric}: mean over seeds, band = min..max" + (" ; dashed = target" if target is not None else "")
                 + (f"\nleft out: {'; '.join(left_out)}" if left_out else ""))
    fig.tight_layout(rect=(0, legend_h / (4.8 + legend_h), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m siftguide.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories or folders containing them")
    ap.add_argument("--metric", default="val/acc")
    ap.add_argument("--target", type=float, default=None, help="default: the baseline's mean final value")
    ap.add_argument("--lower-is-better", action="store_true", help="for loss-like metrics (auto for '*loss*')")
    ap.add_argument("--baseline", default=None,
                    help="text in the description or label of the baseline group, when several groups run "
                         "without guidance")
    ap.add_argument("--ci", type=float, default=0.95, help="confidence level of the bootstrap intervals")
    ap.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    ap.add_argument("--bootstrap-seed", type=int, default=0, help="RNG seed of the bootstrap (tables regenerate "
                                                                  "identically)")
    ap.add_argument("--verdict", action="store_true", help="also print a plain-text verdict, written to verdict.md "
                                                            "(and verdict.json, machine-readable)")
    ap.add_argument("--out", default="compare_out")
    args = ap.parse_args(argv)
    runs = load_runs(args.runs)
    groups = group_runs(runs)
    hib = False if args.lower_is_better else None
    boot = dict(ci=args.ci, n_resamples=args.resamples)
    try:
        table, target, base, notes = summarize(groups, args.metric, args.target, hib, args.baseline, **boot,
                                               bootstrap_seed=args.bootstrap_seed)
    except ValueError as e:
        ap.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(table, args.metric, target, base, **boot)
    (out / "table.md").write_text(md + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    table.to_csv(out / "table.csv", index=False)
    plot(groups, args.metric, target, out / "curves.png", dict(zip(table["group"], table["label"])),
         {g: _flag(v) for g, v in zip(table["group"], table["wall_reliable"])})
    print(f"{len(runs)} runs in {len(groups)} groups")
    print(md)
    for n in notes:
        print("note:", n)
    written = [out / "curves.png", out / "table.md", out / "table.csv"]
    if args.verdict:
        text = verdict(table, groups, args.metric, target, base, hib, **boot, bootstrap_seed=args.bootstrap_seed)
        (out / "verdict.md").write_text(text)
        data = verdict_data(table, groups, args.metric, target, base, hib, **boot, bootstrap_seed=args.bootstrap_seed)
        (out / "verdict.json").write_text(json.dumps(data, indent=1) + "\n")
        print(text)
        written += [out / "verdict.md", out / "verdict.json"]
    print(f"wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
