"""The recipe a study hands back: which setting to train with on this data, its evidence, and the command.

:func:`recommend` reads a verdict (``verdict.json``, written by ``python -m siftguide.analysis.compare --verdict``; the study
adds each group's ``overrides`` and the study's ``common_overrides`` and ``data``) and picks, among the groups that
guide with the SIFT map (``kind: sift``), those that

1. beat the baseline: the paired CI of the final value over seeds excludes 0 in the better direction, or the
   group reaches the target sooner than the baseline on the cost axis (``cost_ratio < 1``; ``steps_ratio < 1``
   for runs without cost data), and
2. beat their best wrong-map control (the cheapest one in per-seed cost to target; the fastest in steps when there
   is no cost data) by more than 2 seed std: ``control - sift > 2 x pooled sample std``,

and recommends the one with the lowest cost ratio (steps ratio without cost data). ``status`` says which case
holds: ``recommended``; ``untested`` (a setting beats the baseline but the study ran no wrong-map control for it:
it may not be SIFT's doing); ``baseline`` (no setting beat its controls: train without guidance); or ``incomplete``
(the verdict says ``complete: false``: some planned runs did not finish, and no advice is given); or
``not_learning`` (the verdict says ``baseline_improved: false``: the baseline's curve ends no better than it starts,
so no speed-up can be read, and no advice is given). With
``baseline``, ``fastest`` names the setting (any map, a wrong-map control included) that beat the baseline at the
lowest cost, when one did: a user who only wants speed may take it, knowing the gain is not the per-image SIFT
map's.

``python -m siftguide.analysis.recipe OUT/report/verdict.json --headline docs/results/headline.json`` writes the
headline (:func:`write_headline`) that tools and the README read.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import yaml

from .stats import DRIFT_TOLERANCE

__all__ = ["recommend", "recommendation_yaml", "write_headline", "headline", "main"]

BASELINE_OVERRIDES = ["guidance=none"]


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _command(common: list[str] | None, overrides: list[str] | None) -> str | None:
    if overrides is None:
        return None
    return " ".join(["python train.py", *map(shlex.quote, [*(common or []), *overrides])])


def _ratio(g: dict) -> float:
    """A group's cost ratio to the baseline, its steps ratio without cost data (nan: neither)."""
    c = _num(g.get("cost_ratio"))
    return c if not math.isnan(c) else _num(g.get("steps_ratio"))


def _beats_baseline(g: dict) -> tuple[bool, str]:
    """(beats, why) per the module docstring, criterion 1."""
    final = (g.get("paired") or {}).get("final") or {}
    if final.get("better"):
        return True, "its paired final CI excludes 0 upward"
    cost, steps = _num(g.get("cost_ratio")), _num(g.get("steps_ratio"))
    if not math.isnan(cost):
        return (cost < 1, f"cost ratio {cost:.2f}")
    if g.get("total_cost_s") is None and not math.isnan(steps):  # no cost data: steps decide
        return (steps < 1, f"steps ratio {steps:.2f} (no cost data)")
    return False, "does not reach the target on the mean curve and its final CI does not exclude 0 upward"


def _control_margin(c: dict | None) -> dict | None:
    """The criterion-2 comparison of one SIFT group: on cost when both sides have cost data, else on steps."""
    if c is None:
        return None
    axis = "cost" if c.get("cost") is not None else "steps"
    a = c.get(axis)
    if a is None:
        return None
    if a.get("reached_by_neither"):
        return {"axis": axis, "control": a["control"], "beats_by_2std": False,
                "note": "neither SIFT nor the control reaches the target in any seed"}
    pooled = _num(a.get("pooled_std"))
    return {"axis": axis, "control": a["control"], "sift_mean": a["sift_mean"], "sift_std": a["sift_std"],
            "control_mean": a["control_mean"], "control_std": a["control_std"],
            "margin": -a["difference"],  # how much less the SIFT setting needs than the control (> 0: less)
            "two_std": None if math.isnan(pooled) else 2 * pooled, "beats_by_2std": bool(a.get("beats_by_2std")),
            "pairs": a.get("pairs"), "paired_difference": a.get("paired")}


def _evidence(g: dict, margin: dict | None, v: dict) -> dict:
    paired = g.get("paired") or {}
    return {"cost_ratio": g.get("cost_ratio"), "steps_ratio": g.get("steps_ratio"),
            "final_mean": g.get("final_mean"), "final_std": g.get("final_std"), "seeds": g.get("seeds"),
            "n_seeds": len(g.get("seeds") or []), "ci": v.get("ci"),
            "paired_final_vs_baseline": paired.get("final"), "paired_cost_vs_baseline": paired.get("cost"),
            "paired_steps_vs_baseline": paired.get("steps"), "best_control": margin}


def recommend(verdict: dict) -> dict:
    """The recommendation from a verdict dict (``verdict.json``), see the module docstring. Returns ``status``
    (recommended | untested | baseline | incomplete | not_learning), ``statement`` (plain words), ``data``,
    ``metric``, ``target``, ``setting`` (group label), ``overrides`` (the setting's own, None when the verdict does
    not carry them), ``evidence`` (cost and steps ratio, final, seeds, paired CIs against the baseline, the margin
    over the best control), ``command`` (``python train.py <common overrides> <the setting's overrides>``, no seed) and
    ``considered`` (every SIFT group with the outcome of both criteria)."""
    groups = verdict.get("groups", [])
    base = next((g for g in groups if g.get("is_baseline")), None)
    controls = {c["sift"]: c for c in verdict.get("controls", [])}
    common = verdict.get("common_overrides")
    considered, winners, untested, margins = [], [], [], {}
    for g in groups:
        if g.get("is_baseline") or g.get("kind") != "sift":
            continue
        beats, why = _beats_baseline(g)
        margin = _control_margin(controls.get(g["label"]))
        vs_controls = "untested" if margin is None else ("beats" if margin["beats_by_2std"] else "fails")
        if g.get("incomplete"):  # some of its planned runs (its controls, its seeds) did not finish: no judgement
            vs_controls = "incomplete"
        margins[g["label"]] = margin
        considered.append({"setting": g["label"], "beats_baseline": beats, "why": why, "against_controls": vs_controls,
                           "cost_ratio": g.get("cost_ratio"), "steps_ratio": g.get("steps_ratio")})
        if beats and vs_controls == "beats":
            winners.append((g, margin))
        elif beats and vs_controls == "untested":
            untested.append((g, margin))

    def key(gm):
        r = _ratio(gm[0])
        return math.inf if math.isnan(r) else r

    out = {"status": "baseline", "statement": "", "data": verdict.get("data"), "metric": verdict.get("metric"),
           "target": verdict.get("target"), "setting": None, "overrides": None, "evidence": None, "command": None,
           "considered": considered}
    metric = verdict.get("metric")
    if not verdict.get("complete", True):
        missing = verdict.get("not_finished") or []
        listed = ", ".join(f"{r['run']} ({r['state']})" for r in missing[:8]) + (" ..." if len(missing) > 8 else "")
        out.update(status="incomplete", statement=(
            f"The study is incomplete: {len(missing)} of its planned runs did not finish ({listed}). No advice until "
            f"they do: run the study's command again (finished runs are skipped, cut runs continue)."))
        return out
    if verdict.get("baseline_improved") is False:
        out.update(status="not_learning", statement=(
            f"The baseline did not improve on {metric} after its first validation (its curve ends no better than it "
            f"starts): it meets its own target, its final value, at its first validation, so no ratio against it "
            f"measures speed. No advice: train longer (trainer.max_steps), validate earlier or check the "
            f"objective's settings, then rerun the study."))
        return out
    if winners or untested:
        g, margin = min(winners or untested, key=key)
        ev = _evidence(g, margin, verdict)
        out.update(status="recommended" if winners else "untested", setting=g["label"], overrides=g.get("overrides"),
                   evidence=ev, command=_command(common, g.get("overrides")))
        axes = (("cost_ratio", "cost"), ("steps_ratio", "steps"))
        ratios = ", ".join(f"{_num(ev[k]):.2f}x the baseline's {w}" for k, w in axes if not math.isnan(_num(ev[k])))
        fin = ev["paired_final_vs_baseline"] or {}
        s = (f"`{g['label']}` reaches the baseline's final {metric} in {ratios or 'an unknown share of its cost'}; "
             f"final {_num(g.get('final_mean')):.4f} ± {_num(g.get('final_std')):.4f} over {ev['n_seeds']} seeds")
        if fin.get("mean") is not None:
            s += (f", paired difference to the baseline {fin['mean']:+.4f}"
                  + (f" [{_num(verdict.get('ci')):.0%} CI {fin['lo']:+.4f}, {fin['hi']:+.4f}]"
                     if fin.get("lo") is not None else ""))
        if winners:
            unit = " s of compute" if margin["axis"] == "cost" else " steps"
            s += (f". It needs {margin['margin']:.1f}{unit} less to the target than its best wrong-map control "
                  f"(`{margin['control']}`), more than 2 seed std ({margin['two_std']:.1f}): use it on this data.")
        else:
            s += (". Untested against controls: the study ran no wrong-map control for it, so the gain may not come "
                  "from the SIFT map; rerun the study with `--controls main` before relying on it.")
        out["statement"] = s
    else:
        failed = [c["setting"] for c in considered if c["beats_baseline"] and c["against_controls"] == "fails"]
        if not considered:
            why = "the study ran no setting with the SIFT map"
        elif failed:
            why = (f"{', '.join(f'`{x}`' for x in failed)} beat the baseline but not their best wrong-map control by "
                   "more than 2 seed std in per-seed cost (steps without cost data) to target")
        else:
            why = "no setting with the SIFT map beat the baseline"
        statement = f"No setting beat its controls ({why}): use the baseline (guidance=none)."
        drifted = _drifted_failures(failed, margins, groups)
        out["cost_drift"] = drifted
        if drifted:
            statement += (f" Read the cost criterion with care: the compute per step of "
                          f"{', '.join(f'`{x}`' for x in drifted)} drifted by more "
                          f"than {DRIFT_TOLERANCE:.0%} between runs (the machine ran slower for some of them), and "
                          "that drift is in the seed std; see the table's note and the steps to target.")
        fastest = _fastest(groups, verdict)
        if fastest is not None:
            statement += (f" For speed alone, `{fastest['setting']}` (relevance.kind={fastest['kind']}) beat the "
                          f"baseline at {_num(fastest['evidence']['cost_ratio']):.2f}x its cost, but not because of "
                          f"each image's own SIFT map: {fastest['command']}")
        out.update(statement=statement, setting=base["label"] if base else "baseline", overrides=BASELINE_OVERRIDES,
                   command=_command(common, BASELINE_OVERRIDES), fastest=fastest)
    return out


def _drifted_failures(failed: list[str], margins: dict, groups: list[dict]) -> list[str]:
    """The settings (a failed SIFT setting or its cheapest control, judged on cost) whose runs' compute per step
    drifted (``cost_drift`` in the verdict); empty when none did."""
    drift = {g["label"]: _num(g.get("cost_drift")) for g in groups}
    names = []
    for f in failed:
        m = margins.get(f) or {}
        if m.get("axis") == "cost":
            names += [x for x in (f, m.get("control")) if drift.get(x, math.nan) > DRIFT_TOLERANCE and x not in names]
    return names


def _fastest(groups: list[dict], verdict: dict) -> dict | None:
    """The group, whatever its map, that beats the baseline (criterion 1) at the lowest cost ratio (steps ratio
    without cost data), with its evidence and command; None when none does."""
    beating = [g for g in groups if not g.get("is_baseline") and _beats_baseline(g)[0] and not math.isnan(_ratio(g))]
    if not beating:
        return None
    g = min(beating, key=_ratio)
    return {"setting": g["label"], "kind": g.get("kind"), "overrides": g.get("overrides"),
            "evidence": _evidence(g, None, verdict), "command": _command(verdict.get("common_overrides"),
                                                                          g.get("overrides"))}


def recommendation_yaml(rec: dict) -> str:
    """``recommended.yaml``: a comment with the statement and the command, then the recommendation."""
    head = ["# written by python -m siftguide.study (siftguide.analysis.recipe.recommend)",
            f"# {rec['status']}: {rec['statement']}"]
    if rec.get("command"):
        head.append(f"# train with it: {rec['command']}")
    return "\n".join(head) + "\n" + yaml.safe_dump(_rounded(rec), sort_keys=False, allow_unicode=True, width=120)


def _rounded(v, digits: int = 4):
    """Floats rounded for reading (verdict.json keeps full precision)."""
    if isinstance(v, dict):
        return {k: _rounded(x, digits) for k, x in v.items()}
    if isinstance(v, list):
        return [_rounded(x, digits) for x in v]
    return round(v, digits) if isinstance(v, float) else v


def headline(rec: dict) -> dict:
    """The headline fields of a recommendation: data, setting, cost_ratio, steps_ratio, seeds,
    beats_best_control_by_2std, command (and status). The baseline recommendation has ratios 1.0; when a setting
    was faster than the baseline without beating its controls, ``fastest`` names it (setting, map kind, ratios,
    seeds, command): faster, but not because of each image's own SIFT map. ``cost_drift`` lists the settings whose
    failed cost criterion carries a drift of the machine's speed (:func:`recommend`'s statement says more)."""
    ev = rec.get("evidence") or {}
    margin = ev.get("best_control") or {}
    base = rec["status"] == "baseline"
    out = {"data": rec.get("data"), "setting": rec.get("setting"),
           "cost_ratio": 1.0 if base else ev.get("cost_ratio"), "steps_ratio": 1.0 if base else ev.get("steps_ratio"),
           "seeds": ev.get("n_seeds"), "beats_best_control_by_2std": bool(margin.get("beats_by_2std", False)),
           "command": rec.get("command"), "status": rec["status"]}
    fast = rec.get("fastest")
    if base and fast:
        fev = fast.get("evidence") or {}
        out["fastest"] = {"setting": fast["setting"], "kind": fast.get("kind"), "cost_ratio": fev.get("cost_ratio"),
                          "steps_ratio": fev.get("steps_ratio"), "seeds": fev.get("n_seeds"),
                          "sift_specific": False, "command": fast.get("command")}
    if rec.get("cost_drift"):  # the cost criterion failed where the machine's speed drifted: see the statement
        out["cost_drift"] = rec["cost_drift"]
    return out


def write_headline(verdict_json: str | Path, out_path: str | Path, data: str | None = None) -> dict:
    """Write the headline (:func:`headline` of :func:`recommend`) of a study's ``verdict.json`` to ``out_path``
    (e.g. ``docs/results/headline.json``); ``data`` names the data when the verdict does not. Returns it."""
    v = json.loads(Path(verdict_json).read_text())
    if data is not None:
        v["data"] = data
    h = headline(recommend(v))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(h, indent=1) + "\n")
    return h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m siftguide.analysis.recipe", description=__doc__.split("\n\n")[0])
    ap.add_argument("verdict", help="a verdict.json (OUT/report/verdict.json of a study)")
    ap.add_argument("--headline", default="docs/results/headline.json", help="where to write the headline")
    ap.add_argument("--data", default=None, help="name of the data, when the verdict does not carry it")
    args = ap.parse_args(argv)
    h = write_headline(args.verdict, args.headline, args.data)
    print(json.dumps(h, indent=1))
    print(f"wrote {args.headline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
