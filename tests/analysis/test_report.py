"""siftguide.analysis.report: the verdict (ratios, intervals, SIFT against its best wrong-map control on final value,
steps and cost), contended wall-clock left out, the machine-readable verdict.json."""
import json
import math

import numpy as np
import pytest

from siftguide.analysis.compare import group_runs, load_runs, main, summarize, verdict, verdict_data
from tests.analysis.fake_runs import cost_study_runs, guided_cost_runs, make_run, study_runs


def test_verdict_reports_ratios_cis_and_the_best_wrong_map_control(tmp_path):
    study_runs(tmp_path)
    groups = group_runs(load_runs([tmp_path]))
    table, target, base, _ = summarize(groups, "val/acc")
    text = verdict(table, groups, "val/acc", target, base)
    paras = text.strip().split("\n\n")
    assert len(paras) == 1 + 3 + 2  # header, one per non-baseline group, SIFT vs controls: final, steps
    sift = next(p for p in paras if p.startswith("`sift w=1`"))
    assert "the baseline's steps" in sift and "final +0.0600 [95% CI +0.0600, +0.0600], CI excludes 0" in sift
    final = paras[-2]
    assert final.startswith("SIFT vs best wrong-map control: `sift w=1` vs `shuffled w=1`")
    assert "difference +0.0500" in final and final.endswith("? yes.")
    # target 0.8: SIFT reaches it at 271.4, 257.1, 285.7 (interpolated); shuffled at 388.9, 377.8, 400; rolled
    # twice never (counted at 400) and once at 400, so shuffled is the fastest control
    steps = paras[-1]
    assert steps.startswith("Steps to target 0.8000, SIFT vs the fastest wrong-map control: `sift w=1` 271 ± 14 "
                            "vs `shuffled w=1` 389 ± 11")
    assert "difference -117" in steps and "(117 vs 2 × 13, pooled sample std)" in steps and steps.endswith("? yes.")


def test_steps_criterion_says_no_when_seeds_overlap(tmp_path):
    # SIFT is 20 steps faster on average, but its seeds spread over 100 steps (target 0.8, the baseline's final):
    # not more than 2x the seed std
    for s, (sift, ctl) in enumerate([(210, 250), (250, 270), (310, 310)]):
        make_run(tmp_path, f"b{s}", 0.0, s, [0.5, 0.6, 0.7, 0.8])
        for name, at, kind in ((f"s{s}", sift, "sift"), (f"sh{s}", ctl, "shuffled")):
            steps = list(range(10, 410, 10))
            make_run(tmp_path, name, 1.0, s, [0.5 + 0.4 * (st >= at) for st in steps], steps=steps, kind=kind)
    groups = group_runs(load_runs([tmp_path]))
    table, target, base, _ = summarize(groups, "val/acc")
    last = verdict(table, groups, "val/acc", target, base).strip().split("\n\n")[-1]
    # reached 2.5 steps before each jump (interpolated from 0.5 to 0.9): 207.5, 247.5, 307.5 vs 247.5, 267.5, 307.5
    assert "`sift w=1` 254 ± 50 vs `shuffled w=1` 274 ± 31" in last and last.endswith("? no.")


def test_steps_criterion_says_so_when_neither_reaches_the_target(tmp_path):
    # the baseline ends at 0.8 (the target); SIFT and its control stay below it in every seed
    for s in range(2):
        make_run(tmp_path, f"b{s}", 0.0, s, [0.5, 0.6, 0.7, 0.8])
        make_run(tmp_path, f"s{s}", 1.0, s, [0.5, 0.6, 0.7, 0.75 + 0.01 * s])
        make_run(tmp_path, f"sh{s}", 1.0, s, [0.5, 0.6, 0.7, 0.7], kind="shuffled")
    groups = group_runs(load_runs([tmp_path]))
    table, target, base, _ = summarize(groups, "val/acc")
    last = verdict(table, groups, "val/acc", target, base).strip().split("\n\n")[-1]
    assert last == ("Steps to target 0.8000, SIFT vs the fastest wrong-map control: neither `sift w=1` nor "
                    "`shuffled w=1` reaches the target in any seed, so there are no steps to compare.")


def test_contended_wall_clock_is_marked_unreliable_and_the_cost_ratio_is_right(tmp_path):
    # the baseline shared its cores (wall-clock 2x its compute), the guided runs had the machine to themselves
    # (wall-clock = compute); a guided step costs what a baseline step costs. Wall-clock would claim 0.33x; the
    # cost axis gives the true 0.67x (= the steps ratio)
    groups = guided_cost_runs(tmp_path, guided_sec_per_step=0.5, guided_cost_per_step=0.5)
    table, target, base, _ = summarize(groups, "val/acc")
    t = table.set_index("group")
    g = t.loc["guidance.weight=0.3"]
    assert g["cost_ratio"] == pytest.approx(2 / 3) and g["cost_ratio"] == pytest.approx(g["steps_ratio"])
    assert g["time_ratio"] == pytest.approx(1 / 3)  # the raw number stays in the table, flagged:
    assert g["wall_reliable"] is False and t.loc[base, "wall_reliable"] is True
    out = tmp_path / "out"
    assert main([str(tmp_path), "--out", str(out), "--verdict"]) == 0
    md = (out / "table.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| w=0.3 |"))
    assert "| 0.67 | 0.67 | unreliable | unreliable | 1.00 |" in row and "0.33" not in row
    assert "Wall-clock unreliable for `w=0.3`" in md and "`baseline` 2.00, `w=0.3` 1.00" in md
    text = (out / "verdict.md").read_text()
    para = next(p for p in text.split("\n\n") if p.startswith("`w=0.3`"))
    assert "0.67x the baseline's steps and 0.67x its compute (cost)" in para
    assert "Wall-clock ratio left out: the runs' contention factors (wall-clock / cost) are 1.00 here and 2.00 in " \
           "the baseline, more than 10% apart" in para and "0.33" not in text
    data = json.loads((out / "verdict.json").read_text())
    gd = next(x for x in data["groups"] if x["label"] == "w=0.3")
    assert gd["wall_reliable"] is False and gd["time_ratio"] is None and gd["cost_ratio"] == pytest.approx(2 / 3)
    assert gd["contention"] == [1.0, 1.0] and (out / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("sift_cost, beats", [(0.4, "yes"), (1.0, "no")])
def test_cost_criterion_against_the_cheapest_control(tmp_path, sift_cost, beats):
    # steps as in test_verdict_reports_ratios_cis_and_the_best_wrong_map_control (SIFT 271 ± 14 vs shuffled 389 ± 11
    # per seed: fewer by more than 2 std); in compute a SIFT step costs sift_cost against 0.5 s: at 0.4 s it still
    # wins, at 1.0 s (twice a control step) it needs more compute than the control though fewer steps
    cost_study_runs(tmp_path, sift_cost)
    groups = group_runs(load_runs([tmp_path]))
    table, target, base, _ = summarize(groups, "val/acc")
    paras = verdict(table, groups, "val/acc", target, base).strip().split("\n\n")
    assert len(paras) == 1 + 3 + 3  # header, one per group, SIFT vs controls: final, steps, cost
    assert paras[-2].startswith("Steps to target 0.8000") and paras[-2].endswith("? yes.")
    cost = paras[-1]
    steps = np.array([1900 / 7, 1800 / 7, 2000 / 7])  # per seed, interpolated
    shuffled = np.array([3500 / 9, 3400 / 9, 400.0])
    a, b = steps * sift_cost, shuffled * 0.5
    assert cost.startswith(f"Cost to target 0.8000, SIFT vs the cheapest wrong-map control: `sift w=1` "
                           f"{a.mean():.1f} ± {a.std(ddof=1):.1f} s vs `shuffled w=1` {b.mean():.1f} ± "
                           f"{b.std(ddof=1):.1f} s")
    assert f"difference {a.mean() - b.mean():+.1f} s" in cost and cost.endswith(f"? {beats}.")
    c = verdict_data(table, groups, "val/acc", target, base)["controls"][0]
    assert (c["sift"], c["cost"]["control"], c["steps"]["beats_by_2std"]) == ("sift w=1", "shuffled w=1", True)
    assert c["cost"]["beats_by_2std"] is (beats == "yes")
    assert c["cost"]["difference"] == pytest.approx(a.mean() - b.mean())
    assert c["cost"]["pooled_std"] == pytest.approx(math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2))


def test_verdict_json_is_machine_readable(tmp_path):
    cost_study_runs(tmp_path / "runs", 0.4)
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--verdict"]) == 0
    data = json.loads((out / "verdict.json").read_text())
    assert (data["metric"], data["baseline"], data["target"]) == ("val/acc", "baseline", pytest.approx(0.8))
    g = {x["label"]: x for x in data["groups"]}
    assert set(g) == {"baseline", "sift w=1", "shuffled w=1", "rolled w=1"}
    s = g["sift w=1"]
    assert (s["kind"], s["seeds"], s["n_runs"], s["is_baseline"]) == ("sift", [0, 1, 2], 3, False)
    assert g["baseline"]["is_baseline"] and g["baseline"]["kind"] == "" and "paired" not in g["baseline"]
    assert s["paired"]["final"]["better"] and s["paired"]["final"]["excludes_zero"] and s["paired"]["pairs"] == 3
    assert s["paired"]["cost"]["mean"] < 0 and s["cost_ratio"] < s["steps_ratio"] < 1
    assert s["wall_reliable"] and s["time_ratio"] == pytest.approx(s["cost_ratio"])
    c = data["controls"][0]
    assert c["controls"] == ["rolled w=1", "shuffled w=1"] and c["final"]["more_than_2std"] is True
    assert c["final"]["control"] == "shuffled w=1" and set(c["final"]["paired"]) >= {"mean", "lo", "hi"}


def test_a_baseline_that_did_not_learn_is_called_out_and_gets_no_speed_claim(tmp_path):
    # the kNN accuracy of a short self-supervised run: every group falls from its first validation (as iBOT's did at
    # 300 CPU steps), so the target (the baseline's final) is met at the first validation by all of them
    for s, e in enumerate([0.0, 0.004, -0.004]):
        make_run(tmp_path / "runs", f"b{s}", 0.0, s, np.array([0.33, 0.32, 0.31, 0.30]) + e, cost_per_step=0.5)
        make_run(tmp_path / "runs", f"s{s}", 1.0, s, np.array([0.33, 0.32, 0.315, 0.305]) + e, cost_per_step=0.5)
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--verdict"]) == 0
    text = (out / "verdict.md").read_text()
    assert "The baseline did not learn on `val/acc`" in text and "ratios below say nothing about speed" in text
    data = json.loads((out / "verdict.json").read_text())
    assert data["baseline_improved"] is False
    guided = next(x for x in data["groups"] if not x["is_baseline"])
    assert guided["steps_ratio"] == 1.0  # what the warning is about: both meet the target at step 100

    from siftguide.analysis.recipe import recommend

    rec = recommend(data)
    assert rec["status"] == "not_learning" and rec["command"] is None and "No advice" in rec["statement"]


def test_a_learning_baseline_carries_no_warning(tmp_path):
    study_runs(tmp_path / "runs")
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--verdict"]) == 0
    assert json.loads((out / "verdict.json").read_text())["baseline_improved"] is True
    assert "did not learn" not in (out / "verdict.md").read_text()


def test_cost_drift_between_runs_of_one_setting_is_flagged(tmp_path):
    # study_runs' curves with cost data; seed 2 ran on a machine 1.6x slower (every setting: wall-clock and compute
    # slow down together, so the contention factor stays 2.0 and cannot see it)
    for s, e in enumerate([0.0, 0.01, -0.01]):
        slow = 1.6 if s == 2 else 1.0
        for name, kind, w, vals in (("b", "sift", 0.0, [0.5, 0.6, 0.7, 0.8]),
                                    ("s", "sift", 1.0, [0.6, 0.75, 0.82, 0.86]),
                                    ("sh", "shuffled", 1.0, [0.52, 0.62, 0.72, 0.81])):
            make_run(tmp_path, f"{name}{s}", w, s, np.array(vals) + e, kind=kind, cost_per_step=0.5 * slow,
                     sec_per_step=1.0 * slow)
    out = tmp_path / "out"
    assert main([str(tmp_path), "--out", str(out), "--verdict"]) == 0
    md = (out / "table.md").read_text()
    assert "Cost drift in `baseline` 0.500..0.800 s, `shuffled w=1` 0.500..0.800 s, `sift w=1` 0.500..0.800 s" in md
    assert "unreliable" not in md  # the contention factors agree
    cost = next(p for p in (out / "verdict.md").read_text().split("\n\n") if p.startswith("Cost to target"))
    assert "The compute per step drifted between runs (`shuffled w=1` 0.500..0.800 s, `sift w=1` 0.500..0.800 s" in cost
    data = json.loads((out / "verdict.json").read_text())
    sift = next(g for g in data["groups"] if g["label"] == "sift w=1")
    assert sift["step_cost"] == pytest.approx([0.5, 0.5, 0.8]) and sift["cost_drift"] == pytest.approx(0.6)
    # equal machines: no note, no caveat
    cost_study_runs(tmp_path / "equal", 0.5)
    assert main([str(tmp_path / "equal"), "--out", str(out), "--verdict"]) == 0
    assert "drift" not in (out / "table.md").read_text() and "drift" not in (out / "verdict.md").read_text()
    assert json.loads((out / "verdict.json").read_text())["groups"][0]["cost_drift"] == pytest.approx(0.0)
