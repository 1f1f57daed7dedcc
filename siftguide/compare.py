"""Compare convergence across runs: ``python -m siftguide.compare RUN_DIR [RUN_DIR ...] --out DIR``.

Each RUN_DIR is a run directory (``metrics.csv`` + ``config.yaml`` or ``.hydra/config.yaml``) or any folder
above run directories (a multirun sweep). Runs are grouped by the config values that differ between them
(seed, paths and logging excluded), with seeds pooled. For each group:

* final metric (mean and std over seeds);
* steps-to-target and time-to-target of the group's seed-averaged curve (mean metric and mean training
  wall-clock ``val/elapsed_s`` at each validation step): the first point where it reaches the target, linearly
  interpolated between validations. With the default target the baseline's mean curve reaches it at the latest
  at its last validation. The spread is shown per seed: how many seeds reach the target on their own curve, and
  the min..max of their steps-to-target;
* ratios to the baseline group (guidance weight 0): < 1 means faster than the baseline.

The target defaults to the baseline group's mean final value. Writes ``curves.png`` (metric against steps and
against wall-clock; mean line, min-max band over seeds), ``table.md`` and ``table.csv`` into ``--out``.
Needs no wandb account: everything is read from the run directories.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

__all__ = ["Run", "load_runs", "group_runs", "reach", "summarize", "main"]

# config keys that never define a group: seeds, where things are written, how they are logged
IGNORED_PREFIXES = ("seed", "guidance.target.seed", "paths.", "hydra.", "logger.", "ckpt_path", "task_name",
                    "trainer.default_root_dir", "data.cache_dir", "guidance.cache_dir", "trainer.enable_progress_bar",
                    "trainer.enable_model_summary", "optimized_metric", "test")


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
        """Validation curve: columns ``step``, ``time``, ``value`` (one row per validation), sorted by step."""
        if metric not in self.curves:
            m = self.metrics
            if metric not in m.columns:
                raise KeyError(f"{self.path}: metric {metric!r} not in metrics.csv (has: "
                               f"{', '.join(c for c in m.columns if '/' in c)})")
            rows = m[m[metric].notna()]
            step = rows["val/step"] if "val/step" in rows and rows["val/step"].notna().all() else rows["step"]
            time = rows["val/elapsed_s"] if "val/elapsed_s" in rows else pd.Series(np.nan, index=rows.index)
            df = pd.DataFrame({"step": step.to_numpy(float), "time": time.to_numpy(float),
                               "value": rows[metric].to_numpy(float)})
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
            runs.append(Run(f.parent, _flatten(_read_config(f.parent)), pd.read_csv(f)))
    return runs


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Group runs by the config values that differ between them (ignoring seeds, paths, logging).

    A key that only some runs have (an option added after older runs were made) differs only if the runs that
    have it disagree: runs made before the option existed are grouped with runs that use its default.
    """
    keys = sorted({k for r in runs for k in r.config})
    varying = []
    for k in keys:
        if k.startswith(IGNORED_PREFIXES):
            continue
        values = {repr(r.config[k]) for r in runs if k in r.config}
        if len(values) > 1:
            varying.append(k)
    groups: dict[str, list[Run]] = {}
    for r in runs:
        label = ", ".join(f"{k}={_fmt(r.config.get(k))}" for k in varying) or "all runs"
        groups.setdefault(label, []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: _sort_key(kv[1][0])))


def _fmt(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _sort_key(run: Run):
    w = run.config.get("guidance.weight", 0.0)
    return (0 if is_baseline(run) else 1, str(run.config.get("guidance.target.kind", "")), float(w or 0.0))


def is_baseline(run: Run) -> bool:
    return float(run.config.get("guidance.weight", 0.0) or 0.0) == 0.0


def reach(curve: pd.DataFrame, target: float, higher_is_better: bool = True) -> tuple[float, float]:
    """(step, time) where the curve first reaches ``target``, linearly interpolated between the validation before
    and the one at which it is reached; ``(nan, nan)`` if never reached."""
    v = curve["value"].to_numpy()
    s = curve["step"].to_numpy()
    t = curve["time"].to_numpy()
    ok = v >= target if higher_is_better else v <= target
    if not ok.any():
        return math.nan, math.nan
    i = int(np.argmax(ok))
    if i == 0 or v[i] == v[i - 1]:
        return float(s[i]), float(t[i])
    f = (target - v[i - 1]) / (v[i] - v[i - 1])
    return float(s[i - 1] + f * (s[i] - s[i - 1])), float(t[i - 1] + f * (t[i] - t[i - 1]))


def mean_curve(runs: list[Run], metric: str) -> pd.DataFrame:
    """Seed-averaged validation curve (``step``, ``time``, ``value``) on the validation steps all runs share."""
    curves = [r.curve(metric).set_index("step") for r in runs]
    steps = sorted(set.intersection(*(set(c.index) for c in curves)))
    if not steps:
        raise ValueError(f"runs {[str(r.path) for r in runs]} share no validation step for {metric}")
    return pd.DataFrame({"step": steps, "time": [np.mean([c.loc[s, "time"] for c in curves]) for s in steps],
                         "value": [np.mean([c.loc[s, "value"] for c in curves]) for s in steps]})


def summarize(groups: dict[str, list[Run]], metric: str, target: float | None = None,
              higher_is_better: bool | None = None,
              baseline: str | None = None) -> tuple[pd.DataFrame, float | None, str | None, list[str]]:
    """Table of final metric, steps/time to target and ratios to the baseline.

    ``baseline``: text that picks one of several guidance-weight-0 groups by its label (e.g.
    ``trainer.max_steps=500``). Returns (table, target used, baseline group label or None, notes).
    """
    if higher_is_better is None:
        higher_is_better = "loss" not in metric and "div" not in metric
    notes = []
    baselines = [g for g, rs in groups.items() if all(is_baseline(r) for r in rs)]
    if baseline is not None:
        chosen = [g for g in baselines if baseline in g]
        if len(chosen) != 1:
            raise ValueError(f"--baseline {baseline!r} must match exactly one guidance-weight-0 group, matched "
                             f"{len(chosen)}; the weight-0 groups are {baselines}")
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
    rows = []
    for g, rs in groups.items():
        nan2 = (math.nan, math.nan)
        step, time = reach(mean_curve(rs, metric), target, higher_is_better) if target is not None else nan2
        seeds = np.array([reach(r.curve(metric), target, higher_is_better)[0] if target is not None else math.nan
                          for r in rs])
        hit = seeds[~np.isnan(seeds)]
        rows.append({
            "group": g, "seeds": len(rs), "final_mean": finals[g].mean(), "final_std": finals[g].std(ddof=0),
            "steps_to_target": step, "time_to_target_s": time,
            "seeds_reached": f"{len(hit)}/{len(rs)}",
            "seed_steps_min": hit.min() if len(hit) else math.nan,
            "seed_steps_max": hit.max() if len(hit) else math.nan,
            "total_time_s": float(np.mean([r.curve(metric)["time"].iloc[-1] for r in rs])),
        })
        if target is not None and math.isnan(step):
            notes.append(f"'{g}': its mean curve never reaches the target {target:.4f}")
    table = pd.DataFrame(rows)
    if base is not None:
        b = table.set_index("group").loc[base]
        table["steps_ratio"] = table["steps_to_target"] / b["steps_to_target"]
        table["time_ratio"] = table["time_to_target_s"] / b["time_to_target_s"]
        table["final_delta"] = table["final_mean"] - b["final_mean"]
    return table, target, base, notes


def to_markdown(table: pd.DataFrame, metric: str, target: float | None, base: str | None) -> str:
    head = (f"metric `{metric}`, target {target:.4f}" if target is not None else f"metric `{metric}`, no target") \
        + (f", baseline `{base}`" if base else ", no baseline")

    lines = [head, "", "| group | seeds | final (mean ± std) | steps to target (mean curve) | time to target (s) "
             "| steps ratio | time ratio | seeds reaching target (steps min..max) |",
             "|---|---|---|---|---|---|---|---|"]

    def num(v, fmt):
        return "not reached" if math.isnan(v) else fmt.format(v)

    for _, r in table.iterrows():
        sr = r.get("steps_ratio", math.nan)
        tr = r.get("time_ratio", math.nan)
        spread = r["seeds_reached"] + ("" if math.isnan(r["seed_steps_min"]) else
                                       f" ({r['seed_steps_min']:.0f}..{r['seed_steps_max']:.0f})")
        lines.append(
            f"| {r['group']} | {r['seeds']} | {r['final_mean']:.4f} ± {r['final_std']:.4f} | "
            f"{num(r['steps_to_target'], '{:.0f}')} | {num(r['time_to_target_s'], '{:.1f}')} | "
            f"{'—' if math.isnan(sr) else f'{sr:.2f}'} | {'—' if math.isnan(tr) else f'{tr:.2f}'} | {spread} |")
    return "\n".join(lines) + "\n"


def plot(groups: dict[str, list[Run]], metric: str, target: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legend_h = 0.2 * len(groups) + 0.2  # legend below the plots, one group per row (labels can be long)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8 + legend_h))
    for g, rs in groups.items():
        curves = [r.curve(metric) for r in rs]
        steps = np.unique(np.concatenate([c["step"].to_numpy() for c in curves]))
        vals = np.stack([np.interp(steps, c["step"], c["value"], right=np.nan) for c in curves])
        times = np.stack([np.interp(steps, c["step"], c["time"], right=np.nan) for c in curves])
        mean, lo, hi = np.nanmean(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0)
        (line,) = axes[0].plot(steps, mean, label=f"{g} (n={len(rs)})")
        axes[0].fill_between(steps, lo, hi, alpha=0.2, color=line.get_color())
        axes[1].plot(np.nanmean(times, 0), mean, color=line.get_color())
        axes[1].fill_between(np.nanmean(times, 0), lo, hi, alpha=0.2, color=line.get_color())
    for ax, xl in zip(axes, ("optimizer steps", "training wall-clock (s)")):
        if target is not None:
            ax.axhline(target, color="k", ls="--", lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=1, fontsize=8, frameon=False)
    fig.suptitle(f"{metric}: mean over seeds, band = min..max" + (" ; dashed = target" if target is not None else ""))
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
                    help="text in the label of the baseline group, when several groups have guidance weight 0")
    ap.add_argument("--out", default="compare_out")
    args = ap.parse_args(argv)
    runs = load_runs(args.runs)
    groups = group_runs(runs)
    hib = False if args.lower_is_better else None
    try:
        table, target, base, notes = summarize(groups, args.metric, args.target, hib, args.baseline)
    except ValueError as e:
        ap.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(table, args.metric, target, base)
    (out / "table.md").write_text(md + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    table.to_csv(out / "table.csv", index=False)
    plot(groups, args.metric, target, out / "curves.png")
    print(f"{len(runs)} runs in {len(groups)} groups")
    print(md)
    for n in notes:
        print("note:", n)
    print(f"wrote {out / 'curves.png'}, {out / 'table.md'}, {out / 'table.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
