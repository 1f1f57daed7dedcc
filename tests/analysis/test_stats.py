"""siftguide.analysis.stats: steps, time and cost to target, ratios to the baseline, AUC, bootstrap intervals (scipy's),
paired differences, contention and when wall-clock is reliable."""
import math

import numpy as np
import pandas as pd
import pytest

from siftguide.analysis.compare import (auc, bootstrap_ci, contention, group_runs, load_runs, main,
                                        paired_differences, reach, summarize, verdict, wall_clock_reliable)
from tests.analysis.fake_runs import guided_cost_runs, make_run


def test_reach_interpolates_between_validations():
    curve = pd.DataFrame({"step": [100.0, 200.0, 300.0], "time": [10.0, 20.0, 30.0], "value": [0.5, 0.7, 0.8]})
    assert reach(curve, 0.6) == (150.0, 15.0)
    assert reach(curve, 0.5) == (100.0, 10.0)
    s, t = reach(curve, 0.9)
    assert math.isnan(s) and math.isnan(t)
    assert reach(curve.assign(value=[3.0, 2.0, 1.0]), 1.5, higher_is_better=False) == (250.0, 25.0)


def test_steps_and_time_to_target_and_ratios(tmp_path):
    # baseline reaches 0.8 at step 400 (both seeds); guided mean curve [0.6, 0.75, 0.825, 0.85] crosses 0.8 at
    # 200 + 100 * 0.05 / 0.075 = 266.7 steps (its seeds alone at 200 and 300)
    make_run(tmp_path, "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.8])
    make_run(tmp_path, "b1", 0.0, 1, [0.5, 0.6, 0.7, 0.8])
    make_run(tmp_path, "g0", 0.3, 0, [0.6, 0.8, 0.85, 0.86], sec_per_step=0.6)
    make_run(tmp_path, "g1", 0.3, 1, [0.6, 0.7, 0.8, 0.84], sec_per_step=0.6)
    groups = group_runs(load_runs([tmp_path]))
    assert list(groups) == ["guidance.weight=0.0", "guidance.weight=0.3"]  # seeds pooled, baseline first
    table, target, base, notes = summarize(groups, "val/acc")
    assert target == pytest.approx(0.8) and base == "guidance.weight=0.0" and not notes
    g = table.set_index("group").loc["guidance.weight=0.3"]
    assert g["steps_to_target"] == pytest.approx(800 / 3)
    assert g["steps_ratio"] == pytest.approx(800 / 3 / 400)
    assert g["time_ratio"] == pytest.approx(800 / 3 * 0.6 / (400 * 0.5))
    assert g["final_mean"] == pytest.approx(0.85)
    assert (g["seeds_reached"], g["seed_steps_min"], g["seed_steps_max"]) == ("2/2", 200, 300)


def test_group_that_never_reaches_and_explicit_target(tmp_path):
    make_run(tmp_path, "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.8])
    make_run(tmp_path, "g0", 1.0, 0, [0.5, 0.55, 0.6, 0.65])
    make_run(tmp_path, "g1", 1.0, 1, [0.5, 0.6, 0.7, 0.81])
    table, target, _, notes = summarize(group_runs(load_runs([tmp_path])), "val/acc")
    g = table.set_index("group").loc["guidance.weight=1.0"]
    # mean curve [0.5, 0.575, 0.65, 0.73] never reaches 0.8; one seed does on its own
    assert g["seeds_reached"] == "1/2" and math.isnan(g["steps_to_target"]) and math.isnan(g["steps_ratio"])
    assert any("never reaches" in n for n in notes)
    table, target, _, _ = summarize(group_runs(load_runs([tmp_path])), "val/acc", target=0.6)
    assert target == 0.6
    # the mean curve crosses 0.6 between 200 (0.575) and 300 (0.65)
    assert table.set_index("group").loc["guidance.weight=1.0", "steps_to_target"] == pytest.approx(200 + 100 / 3)


def test_baseline_reaches_its_own_mean_final_value(tmp_path):
    # seeds end above and below the mean: the baseline's mean curve still reaches the target, ratio 1
    make_run(tmp_path, "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.82])
    make_run(tmp_path, "b1", 0.0, 1, [0.5, 0.6, 0.7, 0.78])
    table, target, base, _ = summarize(group_runs(load_runs([tmp_path])), "val/acc")
    b = table.set_index("group").loc[base]
    assert target == pytest.approx(0.8) and b["steps_to_target"] == 400 and b["steps_ratio"] == 1.0
    assert b["seeds_reached"] == "1/2"


def test_missing_baseline_is_reported(tmp_path):
    make_run(tmp_path, "g0", 0.3, 0, [0.5, 0.6, 0.7, 0.8])
    make_run(tmp_path, "g1", 1.0, 0, [0.5, 0.6, 0.7, 0.9])
    table, target, base, notes = summarize(group_runs(load_runs([tmp_path])), "val/acc")
    assert base is None and target is None
    assert any("no baseline" in n for n in notes)
    assert "steps_ratio" not in table


def test_baseline_chosen_among_several_weight_0_groups(tmp_path):
    # a shorter training budget forms its own groups; --baseline picks the long baseline as the reference
    make_run(tmp_path, "b400", 0.0, 0, [0.5, 0.6, 0.7, 0.8])
    make_run(tmp_path, "b300", 0.0, 0, [0.5, 0.6, 0.75], steps=(100, 200, 300), max_steps=300)
    make_run(tmp_path, "g300", 1.0, 0, [0.55, 0.7, 0.8], steps=(100, 200, 300), max_steps=300)
    groups = group_runs(load_runs([tmp_path]))
    _, target, base, notes = summarize(groups, "val/acc")
    assert any("several groups" in n for n in notes)
    table, target, base, notes = summarize(groups, "val/acc", baseline="max_steps=400")
    assert base == "guidance.weight=0.0, trainer.max_steps=400" and target == pytest.approx(0.8)
    assert len(notes) == 1 and "max_steps=300': its mean curve never reaches" in notes[0]
    t = table.set_index("group")
    assert t.loc["guidance.weight=1.0, trainer.max_steps=300", "steps_ratio"] == pytest.approx(300 / 400)
    assert math.isnan(t.loc["guidance.weight=0.0, trainer.max_steps=300", "steps_to_target"])
    with pytest.raises(ValueError, match="exactly one"):
        summarize(groups, "val/acc", baseline="max_steps")


def test_unknown_metric_and_missing_dirs_are_clear_errors(tmp_path):
    make_run(tmp_path, "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.8])
    with pytest.raises(KeyError, match="val/knn_acc"):
        summarize(group_runs(load_runs([tmp_path])), "val/knn_acc")
    with pytest.raises(FileNotFoundError):
        load_runs([tmp_path / "nope"])


def test_auc_is_the_mean_value_over_the_run(tmp_path):
    # trapezoids with the first value held back to step 0: (100 * 0.5 + 100 * 0.6 + 200 * 0.75) / 400
    curve = pd.DataFrame({"step": [100.0, 200.0, 400.0], "value": [0.5, 0.7, 0.8]})
    assert auc(curve) == pytest.approx(260 / 400)
    assert auc(curve.assign(step=[0.0, 200.0, 400.0])) == pytest.approx((200 * 0.6 + 200 * 0.75) / 400)
    assert auc(pd.DataFrame({"step": [50.0], "value": [0.3]})) == pytest.approx(0.3)
    make_run(tmp_path, "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.8])
    make_run(tmp_path, "b1", 0.0, 1, [0.3, 0.6, 0.9, 1.0])
    table, *_ = summarize(group_runs(load_runs([tmp_path])), "val/acc")
    r = table.iloc[0]
    per_seed = [(50 + 55 + 65 + 75) / 400, (30 + 45 + 75 + 95) / 400]
    assert r["auc"] == pytest.approx(np.mean(per_seed))  # the mean curve [0.4, 0.6, 0.8, 0.9]
    assert (r["auc_seed_mean"], r["auc_seed_std"]) == pytest.approx((np.mean(per_seed), np.std(per_seed, ddof=1)))
    assert r["final_std"] == pytest.approx(np.std([0.8, 1.0], ddof=1))  # sample std, as the 2x-std criteria use


def test_bootstrap_ci_is_deterministic_and_degenerate_cases():
    d = np.random.default_rng(0).normal(1.0, 0.5, 10)
    m, lo, hi = bootstrap_ci(d)
    assert m == pytest.approx(d.mean()) and d.min() <= lo < m < hi <= d.max()
    assert bootstrap_ci(d) == (m, lo, hi) and bootstrap_ci(d, seed=1) != (m, lo, hi)
    assert bootstrap_ci(d, ci=0.5)[1] > lo
    assert math.isnan(bootstrap_ci([0.5])[1]) and bootstrap_ci([0.5])[0] == 0.5
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_bootstrap_ci_is_scipys_percentile_bootstrap_and_equals_the_former_numpy_one():
    # scipy.stats.bootstrap draws the same resamples from the seeded generator as our former copy did (indices
    # integers(0, n, (n_resamples, n))) and takes the same percentiles: equal up to the last bit of the level
    from scipy import stats

    def former(d, ci, n_resamples, seed):  # the hand-written interval bootstrap_ci used before
        idx = np.random.default_rng(seed).integers(0, len(d), size=(n_resamples, len(d)))
        return tuple(np.quantile(d[idx].mean(axis=1), [(1 - ci) / 2, 1 - (1 - ci) / 2]))

    for n, ci, seed in [(2, 0.95, 0), (3, 0.95, 1), (5, 0.9, 0), (8, 0.95, 3), (20, 0.5, 7)]:
        d = np.random.default_rng(n).normal(1.0, 0.5, n)
        m, lo, hi = bootstrap_ci(d, ci, 10_000, seed)
        assert m == d.mean() and (lo, hi) == pytest.approx(former(d, ci, 10_000, seed), rel=1e-12, abs=1e-15)
        ref = stats.bootstrap((d,), np.mean, n_resamples=10_000, confidence_level=ci, method="percentile",
                              random_state=np.random.default_rng(seed))
        assert (lo, hi) == pytest.approx(tuple(ref.confidence_interval), rel=1e-12)


def _offset_runs(root, offset, noise, n=8):
    """Baseline seeds with varied curves; guided = the same seed's curve + offset + per-seed noise."""
    rng = np.random.default_rng(123)
    for s in range(n):
        base = np.array([0.5, 0.6, 0.7, 0.75]) + rng.normal(0, 0.03)
        make_run(root, f"b{s}", 0.0, s, base)
        make_run(root, f"g{s}", 1.0, s, base + offset + rng.normal(0, noise))


@pytest.mark.parametrize("offset, excludes_zero", [(0.05, True), (0.001, False)])
def test_paired_bootstrap_ci_contains_the_offset(tmp_path, offset, excludes_zero):
    _offset_runs(tmp_path, offset, noise=0.01)
    groups = group_runs(load_runs([tmp_path]))
    table, target, base, notes = summarize(groups, "val/acc")
    g = table.set_index("label").loc["w=1"]
    assert g["pairs"] == 8 and g["unpaired"] == 0 and not any("seed partner" in n for n in notes)
    for name in ("final", "auc"):  # a constant offset shifts the AUC by the same amount
        lo, hi = g[f"d_{name}_lo"], g[f"d_{name}_hi"]
        assert lo <= offset <= hi and (lo > 0) == excludes_zero
    again, *_ = summarize(groups, "val/acc")
    pd.testing.assert_frame_equal(table, again)  # fixed RNG: tables regenerate identically
    assert summarize(groups, "val/acc", bootstrap_seed=1)[0]["d_final_lo"].iloc[1] != g["d_final_lo"]


def test_paired_differences_skip_and_count_a_missing_seed(tmp_path):
    for s, v in [(0, 0.8), (1, 0.7), (2, 0.9)]:
        make_run(tmp_path, f"b{s}", 0.0, s, [0.5, 0.6, 0.7, v])
    for s, v in [(0, 0.9), (1, 0.75), (3, 0.1)]:
        make_run(tmp_path, f"g{s}", 1.0, s, [0.5, 0.6, 0.7, v])
    groups = group_runs(load_runs([tmp_path]))
    p = paired_differences(*groups.values(), "val/acc")
    assert (p["pairs"], p["unpaired"], p["seeds"]) == (2, 2, [0, 1])  # seed 2 only in one, seed 3 in the other
    assert p["final"] == pytest.approx([-0.1, -0.05])  # groups ordered baseline first: baseline - guided
    table, _, _, notes = summarize(groups, "val/acc")
    g = table.set_index("group").loc["guidance.weight=1.0"]
    assert (g["pairs"], g["unpaired"], g["d_final"]) == (2, 2, pytest.approx(0.075))
    assert any("without a seed partner" in n for n in notes)


def test_steps_to_target_per_seed_counts_not_reached_at_run_length(tmp_path):
    make_run(tmp_path, "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.8])
    make_run(tmp_path, "b1", 0.0, 1, [0.5, 0.6, 0.7, 0.8])
    make_run(tmp_path, "g0", 1.0, 0, [0.6, 0.8, 0.85, 0.86])  # reaches 0.8 at step 200
    make_run(tmp_path, "g1", 1.0, 1, [0.5, 0.6, 0.7, 0.75])   # never: counted as 400
    table, *_ = summarize(group_runs(load_runs([tmp_path])), "val/acc")
    g = table.set_index("group").loc["guidance.weight=1.0"]
    assert g["d_steps"] == pytest.approx((200 - 400 + 400 - 400) / 2) and g["steps_censored"] == 1
    assert (g["d_steps_lo"], g["d_steps_hi"]) == (-200, 0)


def test_runs_without_cost_data_report_steps_only(tmp_path):
    make_run(tmp_path, "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.8])
    make_run(tmp_path, "g0", 1.0, 0, [0.6, 0.8, 0.85, 0.86])
    groups = group_runs(load_runs([tmp_path]))
    assert math.isnan(contention(groups["guidance.weight=1.0"][0], "val/acc"))
    table, target, base, _ = summarize(groups, "val/acc")
    g = table.set_index("group").loc["guidance.weight=1.0"]
    assert math.isnan(g["cost_to_target_s"]) and math.isnan(g["cost_ratio"]) and g["wall_reliable"] is None
    assert g["steps_ratio"] == 0.5  # the steps are reported as before
    md = main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0 and (tmp_path / "out" / "table.md").read_text()
    assert "No cost data (`val/cost_s`" in md and "steps only" in md
    row = next(line for line in md.splitlines() if line.startswith("| w=1 |"))
    assert "| 0.50 | — | — | — | — |" in row  # steps ratio, then no cost ratio, time, time ratio, contention
    text = verdict(table, groups, "val/acc", target, base)
    assert "0.50x the baseline's steps. No cost data" in text and "wall-clock left out" in text
    assert "training time" not in text and "Cost to target" not in text


def test_cost_to_target_ratio_and_paired_cost_with_equal_conditions(tmp_path):
    # the guided step costs half a baseline step (0.25 vs 0.5 s, as token dropping does); both ran under equal
    # conditions (wall-clock 2x the cost): wall-clock is reliable and shown
    groups = guided_cost_runs(tmp_path, guided_sec_per_step=0.5, guided_cost_per_step=0.25)
    table, target, base, notes = summarize(groups, "val/acc")
    t = table.set_index("group")
    b, g = t.loc[base], t.loc["guidance.weight=0.3"]
    assert b["cost_to_target_s"] == pytest.approx(200) and b["total_cost_s"] == pytest.approx(200)
    # the mean curve crosses 0.8 at 266.7 steps, at 0.25 s of compute per step
    assert g["cost_to_target_s"] == pytest.approx(800 / 3 * 0.25)
    assert g["cost_ratio"] == pytest.approx(800 / 3 * 0.25 / 200)
    assert g["steps_ratio"] == pytest.approx(800 / 3 / 400)
    # per seed: reached at steps 200 and 300, i.e. 50 and 75 s against the baseline's 200 s
    p = paired_differences(groups["guidance.weight=0.3"], groups[base], "val/acc", target)
    assert p["cost"] == pytest.approx([-150, -125]) and g["d_cost"] == pytest.approx(-137.5)
    assert (g["d_cost_lo"], g["d_cost_hi"]) == (-150, -125)
    assert (g["contention"], b["contention"]) == (2.0, 2.0) and g["wall_reliable"] and b["wall_reliable"]
    assert g["time_ratio"] == pytest.approx(g["cost_ratio"])
    text = verdict(table, groups, "val/acc", target, base)
    assert f"{800 / 3 / 400:.2f}x the baseline's steps and {800 / 3 * 0.25 / 200:.2f}x its compute (cost)" in text
    assert "Wall-clock 0.33x the baseline's (reliable" in text and "cost to target (s) -137.5" in text
    md = main([str(tmp_path), "--out", str(tmp_path / "out"), "--verdict"]) == 0 and \
        (tmp_path / "out" / "table.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| w=0.3 |"))
    assert "| 66.7 | 0.67 | 0.33 | 133.3 | 0.33 | 2.00 |" in row and "unreliable" not in md
    assert "| -137.5 [-150.0, -125.0] * |" in md


@pytest.mark.parametrize("factor, reliable", [(2.0, True), (2.19, True), (1.81, True), (2.25, False), (1.7, False)])
def test_wall_clock_is_reliable_within_10_percent_of_the_baseline_median(tmp_path, factor, reliable):
    # baseline factors 1.9, 2.0, 2.1 (median 2.0, all within 10 %); one guided run at `factor`, another at 2.0
    for s, f in enumerate([1.9, 2.0, 2.1]):
        make_run(tmp_path, f"b{s}", 0.0, s, [0.5, 0.6, 0.7, 0.8], sec_per_step=0.5 * f, cost_per_step=0.5)
    for s, f in enumerate([factor, 2.0]):
        make_run(tmp_path, f"g{s}", 1.0, s, [0.6, 0.8, 0.85, 0.86], sec_per_step=0.5 * f, cost_per_step=0.5)
    groups = group_runs(load_runs([tmp_path]))
    base = "guidance.weight=0.0"
    assert wall_clock_reliable(groups, "val/acc", base) == {base: True, "guidance.weight=1.0": reliable}
    # a baseline whose own runs disagree leaves every group's wall-clock unreliable
    make_run(tmp_path, "b3", 0.0, 3, [0.5, 0.6, 0.7, 0.8], sec_per_step=1.5, cost_per_step=0.5)
    groups = group_runs(load_runs([tmp_path]))
    assert set(wall_clock_reliable(groups, "val/acc", base).values()) == {False}


def test_a_seed_that_never_reaches_counts_at_its_total_cost(tmp_path):
    make_run(tmp_path, "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.8], cost_per_step=0.5)
    make_run(tmp_path, "g0", 1.0, 0, [0.5, 0.6, 0.7, 0.75], cost_per_step=0.3)  # never reaches: 400 * 0.3 = 120 s
    groups = group_runs(load_runs([tmp_path]))
    p = paired_differences(groups["guidance.weight=1.0"], groups["guidance.weight=0.0"], "val/acc", 0.8)
    assert p["cost"] == pytest.approx([120 - 200]) and p["steps_censored"] == 1


@pytest.mark.parametrize("values, higher_is_better, expected", [
    ([0.30, 0.35, 0.40], True, True),     # accuracy rises
    ([0.33, 0.32, 0.30], True, False),    # accuracy falls (iBOT's kNN at 300 CPU steps)
    ([0.50, 0.60, 0.50], True, False),    # a tie: nothing gained after the first validation
    ([2.0, 1.5, 1.2], False, True),       # a loss falls
    ([1.2, 1.5, 1.3], False, False),      # a loss ends above its start
    ([0.4], True, None),                  # one validation: unknown
    ([float("nan"), 0.5], True, None),    # no value at one end: unknown
])
def test_improved_compares_the_last_validation_with_the_first(values, higher_is_better, expected):
    from siftguide.analysis.stats import improved

    curve = pd.DataFrame({"step": [50 * (i + 1) for i in range(len(values))], "value": values})
    assert improved(curve, higher_is_better) is expected
