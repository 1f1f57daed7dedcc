"""Reports of ``compare``: the Markdown table, the plain-text verdict and its machine-readable form.

Wall-clock figures are written only where :func:`~siftguide.analysis.stats.wall_clock_reliable` says the runs'
conditions were equal (see "Time axes" in :mod:`siftguide.analysis.compare`).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .runs import Run, is_baseline, map_kind
from .stats import DRIFT_TOLERANCE, WALL_TOLERANCE, contention, control_comparisons, step_cost, wall_flag

__all__ = ["to_markdown", "verdict", "verdict_data"]


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


def _wall_text(r, value: float, fmt: str) -> str:
    """A wall-clock cell: the number where it is reliable, "unreliable" where contention bent it, — where unknown."""
    ok = wall_flag(r.get("wall_reliable"))
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
    bad = [str(x) for x, v in zip(lab, table["wall_reliable"]) if wall_flag(v) is False]
    if bad:
        factors = [f"`{x}` {_range_text(lo, hi)}" for x, lo, hi in
                   zip(lab, table["contention_min"], table["contention_max"]) if not math.isnan(lo)]
        notes.append(
            "Wall-clock unreliable for " + ", ".join(f"`{x}`" for x in bad) + ": a run's contention factor "
            f"(wall-clock / cost at its last validation) is more than {WALL_TOLERANCE:.0%} from the baseline runs' "
            "median, so wall-clock measured the machine's load, not the method; compare on cost. Factors: "
            + ", ".join(factors) + ".")
    drifted = _drifted(table)
    if drifted:
        notes.append(
            f"Cost drift in {_drift_text(drifted)}: the compute per step of one setting's runs differs by more than "
            f"{DRIFT_TOLERANCE:.0%}, so the machine ran slower for some of them (another tenant on the host's cores, "
            "a clock change; wall-clock slowed too, so the contention factor cannot see it). Per-seed costs and their "
            "spread carry the drift, which makes the 2-seed-std cost criterion harder to meet; steps to target are "
            "not bent by it, and paired cost differences hold where a seed's runs trained at about the same time.")
    return notes


def _drifted(table: pd.DataFrame, groups=None) -> list[tuple[str, float, float]]:
    """(label, min, max compute per step) of the groups, or of ``groups`` (keys) only, whose cost drifted."""
    if "cost_drift" not in table:
        return []
    t = table.set_index("group")
    return [(str(t.loc[g, "label"]) if "label" in t else g, t.loc[g, "step_cost_min"], t.loc[g, "step_cost_max"])
            for g in t.index if (groups is None or g in groups) and t.loc[g, "cost_drift"] > DRIFT_TOLERANCE]


def _drift_text(drifted: list[tuple[str, float, float]]) -> str:
    """The groups of :func:`_drifted` with their range of compute per step."""
    return ", ".join(f"`{x}` {_range_text(lo, hi, '{:.3f}')} s" for x, lo, hi in drifted)


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


def _ci_text(m: float, lo: float, hi: float, fmt: str, ci: float) -> str:
    if math.isnan(m):
        return "not available"
    if math.isnan(lo):
        return f"{fmt.format(m)} (one pair, no interval)"
    return (f"{fmt.format(m)} [{ci:.0%} CI {fmt.format(lo)}, {fmt.format(hi)}], CI "
            f"{'excludes' if _excludes_zero(lo, hi) else 'includes'} 0")


def _time_sentence(r, b) -> str:
    """The verdict's words on a group's wall-clock, against the baseline row ``b`` (module docstring, "Time axes")."""
    ok = wall_flag(r.get("wall_reliable"))
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

    if base is not None and _improved(t.loc[base]) is False:
        out.append(f"**The baseline did not learn on `{metric}`** after its first validation: its seed-averaged curve "
                   f"ends no better than it starts (it learned nothing measurable in the run, or all of it before the "
                   f"first validation). It meets a target taken from its final value at its first validation, so the "
                   f"steps and cost ratios below say nothing about speed; only the final values and AUCs compare. "
                   f"Train longer, validate earlier or check the objective's settings before reading a speed-up here.")
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
                drifted = _drifted(table, (c[axis]["sift"], c[axis]["control"])) if axis == "cost" else []
                if drifted and not c[axis]["reached_by_neither"]:
                    out[-1] += (f" The compute per step drifted between runs ({_drift_text(drifted)}; see the "
                                "table's note): the seed std includes the machine's drift; the steps above are not "
                                "bent by it.")
    return "\n\n".join(out) + "\n"


def _improved(row) -> bool | None:
    """The row's ``improved`` as a bool; None when unknown (one validation, or a table without the column)."""
    v = row.get("improved")
    return bool(v) if isinstance(v, (bool, np.bool_)) else None


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

    Keys: ``metric``, ``higher_is_better``, ``target``, ``baseline_improved`` (the baseline's curve ends better than
    its first validation: see :func:`~siftguide.analysis.stats.improved`; False: no speed claim holds; None: unknown
    or no baseline), ``ci``, ``n_resamples``, ``baseline`` (label or None),
    ``wall_tolerance``; ``groups``: one dict per group with ``label``, ``description``, ``kind`` (the relevance map:
    ``sift``, a wrong-map control, or "" for the baseline), ``is_baseline``, ``runs`` (directories), ``seeds``,
    ``final_mean``/``final_std``, ``auc``, ``steps_to_target``, ``cost_to_target_s``, ``steps_ratio``,
    ``cost_ratio``, ``wall_reliable``, ``contention`` and ``step_cost`` (per run; see
    :func:`~siftguide.analysis.stats.step_cost`), ``cost_drift``, ``time_to_target_s``/``time_ratio`` (null unless
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
        reliable = wall_flag(r.get("wall_reliable"))
        d = {"label": lab[g], "description": g, "kind": map_kind(rs[0].config) if not all(is_baseline(x) for x in rs)
             else "", "is_baseline": g == base, "runs": [str(x.path) for x in rs],
             "seeds": sorted({x.seed for x in rs if x.seed is not None}, key=repr), "n_runs": len(rs),
             **{k: r.get(k, math.nan) for k in ("final_mean", "final_std", "auc", "steps_to_target",
                                                "cost_to_target_s", "steps_ratio", "cost_ratio", "total_cost_s")},
             "wall_reliable": reliable, "contention": [contention(x, metric) for x in rs],
             "step_cost": [step_cost(x, metric) for x in rs], "cost_drift": r.get("cost_drift", math.nan),
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
                        "baseline_improved": _improved(t.loc[base]) if base is not None else None,
                        "ci": ci, "n_resamples": n_resamples, "baseline": lab[base] if base is not None else None,
                        "wall_tolerance": WALL_TOLERANCE, "groups": out_groups, "controls": comps})
