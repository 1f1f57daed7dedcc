"""siftguide.analysis.runs: runs grouped by what differs (seeds pooled, mode seeds, older options), short unique
labels, the baseline's markers."""
import pandas as pd
import pytest
import yaml

from siftguide.analysis.compare import group_labels, group_runs, is_baseline, load_runs
from tests.analysis.fake_runs import make_run, merge


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


def test_controls_form_their_own_groups(tmp_path):
    make_run(tmp_path, "b0", 0.0, 0, [0.5, 0.6, 0.7, 0.8])
    make_run(tmp_path, "s0", 0.3, 0, [0.5, 0.6, 0.7, 0.8], kind="sift")
    make_run(tmp_path, "u0", 0.3, 0, [0.5, 0.6, 0.7, 0.8], kind="shuffled")
    labels = list(group_runs(load_runs([tmp_path])))
    assert len(labels) == 3 and any("kind=shuffled" in lab for lab in labels)


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
    labels = _labelled(tmp_path / "a", [merge(defaults, c) for c in configs])
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
    labels = _labelled(tmp_path / "b", [merge(defaults, c) for c in new])
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
    attention = {"_target_": "siftguide.guidance.AttentionAlignment", "weight": 1.0, "layers": [-1]}
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


def test_runs_made_before_an_option_existed_group_with_its_default_only(tmp_path):
    """Old runs lack ``guidance.token_drop.budget``: they group with new runs at the declared default (fixed), never
    with new runs that set another value (entropy)."""
    old = {"_target_": "siftguide.guidance.TokenDrop", "keep_ratio": 0.5}
    made = {"old": old, "fixed": {**old, "budget": "fixed"}, "entropy": {**old, "budget": "entropy"}}
    for name, node in made.items():
        d = tmp_path / name
        d.mkdir()
        pd.DataFrame({"step": [100, 200], "val/acc": [0.5, 0.6]}).to_csv(d / "metrics.csv", index=False)
        (d / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "guidance": {"weight": 1.0, "token_drop": node},
                                                       "relevance": {"kind": "sift"}}))
    groups = group_runs(load_runs([tmp_path]))
    assert sorted(sorted(r.path.name for r in g) for g in groups.values()) == [["entropy"], ["fixed", "old"]]
    assert any("budget=entropy" in g for g in groups) and any("budget=fixed" in g for g in groups)
