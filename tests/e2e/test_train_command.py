"""``python train.py`` on the command line: one run with wandb offline, a multirun sweep then compare, the Optuna
search config."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


def test_train_py_command_line_with_wandb_offline(tmp_path):
    from tests.conftest import TINY

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    overrides = [o for o in TINY if not o.startswith("logger")] + ["trainer.max_steps=2"]
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = metrics(out)
    assert m["val/acc"].notna().any() and "train/guidance_loss" in m.columns
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run directory missing"
    assert (out / ".hydra" / "config.yaml").is_file()


def test_multirun_sweep_then_compare(tmp_path):
    """`train.py -m` over two guidance weights: one run directory each (config + metrics), then compare."""
    from siftguide.analysis.compare import main as compare_main
    from tests.conftest import TINY

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY if not o.startswith("logger")] + ["trainer.max_steps=3", "callbacks.knn=null"]
    proc = subprocess.run([sys.executable, "train.py", "-m", "guidance.weight=0,1", *overrides,
                           f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.csv"))
    assert len(runs) == 2 and all((r / "config.yaml").is_file() for r in runs)
    assert [("train/guidance_loss" in metrics(r).columns) for r in runs] == [False, True]
    # each job logged to wandb in a group named after the sweep directory
    assert all(list((r / "wandb").glob("offline-run-*")) for r in runs)
    groups = {yaml.safe_load((r / "config.yaml").read_text())["logger"]["wandb"]["group"] for r in runs}
    assert groups == {"sweep"}
    out = tmp_path / "cmp"
    assert compare_main([str(sweep), "--out", str(out)]) == 0
    table = pd.read_csv(out / "table.csv")
    assert list(table["group"]) == ["guidance.weight=0", "guidance.weight=1"]


def test_optuna_search_config_runs_two_trials(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from tests.conftest import TINY

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    # 4 blocks: the search space guides up to layer -3
    overrides = [o for o in TINY if not o.lstrip("+").startswith(("logger", "model.depth"))] + [
        "model.depth=4", "logger=csv", "trainer.max_steps=2", "callbacks.knn=null", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2"]
    proc = subprocess.run([sys.executable, "train.py", "-m", "hparams_search=optuna", *overrides,
                           f"hydra.sweep.dir={tmp_path / 'optuna'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optuna" / "optimization_results.yaml").read_text())
    assert 0.0 <= best["best_value"] <= 1.0 and "guidance.weight" in best["best_params"]


def test_errors_a_user_can_act_on_are_one_paragraph_and_exit_1(tmp_path):
    """A second train.py into a finished run's directory, and a resume that swaps the guidance mode: exit 1 before
    any work, one paragraph on stderr and no traceback (the traceback is in the run's train.log), every file of the
    run unchanged but the log."""
    import hashlib

    from tests.conftest import TINY

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("HYDRA_FULL_ERROR", None)
    out = tmp_path / "run"
    base = [*TINY, "trainer.max_steps=2", "callbacks.knn=null", f"hydra.run.dir={out}"]

    def run(*extra):
        return subprocess.run([sys.executable, "train.py", *base, *extra], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    def sums():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
                if p.is_file() and p.name != "train.log" and ".hydra" not in p.parts}

    assert run().returncode == 0
    before = sums()
    for extra, says in (((), "already holds a finished run (step 2)"),
                        (("ckpt_path=last", "guidance=prior", "trainer.max_steps=4"), "guidance modes")):
        proc = run(*extra)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
        error = proc.stderr[proc.stderr.find("error: "):]  # after Lightning's own "Seed set to 0" line, if any
        assert "\nerror: " in "\n" + proc.stderr and says in error, proc.stderr[-2000:]
        assert sums() == before
    assert "Traceback" in (out / "train.log").read_text()
