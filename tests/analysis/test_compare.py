"""The compare command: tables and curves from run directories, in-process and as ``python -m siftguide.analysis.compare``."""
import subprocess
import sys

import pandas as pd
import pytest

from siftguide.analysis.compare import main
from tests.analysis.fake_runs import make_run, study_runs
from tests.conftest import ROOT


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


@pytest.mark.e2e
def test_module_cli_in_a_subprocess(tmp_path):
    study_runs(tmp_path / "runs")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "siftguide.analysis.compare", str(tmp_path / "runs"), "--out", str(out),
                           "--verdict"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 runs in 4 groups" in proc.stdout and "SIFT vs best wrong-map control" in proc.stdout
    md = (out / "table.md").read_text()
    assert "| sift w=1 | 3 |" in md and "- `sift w=1`: guidance.target.kind=sift, guidance.weight=1.0" in md
    assert "Δ AUC" in md and (out / "verdict.md").read_text() in proc.stdout
    t = pd.read_csv(out / "table.csv")
    assert {"label", "auc", "auc_seed_std", "pairs", "d_final_lo", "d_steps_hi", "steps_censored"} <= set(t.columns)
