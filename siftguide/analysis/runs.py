"""Run discovery and grouping for ``compare``: run directories, their configs, groups, labels, baselines.

A run directory holds ``metrics.csv`` and its resolved config (``config.yaml`` or ``.hydra/config.yaml``).
:func:`group_runs` groups runs by the config values that differ between them (seeds, paths and logging excluded),
:func:`group_labels` gives each group a short label, :func:`is_baseline` tells which runs train without guidance and
:func:`matched_controls` pairs each SIFT group with its wrong-map controls (same settings but the map kind).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

__all__ = ["Run", "load_runs", "group_runs", "group_labels", "is_baseline", "varying_keys", "map_kind",
           "matched_controls", "IGNORED_PREFIXES", "LABEL_ALIASES", "GUIDANCE_PREFIXES", "BASELINE_NAMES", "KIND_KEYS",
           "REFERENCE_KIND", "WRONG_MAP_KINDS", "MODE_TARGET_PREFIX"]

# config keys that never define a group: seeds, where things are written, how they are logged
IGNORED_PREFIXES = ("seed", "guidance.target.seed", "relevance.seed", "paths.", "hydra.", "logger.", "ckpt_path",
                    "task_name", "trainer.default_root_dir", "data.cache_dir", "guidance.cache_dir",
                    "relevance.cache_dir", "trainer.enable_progress_bar", "trainer.enable_model_summary",
                    "optimized_metric", "test", "callbacks.checkpoint.", "callbacks.progress.")

# How a config key reads in a group label, matched on the key's last components (the longest match wins):
# "" = the value alone (names that read as words: "sift", "token_drop", "cosine"), other text = a short prefix
# ("w=1"). A key matched by none shows as "<last component>=<value>". The order here is the order in a label.
LABEL_ALIASES: dict[str, str] = {
    "relevance.kind": "", "target.kind": "", "guidance._name": "", "guidance.name": "", "guidance.modes": "",
    "guidance.mode": "", "objective._name": "", "objective.name": "", "_name": "", "kind": "", "mode": "",
    "modes": "", "guidance.weight": "w", "token_drop.keep_ratio": "keep", "prior.beta": "beta",
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


CONF = Path(__file__).resolve().parents[1] / "conf"
_UNKNOWN = object()


@functools.lru_cache(maxsize=None)
def declared_default(key: str):
    """The value this package's config files give ``key`` (``guidance.token_drop.budget`` -> ``token_drop.budget`` in
    the option files of ``conf/guidance/``, or the key in ``train.yaml``), or ``_UNKNOWN`` when none gives a plain value
    or they disagree: what a run made before the key existed used, if the key only added an option."""
    root, _, rest = key.partition(".")
    group = CONF / root
    sources = [(f, rest) for f in sorted(group.glob("*.yaml"))] if group.is_dir() and rest else []
    found = {}
    for f, path in [*sources, (CONF / "train.yaml", key)]:
        node = yaml.safe_load(f.read_text()) or {}
        for part in path.split("."):
            node = node.get(part, _UNKNOWN) if isinstance(node, dict) else _UNKNOWN
        if node is not _UNKNOWN and not (isinstance(node, str) and "${" in node):
            node = tuple(node) if isinstance(node, list) else node  # as flattened run configs hold lists
            found[repr(node)] = node
    return next(iter(found.values())) if len(found) == 1 else _UNKNOWN


def _has_parent(config: dict, key: str) -> bool:
    """Whether the run's config holds the node ``key`` belongs to (another key under the same parent)."""
    parent = key.rpartition(".")[0] + "."
    return parent != "." and any(k.startswith(parent) for k in config)


def _value(config: dict, key: str):
    """``config[key]``; for a key the run's config lacks although it holds the key's node (made before the option
    existed), the declared default; else None."""
    if key in config:
        return config[key]
    default = declared_default(key) if _has_parent(config, key) else _UNKNOWN
    return None if default is _UNKNOWN else default


def varying_keys(runs: list[Run]) -> list[str]:
    """Config keys (seeds, paths, logging excluded) on which the runs disagree. A run that lacks a key but holds its
    node (made before the option existed) counts with the key's declared default (:func:`declared_default`); runs
    without the node (another mode), or keys with no declared default, are left out of the comparison."""
    keys = sorted({k for r in runs for k in r.config})
    varying = []
    for k in keys:
        if k.startswith(IGNORED_PREFIXES):
            continue
        # guidance.modes is derived (``_with_modes``): a run without it uses no mode, which is a value of its own
        known = declared_default(k) is not _UNKNOWN
        values = {repr(_value(r.config, k)) for r in runs
                  if k in r.config or k == "guidance.modes" or (known and _has_parent(r.config, k))}
        if len(values) > 1:
            varying.append(k)
    return varying


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Group runs by the config values that differ between them (ignoring seeds, paths, logging).

    The dict keys are the full descriptions (``guidance.target.kind=sift, guidance.weight=1``); ``group_labels``
    gives each group its short label. A key that only some runs have (an option added after older runs were
    made) counts with its declared default in the runs without it: runs made before the option existed are grouped
    with runs that use the default, never with runs that set another value.
    """
    varying = varying_keys(runs)
    groups: dict[str, list[Run]] = {}
    for r in runs:
        label = ", ".join(f"{k}={_fmt(_value(r.config, k))}" for k in varying) or "all runs"
        groups.setdefault(label, []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: _sort_key(kv[1][0])))


def _fmt(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def map_kind(config: dict) -> str:
    return next((str(config[k]) for k in KIND_KEYS if config.get(k) is not None), "")


def _sort_key(run: Run):
    w = run.config.get("guidance.weight", 0.0)
    try:
        w = float(w or 0.0)
    except (TypeError, ValueError):
        w = 0.0
    return (0 if is_baseline(run) else 1, map_kind(run.config), w)


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
    varying = varying_keys(runs)
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


def matched_controls(groups: dict[str, list[Run]], base: str | None) -> list[tuple[str, list[str]]]:
    """(SIFT group, [wrong-map control groups]) pairs that share every varying config value but the map kind."""
    runs = [r for rs in groups.values() for r in rs]
    varying = varying_keys(runs)
    kind_keys = [k for k in varying if k in KIND_KEYS]
    if not kind_keys:
        return []

    def rest(g):
        return tuple(repr(groups[g][0].config.get(k)) for k in varying if k not in kind_keys)

    guided = [g for g in groups if g != base and not all(is_baseline(r) for r in groups[g])]
    out = []
    for g in guided:
        if map_kind(groups[g][0].config) != REFERENCE_KIND:
            continue
        ctl = [h for h in guided if map_kind(groups[h][0].config) in WRONG_MAP_KINDS and rest(h) == rest(g)]
        if ctl:
            out.append((g, ctl))
    return out
