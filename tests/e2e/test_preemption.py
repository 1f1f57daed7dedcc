"""The real thing: ``python train.py`` sent SIGTERM at whatever step it reached (in-process signals:
tests/callbacks/test_preemption.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_sigterm_to_train_py_saves_exits_non_zero_and_resumes(tmp_path):
    """The real thing: `python train.py` sent SIGTERM at whatever step it reached."""
    tiny = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval", "logger"))]
    args = [*tiny, "data.train_subset=96", "trainer.max_steps=400", "trainer.val_check_interval=2",
            "callbacks.knn=null", "logger=csv"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ckpt.is_file():
        time.sleep(0.2)
    time.sleep(1.0)  # a few steps past the first checkpoint
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    result = json.loads((run / "results.json").read_text())
    step = result["global_step"]
    assert result["status"] == "interrupted" and 2 <= step < 400
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == step
    subprocess.run([*cmd, "ckpt_path=last", f"trainer.max_steps={step + 2}"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    result = json.loads((run / "results.json").read_text())
    assert result["status"] == "finished" and result["global_step"] == step + 2
    m = pd.read_csv(run / "metrics.csv").dropna(subset=["train/loss"])
    assert m["step"].tolist() == list(range(step + 2))  # every step once: none lost, none repeated
