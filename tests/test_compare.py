"""compare on synthetic runs whose answers are known by construction."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from siftguide.analysis.compare import (auc, bootstrap_ci, contention, group_labels, group_runs, is_baseline,
                                        load_runs, main, paired_differences, reach, summarize, verdict, verdict_data,
                                        wall_clock_reliable)

ROOT = Path(__file__).resolve().parents[1]


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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
    cfg = _merge(cfg, extra or {})
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


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


def test_a_mode_seed_that_follows_the_run_seed_does_not_split_groups(tmp_path):
    # token_drop's config has `seed: ${seed}`: runs of one setting over seeds are one group, not one per seed
    for seed in (0, 1, 2):
        make_run(tmp_path, f"td{seed}", 1.0, seed, [0.5, 0.6, 0.7, 0.8], extra={"guidance": {"token_drop": {
            "keep": 0.5, "seed": seed}}})
    make_run(tmp_path, "fixed", 1.0, 0, [0.5, 0.6, 0.7, 0.8], extra={"guidance": {"token_drop": {
        "keep": 0.5, "seed": 7}}})  # a mode seed set apart from the run seed does define a group
    groups = group_runs(load_runs([tmp_path]))
    assert sorted(len(rs) for rs in groups.values()) == [1, 3]


def test_one_mode_against_the_baseline_is_labelled_with_the_mode(tmp_path):
    # only the guided runs have a mode node: the mode still names their group ("masking w=1", not "w=1")
    make_run(tmp_path, "base", 0.0, 0, [0.5, 0.6, 0.7, 0.8])
    make_run(tmp_path, "mask", 1.0, 0, [0.5, 0.6, 0.7, 0.8],
             extra={"guidance": {"masking": {"_target_": "siftguide.guidance.KeypointMasking"}}})
    groups = group_runs(load_runs([tmp_path]))
    assert sorted(group_labels(groups).values()) == ["baseline", "masking w=1"]


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


def test_controls_form_their_own_groups(tmp_path):
    make_run(tmp_path, "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.8])
    make_run(tmp_path, "s0", 0.3, 0, [0.5, 0.6, 0.7, 0.8], kind="sift")
    make_run(tmp_path, "u0", 0.3, 0, [0.5, 0.6, 0.7, 0.8], kind="shuffled")
    labels = list(group_runs(load_runs([tmp_path])))
    assert len(labels) == 3 and any("kind=shuffled" in lab for lab in labels)


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


def test_option_missing_from_older_runs_does_not_split_groups(tmp_path):
    old = make_run(tmp_path, "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.8])
    new = make_run(tmp_path, "b1", 0.0, 1, [0.5, 0.6, 0.7, 0.8])
    cfg = yaml.safe_load((new / "config.yaml").read_text())
    cfg["guidance"]["target"]["compile"] = False  # an option the older run's config does not have
    (new / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert list(group_runs(load_runs([old, new]))) == ["all runs"]
    cfg["guidance"]["target"]["compile"] = True
    (tmp_path / "b2").mkdir()
    (tmp_path / "b2" / "metrics.csv").write_text((old / "metrics.csv").read_text())
    (tmp_path / "b2" / "config.yaml").write_text(yaml.safe_dump(cfg))
    # runs that have the option disagree: it splits them, and the older run (option unknown) stands apart
    assert sorted(group_runs(load_runs([tmp_path]))) == [f"guidance.target.compile={v}" for v in (False, None, True)]


def test_cli_writes_png_and_tables(tmp_path, capsys):
    make_run(tmp_path / "runs", "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.8])
    make_run(tmp_path / "runs", "g0", 0.3, 0, [0.6, 0.8, 0.85, 0.86])
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert (out / "curves.png").stat().st_size > 10_000
    md = (out / "table.md").read_text()
    assert "steps ratio" in md and "| 0.50 |" in md  # reached at step 200 vs the baseline's 400
    assert pd.read_csv(out / "table.csv").shape[0] == 2
    assert "2 runs in 2 groups" in capsys.readouterr().out


def test_unknown_metric_and_missing_dirs_are_clear_errors(tmp_path):
    make_run(tmp_path, "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.8])
    with pytest.raises(KeyError, match="val/knn_acc"):
        summarize(group_runs(load_runs([tmp_path])), "val/knn_acc")
    with pytest.raises(FileNotFoundError):
        load_runs([tmp_path / "nope"])


# --- area under the curve, paired differences, bootstrap, labels, verdict, the old import path ---------------


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


def _labelled(tmp_path, configs):
    for i, extra in enumerate(configs):
        make_run(tmp_path, f"r{i}", extra.pop("weight", 1.0), 0, [0.5, 0.6, 0.7, 0.8], extra=extra)
    groups = group_runs(load_runs([tmp_path]))
    labels = group_labels(groups)
    assert len(set(labels.values())) == len(groups)
    return sorted(labels.values())


def test_labels_are_short_and_unique(tmp_path):
    # today's layout: weights, the map kind, a schedule, a training budget, an optimizer setting
    configs = [{"weight": 0.0}, {"weight": 1.0}, {"weight": 0.3},
               {"weight": 1.0, "guidance": {"target": {"kind": "shuffled"}}},
               {"weight": 3.0, "guidance": {"schedule": {"kind": "cosine"}}},
               {"weight": 0.0, "trainer": {"max_steps": 350}},
               {"weight": 1.0, "trainer": {"max_steps": 350}, "optimizer": {"betas": [0.9, 0.95]}}]
    defaults = {"guidance": {"schedule": {"kind": "constant"}}, "optimizer": {"betas": [0.9, 0.999]}}
    labels = _labelled(tmp_path / "a", [_merge(defaults, c) for c in configs])
    # aliased keys first (kind, schedule kind, w, steps), then others as "<last component>=<value>"
    assert labels == ["baseline steps=350 betas=0.9+0.999", "baseline steps=400 betas=0.9+0.999",
                      "shuffled constant w=1 steps=400 betas=0.9+0.999",
                      "sift constant w=0.3 steps=400 betas=0.9+0.999",
                      "sift constant w=1 steps=350 betas=0.9+0.95", "sift constant w=1 steps=400 betas=0.9+0.999",
                      "sift cosine w=3 steps=400 betas=0.9+0.999"]
    # the next layout: relevance kinds and guidance modes (each config holds every key); the baseline is marked
    # by an empty mode list, whatever its weight
    defaults = {"relevance": {"kind": "sift"}, "guidance": {"token_drop": {"keep": 0.5}, "prior": {"beta": 1.0}}}
    new = [{"guidance": {"modes": []}}, {"guidance": {"modes": ["attention"]}},
           {"relevance": {"kind": "rolled"}, "guidance": {"modes": ["token_drop"]}},
           {"guidance": {"modes": ["token_drop"]}},
           {"guidance": {"modes": ["token_drop"], "token_drop": {"keep": 0.25}}},
           {"guidance": {"modes": ["prior", "attention"], "prior": {"beta": 2.0}}}]
    labels = _labelled(tmp_path / "b", [_merge(defaults, c) for c in new])
    # settings of modes a group does not use (token_drop.keep for "attention") are left out of its label
    assert labels == ["baseline", "rolled token_drop keep=0.5", "sift attention", "sift prior+attention beta=2",
                      "sift token_drop keep=0.25", "sift token_drop keep=0.5"]
    assert all(len(lab) <= 30 for lab in labels)


def test_label_collisions_fall_back_to_longer_forms(tmp_path):
    # two baselines that differ only in guidance settings (inert at weight 0): "baseline" alone would clash
    labels = _labelled(tmp_path, [{"weight": 0.0}, {"weight": 0.0, "guidance": {"target": {"kind": "shuffled"}}},
                                  {"weight": 1.0}])
    assert labels == ["baseline shuffled w=0", "baseline sift w=0", "sift w=1"]
    # weights 1 and 1.0 (a command-line override vs a YAML value) form two groups whose short forms read the same:
    # the full descriptions tell them apart
    labels = _labelled(tmp_path / "b", [{"weight": 0.0}, {"weight": 1}, {"weight": 1.0}])
    assert labels == ["baseline", "guidance.weight=1", "guidance.weight=1.0"]


def test_modes_as_config_nodes_group_label_and_mark_the_baseline(tmp_path):
    """The composed layout (``guidance=[attention,token_drop]``): one ``guidance.<mode>`` node per mode, a global
    ``guidance.weight`` multiplying the loss modes, ``relevance.kind`` naming the map."""
    attention = {"_target_": "siftguide.guidance.SiftGuidance", "weight": 1.0, "layers": [-1]}
    token_drop = {"_target_": "siftguide.guidance.TokenDrop", "keep": 0.5}
    runs = {  # name: (guidance, relevance kind, is a baseline)
        "none": ({"weight": 0.0}, "sift", True),
        "inert": ({"weight": 0.0, "attention": attention}, "sift", True),  # loss mode at global weight 0
        "att": ({"weight": 1.0, "attention": attention}, "sift", False),
        "att_rolled": ({"weight": 1.0, "attention": attention}, "rolled", False),
        "td": ({"weight": 1.0, "token_drop": token_drop}, "sift", False),
        "td_random": ({"weight": 1.0, "token_drop": token_drop}, "random", False),
        "td_w0": ({"weight": 0.0, "token_drop": {**token_drop, "keep": 0.25}}, "sift", False),  # acts at weight 0
        "both": ({"weight": 1.0, "attention": attention, "token_drop": token_drop}, "sift", False),
    }
    for name, (guidance, kind, _) in runs.items():
        d = tmp_path / name
        d.mkdir()
        pd.DataFrame({"step": [100, 200], "val/acc": [0.5, 0.6]}).to_csv(d / "metrics.csv", index=False)
        (d / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "guidance": guidance, "relevance": {"kind": kind}}))
    loaded = {r.path.name: r for r in load_runs([tmp_path])}
    assert {n: is_baseline(r) for n, r in loaded.items()} == {n: b for n, (_, _, b) in runs.items()}
    assert loaded["both"].config["guidance.modes"] == ("attention", "token_drop")
    groups = group_runs(list(loaded.values()))
    labels = {groups[g][0].path.name: lab for g, lab in group_labels(groups).items()}
    assert labels == {"none": "baseline w=0", "inert": "baseline attention w=0", "att": "sift attention w=1",
                      "att_rolled": "rolled attention w=1", "td": "sift token_drop w=1 keep=0.5",
                      "td_random": "random token_drop w=1 keep=0.5", "td_w0": "sift token_drop w=0 keep=0.25",
                      "both": "sift attention+token_drop w=1 keep=0.5"}


@pytest.mark.parametrize("extra, baseline", [
    ({"guidance": {"modes": []}}, True), ({"guidance": {"_name": "none"}}, True), ({"guidance": None}, True),
    ({"guidance": {"modes": ["attention"]}}, False), ({"guidance": {"modes": ["prior"], "prior": {"weight": 0}}}, True),
    ({}, False)])
def test_baseline_markers(tmp_path, extra, baseline):
    make_run(tmp_path, "r", 1.0, 0, [0.5, 0.6, 0.7, 0.8], extra=extra)
    assert is_baseline(load_runs([tmp_path])[0]) == baseline


def _study(root):
    """Baseline, SIFT w=1 clearly faster, two wrong-map controls at w=1, 3 seeds each."""
    for s, e in enumerate([0.0, 0.01, -0.01]):
        make_run(root, f"b{s}", 0.0, s, np.array([0.5, 0.6, 0.7, 0.8]) + e)
        make_run(root, f"s{s}", 1.0, s, np.array([0.6, 0.75, 0.82, 0.86]) + e)
        make_run(root, f"sh{s}", 1.0, s, np.array([0.52, 0.62, 0.72, 0.81]) + e, kind="shuffled")
        make_run(root, f"ro{s}", 1.0, s, np.array([0.5, 0.6, 0.7, 0.79]) + e, kind="rolled")


def test_verdict_reports_ratios_cis_and_the_best_wrong_map_control(tmp_path):
    _study(tmp_path)
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


def test_old_import_path_is_a_shim():
    import siftguide.analysis.compare as new
    import siftguide.compare as old

    assert all(getattr(old, name) is getattr(new, name) for name in new.__all__)
    assert old.IGNORED_PREFIXES is new.IGNORED_PREFIXES
    assert old.__all__ == ["main"]  # the shim exports only its entry point
    from siftguide.compare import summarize  # older scripts' imports still resolve, through the new modules

    assert summarize is new.summarize
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        old.nope  # noqa: B018


def test_module_cli_in_a_subprocess(tmp_path):
    _study(tmp_path / "runs")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "siftguide.compare", str(tmp_path / "runs"), "--out", str(out),
                           "--verdict"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 runs in 4 groups" in proc.stdout and "SIFT vs best wrong-map control" in proc.stdout
    md = (out / "table.md").read_text()
    assert "| sift w=1 | 3 |" in md and "- `sift w=1`: guidance.target.kind=sift, guidance.weight=1.0" in md
    assert "Δ AUC" in md and (out / "verdict.md").read_text() in proc.stdout
    t = pd.read_csv(out / "table.csv")
    assert {"label", "auc", "auc_seed_std", "pairs", "d_final_lo", "d_steps_hi", "steps_censored"} <= set(t.columns)


# --- the cost axis: time to target on compute that contention cannot bend; wall-clock only where it is reliable ----


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
    for s in (0, 1):
        make_run(tmp_path, f"b{s}", 0.0, s, [0.5, 0.6, 0.7, 0.8], sec_per_step=1.0, cost_per_step=0.5)
    make_run(tmp_path, "g0", 0.3, 0, [0.6, 0.8, 0.85, 0.86], sec_per_step=0.5, cost_per_step=0.25)
    make_run(tmp_path, "g1", 0.3, 1, [0.6, 0.7, 0.8, 0.84], sec_per_step=0.5, cost_per_step=0.25)
    groups = group_runs(load_runs([tmp_path]))
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


def test_contended_wall_clock_is_marked_unreliable_and_the_cost_ratio_is_right(tmp_path):
    # the baseline shared its cores (wall-clock 2x its compute), the guided runs had the machine to themselves
    # (wall-clock = compute); a guided step costs what a baseline step costs. Wall-clock would claim 0.33x; the
    # cost axis gives the true 0.67x (= the steps ratio)
    for s in (0, 1):
        make_run(tmp_path, f"b{s}", 0.0, s, [0.5, 0.6, 0.7, 0.8], sec_per_step=1.0, cost_per_step=0.5)
    make_run(tmp_path, "g0", 0.3, 0, [0.6, 0.8, 0.85, 0.86], sec_per_step=0.5, cost_per_step=0.5)
    make_run(tmp_path, "g1", 0.3, 1, [0.6, 0.7, 0.8, 0.84], sec_per_step=0.5, cost_per_step=0.5)
    groups = group_runs(load_runs([tmp_path]))
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


def _cost_study(root, sift_cost):
    """``_study`` with cost data: every control step costs 0.5 s, a SIFT step ``sift_cost``; equal conditions."""
    for s, e in enumerate([0.0, 0.01, -0.01]):
        make_run(root, f"b{s}", 0.0, s, np.array([0.5, 0.6, 0.7, 0.8]) + e, cost_per_step=0.5, sec_per_step=1.0)
        make_run(root, f"s{s}", 1.0, s, np.array([0.6, 0.75, 0.82, 0.86]) + e, cost_per_step=sift_cost,
                 sec_per_step=2 * sift_cost)
        make_run(root, f"sh{s}", 1.0, s, np.array([0.52, 0.62, 0.72, 0.81]) + e, kind="shuffled", cost_per_step=0.5,
                 sec_per_step=1.0)
        make_run(root, f"ro{s}", 1.0, s, np.array([0.5, 0.6, 0.7, 0.79]) + e, kind="rolled", cost_per_step=0.5,
                 sec_per_step=1.0)


@pytest.mark.parametrize("sift_cost, beats", [(0.4, "yes"), (1.0, "no")])
def test_cost_criterion_against_the_cheapest_control(tmp_path, sift_cost, beats):
    # steps as in test_verdict_reports_ratios_cis_and_the_best_wrong_map_control (SIFT 271 ± 14 vs shuffled 389 ± 11
    # per seed: fewer by more than 2 std); in compute a SIFT step costs sift_cost against 0.5 s: at 0.4 s it still
    # wins, at 1.0 s (twice a control step) it needs more compute than the control though fewer steps
    _cost_study(tmp_path, sift_cost)
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


def test_a_seed_that_never_reaches_counts_at_its_total_cost(tmp_path):
    make_run(tmp_path, "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.8], cost_per_step=0.5)
    make_run(tmp_path, "g0", 1.0, 0, [0.5, 0.6, 0.7, 0.75], cost_per_step=0.3)  # never reaches: 400 * 0.3 = 120 s
    groups = group_runs(load_runs([tmp_path]))
    p = paired_differences(groups["guidance.weight=1.0"], groups["guidance.weight=0.0"], "val/acc", 0.8)
    assert p["cost"] == pytest.approx([120 - 200]) and p["steps_censored"] == 1


def test_verdict_json_is_machine_readable(tmp_path):
    _cost_study(tmp_path / "runs", 0.4)
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
