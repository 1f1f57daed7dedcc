"""compare on synthetic runs whose answers are known by construction."""
import math

import pandas as pd
import pytest
import yaml

from siftguide.compare import group_runs, load_runs, main, reach, summarize


def make_run(root, name, weight, seed, values, steps=(100, 200, 300, 400), sec_per_step=0.5, kind="sift",
             max_steps=400):
    d = root / name
    d.mkdir(parents=True)
    rows = []
    for s, v in zip(steps, values):
        rows.append({"step": s - 1, "train/loss": 1.0, "val/acc": None})
        rows.append({"step": s, "val/acc": v, "val/step": s, "val/elapsed_s": s * sec_per_step})
    pd.DataFrame(rows).to_csv(d / "metrics.csv", index=False)
    cfg = {"seed": seed, "guidance": {"weight": weight, "target": {"kind": kind, "seed": seed}},
           "paths": {"output_dir": str(d)}, "trainer": {"max_steps": max_steps}}
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
