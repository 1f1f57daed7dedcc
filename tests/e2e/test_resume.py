"""The real thing: ``python train.py`` killed with SIGKILL, then resumed exactly (in-process: tests/run/test_resume.py)."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import ROOT, TINY
from tests.helpers import logged_rows

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_sigkilled_train_py_resumes_exactly(tmp_path):
    """The real thing: `python train.py` killed with SIGKILL at whatever step it reached, then the same command
    with `hydra.run.dir=<run dir> ckpt_path=last`."""
    tiny = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval", "logger"))]
    args = [*tiny, "data.train_subset=96", "trainer.max_steps=30", "trainer.val_check_interval=3", "callbacks.knn=null",
            "logger=csv"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    subprocess.run([*cmd, f"hydra.run.dir={tmp_path / 'full'}"], cwd=ROOT, env=env, check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, f"hydra.run.dir={run}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and ckpt.stat().st_size > 0:
            time.sleep(1.0)  # a few more steps past the checkpoint, then kill
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([*cmd, f"hydra.run.dir={run}", "ckpt_path=last"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    a, b = logged_rows(tmp_path / "full"), logged_rows(run)
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)
