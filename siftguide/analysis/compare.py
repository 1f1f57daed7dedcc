"""Compare convergence across runs: ``python -m siftguide.analysis.compare RUN_DIR [RUN_DIR ...] --out DIR``.

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

The cost follows the work only while the machine's speed holds. A run's *compute per step* is ``val/cost_s /
val/step`` at its last validation (``step_cost``); the runs of one setting do the same work per step, so when theirs
differ by more than 10 % (``DRIFT_TOLERANCE``; ``cost_drift`` = max / min - 1 in the table) the machine ran slower for
some of them, which the contention factor cannot see (wall-clock slowed too). The table then notes the drift, and the
verdict's cost criterion and the recipe say that its seed std carries it; steps to target are not bent by it.

Runs made before ``val/cost_s`` was logged have no cost data: their groups are reported on steps only (no cost,
no wall-clock, since their conditions cannot be checked), with a note. The table keeps the raw wall-clock figures
in ``table.csv`` beside a ``wall_reliable`` column (True, False, or empty when unknown).

The target defaults to the baseline group's mean final value. A baseline whose seed-averaged curve ends no better
than its first validation meets that target at once: the table's ``improved`` column says False for it, and the
verdict opens with a warning that no ratio measures speed (``baseline_improved: false`` in ``verdict.json``). Writes ``curves.png`` (metric against steps, against
cost, and against wall-clock when it is reliable for every group; mean line, min-max band over seeds),
``table.md`` and ``table.csv`` into ``--out``, and with ``--verdict`` a plain-text summary per group
(``verdict.md``) and the same in machine-readable form (``verdict.json``, see ``verdict_data``). Needs no wandb
account: everything is read from the run directories.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .plots import plot_curves as plot
from .report import to_markdown, verdict, verdict_data
from .runs import (BASELINE_NAMES, GUIDANCE_PREFIXES, IGNORED_PREFIXES, KIND_KEYS, LABEL_ALIASES, MODE_TARGET_PREFIX,
                   REFERENCE_KIND, WRONG_MAP_KINDS, Run, group_labels, group_runs, is_baseline, load_runs)
from .stats import (WALL_TOLERANCE, auc, bootstrap_ci, contention, control_comparisons, mean_curve,
                    paired_differences, reach, summarize, wall_clock_reliable, wall_flag)

# the command's API, kept importable from here (the pieces live in runs, stats, report and plots)
__all__ = ["Run", "load_runs", "group_runs", "group_labels", "is_baseline", "reach", "mean_curve", "auc",
           "paired_differences", "bootstrap_ci", "summarize", "to_markdown", "verdict", "plot", "main", "contention",
           "wall_clock_reliable", "control_comparisons", "verdict_data", "WALL_TOLERANCE", "IGNORED_PREFIXES",
           "LABEL_ALIASES", "GUIDANCE_PREFIXES", "BASELINE_NAMES", "KIND_KEYS", "REFERENCE_KIND", "WRONG_MAP_KINDS",
           "MODE_TARGET_PREFIX"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m siftguide.analysis.compare", description=__doc__.split("\n\n")[0])
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
    ap.add_argument("--verdict", action="store_true",
                    help="also print a plain-text verdict, written to verdict.md (and verdict.json, machine-readable)")
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
         {g: wall_flag(v) for g, v in zip(table["group"], table["wall_reliable"])})
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
