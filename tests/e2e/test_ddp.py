"""``train.py trainer=ddp`` on 2 CPU processes gives the validation metrics of one process with the same global
batch (rank-safe metrics, kNN and keypoint cache: tests/test_module.py, tests/callbacks/test_knn.py,
tests/relevance/test_cache.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from siftguide.train import train
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.e2e


# 2 x 16 vs 1 x 32: a training set of exactly one global batch (so the data order cannot differ), no augmentation
# (each rank draws its own), a validation set divisible by the world size (no DistributedSampler padding)
SAME = ["data.train_subset=32", "data.val_size=64", "transform.crop_scale=null", "transform.hflip=false",
        "trainer.max_steps=3", "trainer.val_check_interval=3", "callbacks.knn.bank_size=32", "callbacks.knn.query_size=64",
        "callbacks.knn.k=5", "logger=csv"]


COMPARED = ("val/acc", "val/loss", "val/knn_acc", "val/attn_div")


@pytest.mark.slow
def test_ddp_on_2_cpu_processes_matches_one_process(tiny_cfg, tmp_path):
    one = tiny_cfg([*SAME, "data.batch_size=32"], name="one")
    single = train(one)
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PL_GLOBAL_SEED": "0"}
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *SAME, "data.batch_size=16", "trainer=ddp",
           "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == 3
    ddp = results["metrics"]
    print("2 x 16 (DDP) vs 1 x 32:", {k: (ddp[k], single[k], abs(ddp[k] - single[k])) for k in COMPARED})
    for k in COMPARED:  # same weights up to fp32 reduction order: equal to 1e-4
        assert ddp[k] == pytest.approx(single[k], abs=1e-4), (k, ddp[k], single[k])
    # one run directory: the child process wrote its log beside rank 0's, nothing elsewhere
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "train_ddp_process_1.log").is_file()
    assert len(list(run_dir.rglob("metrics.csv"))) == 1


@pytest.mark.slow
def test_ibot_trains_on_2_cpu_processes(tmp_path):
    """objective=ibot with SIFT-ranked masks under DDP: the center updates and the kNN gather are collectives every
    rank joins; the run finishes with finite losses and the teacher's metrics."""
    from tests.objectives.test_ibot import IBOT

    run_dir = tmp_path / "ibot_ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PL_GLOBAL_SEED": "0"}
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *IBOT, "guidance=attmask", "data.batch_size=8",
           "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=3",
           "trainer.val_check_interval=3", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["global_step"] == 3
    m = results["metrics"]
    assert all(k in m and m[k] == m[k] for k in ("train/dino_loss", "train/ibot_loss", "val/knn_acc"))  # not NaN
