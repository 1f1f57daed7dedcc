"""Statistics of validation curves for ``compare``: time to target on the step, cost and wall-clock axes, area
under the curve, per-seed values, paired differences with bootstrap intervals, the contention check of
wall-clock, the summary table and the SIFT-vs-control criteria.

Spreads are sample standard deviations over seeds (ddof=1) everywhere. The time axes and the wall-clock
reliability rule are defined in :mod:`siftguide.analysis.compare` ("Time axes").
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .runs import Run, group_labels, is_baseline, matched_controls

__all__ = ["reach", "mean_curve", "improved", "auc", "paired_differences", "bootstrap_ci", "contention",
           "step_cost", "drift", "wall_clock_reliable", "wall_flag", "summarize", "control_comparisons", "seed_table",
           "WALL_TOLERANCE", "DRIFT_TOLERANCE"]

# wall-clock figures are shown only when every run's contention factor (wall-clock / cost) is within this relative
# distance of the baseline runs' median factor (see the module docstring, "Time axes")
WALL_TOLERANCE = 0.10
# the runs of one setting do the same work per step: when their compute per step differs by more than this share,
# the machine's speed changed between them and per-seed costs carry that drift (see ``step_cost``)
DRIFT_TOLERANCE = 0.10

AXIS_COLUMN = {"steps": 2, "cost": 4}  # the per-seed column of each time axis in seed_table


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


def improved(curve: pd.DataFrame, higher_is_better: bool) -> bool | None:
    """Whether a validation curve ends better than its first validation (None with fewer than two points). A
    baseline that did not improve learned nothing measurable on the metric in its run: a target set from its final
    value is then met by the baseline at its first validation, and speed ratios against it say nothing. A tie counts
    as not improved (a metric saturated from the first validation: validate earlier); a flat, noisy curve that ends a
    hair above its start counts as improved (no noise tolerance: the seed spread and the controls judge that).

    >>> improved(pd.DataFrame({"step": [50, 100, 300], "value": [0.33, 0.32, 0.30]}), higher_is_better=True)
    False
    """
    v = curve["value"].to_numpy(float)
    if len(v) < 2 or np.isnan(v[[0, -1]]).any():
        return None
    return bool(v[-1] > v[0]) if higher_is_better else bool(v[-1] < v[0])


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


def seed_table(runs: list[Run], metric: str, target: float | None, higher_is_better: bool) -> np.ndarray:
    """``_seed_stats`` as an array (seeds, 5): columns 0 final, 1 AUC, 2 steps to target, 3 target not reached (1.0
    when a run of that seed never reaches it), 4 cost to target (s)."""
    return np.array(list(_seed_stats(runs, metric, target, higher_is_better).values()), float).reshape(-1, 5)


def _seed_column(runs: list[Run], metric: str, target: float | None, higher_is_better: bool, i: int) -> np.ndarray:
    """Column ``i`` of :func:`seed_table`: one per-seed statistic as an array over seeds."""
    return seed_table(runs, metric, target, higher_is_better)[:, i]


def _sample_std(x: np.ndarray) -> float:
    """Sample std over seeds (ddof=1), the spread every table and criterion uses; 0 for a single seed."""
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def _pooled_sample_std(a: np.ndarray, b: np.ndarray) -> float:
    """sqrt of the mean of the two groups' sample variances (ddof=1; nan when a group has one seed)."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)


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
    return _last_ratio(run, metric, "time", "cost")


def _last_ratio(run: Run, metric: str, num: str, den: str) -> float:
    """``num / den`` of the run's curve at its last validation with both logged and ``den > 0``; nan without one."""
    c = run.curve(metric)
    ok = np.isfinite(c[num]) & np.isfinite(c[den]) & (c[den] > 0)
    if not ok.any():
        return math.nan
    last = c[ok].iloc[-1]
    return float(last[num] / last[den])


def step_cost(run: Run, metric: str) -> float:
    """A run's compute per training step: ``val/cost_s / val/step`` at its last validation with both logged; nan
    without cost data. The runs of one setting do the same work per step, so their step costs agree unless the
    machine itself ran slower for some of them (another tenant on the host's cores, a clock change): a drift that the
    contention factor cannot see, since wall-clock and cost slow down together."""
    return _last_ratio(run, metric, "cost", "step")


def drift(step_costs) -> float:
    """How far the runs' compute per step (:func:`step_cost`) spreads: max / min - 1 (0: equal; nan without cost
    data for every run)."""
    f = np.asarray(step_costs, float)
    f = f[np.isfinite(f)]
    return float(f.max() / f.min() - 1) if len(f) else math.nan


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


def wall_flag(v) -> bool | None:
    """A ``wall_reliable`` cell as True, False or None (unknown; also nan, as read back from a table)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return bool(v)


def bootstrap_ci(diffs, ci: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): mean of ``diffs`` (n,) and its percentile bootstrap interval: ``scipy.stats.bootstrap``
    of the mean, ``method="percentile"``, resampling the n values with replacement ``n_resamples`` times from
    ``numpy.random.default_rng(seed)``, so the result is reproducible. With fewer than 2 finite values the interval
    is (nan, nan).

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0, 1.0)
    """
    from scipy import stats

    d = np.asarray(diffs, float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return math.nan, math.nan, math.nan
    if len(d) < 2:
        return float(d.mean()), math.nan, math.nan
    kw = dict(n_resamples=n_resamples, confidence_level=ci, method="percentile", vectorized=True)
    try:
        res = stats.bootstrap((d,), np.mean, rng=np.random.default_rng(seed), **kw)
    except TypeError:  # scipy < 1.15 names the generator random_state
        res = stats.bootstrap((d,), np.mean, random_state=np.random.default_rng(seed), **kw)
    lo, hi = res.confidence_interval
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
    ``contention`` (mean of the runs' wall/cost factors) with ``contention_min/max``, ``step_cost_min/max`` and
    ``cost_drift`` (the runs' compute per step, :func:`step_cost`, and its spread, :func:`drift`),
    ``wall_reliable`` (see ``wall_clock_reliable``: True, False, None = no cost data), ``improved`` (see
    :func:`improved`: the seed-averaged curve ends better than it starts; None with one validation); with a baseline
    also ``steps_ratio``, ``cost_ratio``, ``time_ratio`` (raw: read it only where ``wall_reliable`` is True),
    ``final_delta``, ``pairs``,
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
        per_step = np.array([step_cost(r, metric) for r in rs])
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
            "step_cost_min": float(np.nanmin(per_step)) if np.isfinite(per_step).any() else math.nan,
            "step_cost_max": float(np.nanmax(per_step)) if np.isfinite(per_step).any() else math.nan,
            "cost_drift": drift(per_step),
            "improved": improved(mc, higher_is_better),
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
        if g == base and row["improved"] is False:
            first, last = mc.iloc[0], mc.iloc[-1]
            notes.append(f"the baseline '{g}' did not improve on {metric} over its run ({first['value']:.4f} at step "
                         f"{first['step']:.0f}, {last['value']:.4f} at step {last['step']:.0f}): no speed ratio means "
                         f"anything (see the verdict)")
    table = pd.DataFrame(rows)
    table["wall_reliable"] = pd.Series([reliable[g] for g in table["group"]], index=table.index, dtype=object)
    if base is not None:
        b = table.set_index("group").loc[base]
        table["steps_ratio"] = table["steps_to_target"] / b["steps_to_target"]
        table["time_ratio"] = table["time_to_target_s"] / b["time_to_target_s"]
        table["cost_ratio"] = table["cost_to_target_s"] / b["cost_to_target_s"]
        table["final_delta"] = table["final_mean"] - b["final_mean"]
        diffs = (f"d_{n}{s}" for n in ("final", "auc", "steps", "cost") for s in ("", "_lo", "_hi"))
        for col in ("pairs", "unpaired", "steps_censored", *diffs):
            if col not in table:
                table[col] = math.nan
    return table, target, base, notes


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
    for g, ctl in matched_controls(groups, base):
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


def _against_controls(groups, g, ctl, metric, target, higher_is_better, ci, n_resamples, bootstrap_seed,
                      axis: str = "steps") -> dict | None:
    """The convergence criterion on one time axis (``steps`` or ``cost``): SIFT's per-seed steps (cost) to target
    against the fastest (cheapest) wrong-map control, a seed that never reaches the target counted at its run
    length (its run's total cost), with the 2x-seed-std test on the difference: ``beats_by_2std`` is True when
    SIFT needs less than the control by more than twice their pooled sample std (None with fewer than 2 seeds a
    side). None on the cost axis when a run has no cost data."""
    col = AXIS_COLUMN[axis]
    # per seed: (final, AUC, steps to target, not reached, cost to target), computed once per group
    stats = {h: seed_table(groups[h], metric, target, higher_is_better) for h in [g, *ctl]}
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
