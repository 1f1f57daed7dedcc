"""Compare the metrics.csv of two sets of run directories with the same names (scripts/behaviour_check.sh): per run,
the columns identical, within 1e-5, missing or new; wall-clock, cost and throughput columns left out.

    python scripts/compare_metrics.py OLD_DIR NEW_DIR

The renames of docs/changes.md are applied to the old files (train/lr -> train/lr/decay; the duplicate
train/guidance_div and train/guidance_weight dropped).
"""
import sys

import numpy as np
import pandas as pd
from pathlib import Path
a, b = Path(sys.argv[1]), Path(sys.argv[2])
SKIP = ("elapsed_s", "cost_s", "throughput")
RENAME = {"train/lr": "train/lr/decay"}
DUPS = ("train/guidance_div", "train/guidance_weight")  # copies of train/guidance/attention_{value,weight}
for name in sorted(p.name for p in a.iterdir() if p.is_dir()):
    ma, mb = pd.read_csv(a / name / "metrics.csv"), pd.read_csv(b / name / "metrics.csv")
    ma = ma.rename(columns=RENAME).drop(columns=[c for c in DUPS if c in ma.columns])
    cols = [c for c in ma.columns if c not in ("epoch",) and not c.endswith(SKIP)]
    diffs, missing, exact, close = [], [], 0, 0
    for c in cols:
        if c == "step": continue
        if c not in mb.columns:
            missing.append(c); continue
        va = ma[["step", c]].dropna().groupby("step")[c].last()
        vb = mb[["step", c]].dropna().groupby("step")[c].last()
        if not va.index.equals(vb.index):
            diffs.append(f"{c}: steps differ {list(va.index)[:5]} vs {list(vb.index)[:5]}"); continue
        d = np.abs(va.values - vb.values).max() if len(va) else 0.0
        if d == 0: exact += 1
        elif d < 1e-5: close += 1; diffs.append(f"{c}: max |diff| {d:.2e}")
        else: diffs.append(f"{c}: max |diff| {d:.3g} ***")
    new = [c for c in mb.columns if c not in ma.columns and not c.endswith(SKIP) and c != "epoch"]
    print(f"== {name}: {exact} columns identical, {close} within 1e-5; missing after: {missing}; new after: {new}")
    for d in diffs: print("   ", d)
