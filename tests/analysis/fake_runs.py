"""Finished run directories whose answers are known by construction, for the tests of run discovery, statistics,
the report and the compare command."""
import numpy as np
import pandas as pd
import yaml


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_run(root, name, weight, seed, values, steps=(100, 200, 300, 400), sec_per_step=0.5, kind="sift",
             max_steps=400, extra=None, cost_per_step=None):
    """A finished run's directory; ``cost_per_step`` adds ``val/cost_s`` (runs made before the cost axis lack it)."""
    d = root / name
    d.mkdir(parents=True)
    rows = []
    for s, v in zip(steps, values):
        rows.append({"step": s - 1, "train/loss": 1.0, "val/acc": None})
        rows.append({"step": s, "val/acc": v, "val/step": s, "val/elapsed_s": s * sec_per_step,
                     **({"val/cost_s": s * cost_per_step} if cost_per_step is not None else {})})
    pd.DataFrame(rows).to_csv(d / "metrics.csv", index=False)
    cfg = {"seed": seed, "guidance": {"weight": weight, "target": {"kind": kind, "seed": seed}},
           "paths": {"output_dir": str(d)}, "trainer": {"max_steps": max_steps}}
    cfg = merge(cfg, extra or {})
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


def study_runs(root):
    """Baseline, SIFT w=1 clearly faster, two wrong-map controls at w=1, 3 seeds each."""
    for s, e in enumerate([0.0, 0.01, -0.01]):
        make_run(root, f"b{s}", 0.0, s, np.array([0.5, 0.6, 0.7, 0.8]) + e)
        make_run(root, f"s{s}", 1.0, s, np.array([0.6, 0.75, 0.82, 0.86]) + e)
        make_run(root, f"sh{s}", 1.0, s, np.array([0.52, 0.62, 0.72, 0.81]) + e, kind="shuffled")
        make_run(root, f"ro{s}", 1.0, s, np.array([0.5, 0.6, 0.7, 0.79]) + e, kind="rolled")


def cost_study_runs(root, sift_cost):
    """``study_runs`` with cost data: every control step costs 0.5 s, a SIFT step ``sift_cost``; equal conditions."""
    for s, e in enumerate([0.0, 0.01, -0.01]):
        make_run(root, f"b{s}", 0.0, s, np.array([0.5, 0.6, 0.7, 0.8]) + e, cost_per_step=0.5, sec_per_step=1.0)
        make_run(root, f"s{s}", 1.0, s, np.array([0.6, 0.75, 0.82, 0.86]) + e, cost_per_step=sift_cost,
                 sec_per_step=2 * sift_cost)
        make_run(root, f"sh{s}", 1.0, s, np.array([0.52, 0.62, 0.72, 0.81]) + e, kind="shuffled", cost_per_step=0.5,
                 sec_per_step=1.0)
        make_run(root, f"ro{s}", 1.0, s, np.array([0.5, 0.6, 0.7, 0.79]) + e, kind="rolled", cost_per_step=0.5,
                 sec_per_step=1.0)


def guided_cost_runs(root, guided_sec_per_step, guided_cost_per_step):
    """A baseline (2 seeds, wall-clock 1 s and compute 0.5 s per step) and a guided w=0.3 arm (2 seeds) that reaches
    0.8 sooner, at the given wall-clock and compute per step. Returns ``group_runs`` of them."""
    from siftguide.analysis.compare import group_runs, load_runs
    for s in (0, 1):
        make_run(root, f"b{s}", 0.0, s, [0.5, 0.6, 0.7, 0.8], sec_per_step=1.0, cost_per_step=0.5)
    make_run(root, "g0", 0.3, 0, [0.6, 0.8, 0.85, 0.86], sec_per_step=guided_sec_per_step,
             cost_per_step=guided_cost_per_step)
    make_run(root, "g1", 0.3, 1, [0.6, 0.7, 0.8, 0.84], sec_per_step=guided_sec_per_step,
             cost_per_step=guided_cost_per_step)
    return group_runs(load_runs([root]))
