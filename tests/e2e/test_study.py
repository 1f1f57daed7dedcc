"""``python -m siftguide.study`` end to end on an image folder."""
import sys

import pytest

from siftguide import study

pytestmark = pytest.mark.e2e


@pytest.mark.e2e
def test_study_on_an_image_folder_runs_every_arm(tmp_path):
    """Issue 21: every guided run of a study on an image folder used to fail (relevance.cache=true refused image
    folders); now the folder cache serves them (one build, shared by the runs)."""
    import subprocess

    from tests.conftest import ROOT, TINY
    from tests.helpers import write_folder

    write_folder(tmp_path / "data", n_per_class=8)
    tiny = [o for o in TINY if not o.startswith("data.")]
    cmd = [sys.executable, "-m", "siftguide.study", "data=image_folder", f"data.root={tmp_path / 'data'}",
           "data.num_workers=0", "data.batch_size=4", "model.in_chans=1", "transform=grey", "num_classes=2",
           "callbacks.knn=null", "trainer.max_steps=2", f"relevance.cache_dir={tmp_path / 'kp'}", *tiny,
           "--modes", "prior", "--controls", "shuffled", "--seeds", "1", "--out", str(tmp_path / "study")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for arm in ("baseline/none", "prior/sift", "prior/shuffled"):
        assert study.is_finished(tmp_path / "study" / arm / "s0"), arm
    assert len(list((tmp_path / "kp").glob("folder-*"))) == 2  # one train and one val cache, shared by the arms
