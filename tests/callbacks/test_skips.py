"""siftguide.callbacks.skips: unreadable files are skipped, counted (across a resume too), warned once per run, and
a mostly unreadable folder stops the run naming them."""
import logging
from pathlib import Path

import numpy as np
import pytest

from siftguide.train import train
from tests.helpers import bad_files_of, folder_cfg, good_png, image_folder, killed_at, run_metrics


def test_run_with_bad_files_finishes_and_logs_skips(tiny_cfg, tmp_path, caplog):
    root = image_folder(tmp_path / "imgs", bad=True, val_bad=True)
    good_png(root / "train" / "c1" / "extra.png", 7)  # 17 good + 3 bad = 5 batches of 4: one epoch draws every file
    cfg = folder_cfg(tiny_cfg, root, ["trainer.max_steps=5", "trainer.val_check_interval=2"])
    with caplog.at_level(logging.WARNING, logger="siftguide.data"):
        train(cfg)
    m = run_metrics(cfg)
    skipped = m["data/skipped"].dropna()
    assert skipped.is_monotonic_increasing and skipped.iloc[-1] == 3 and len(skipped) == 5  # cumulative
    assert (m["val/skipped"].dropna() == 1).all() and m["val/skipped"].notna().sum() == 3  # 1 bad val file per pass
    assert np.isfinite(m["train/loss"].dropna()).all() and m["train/loss"].notna().sum() == 5
    text = caplog.text
    assert "truncated.png" in text and "empty.png" in text and "broken.png" in text


def test_skipped_count_survives_a_resume(tiny_cfg, tmp_path, monkeypatch):
    # killed after step 3 (checkpoint at step 2), resumed with ckpt_path=last: data/skipped ends at the whole
    # run's count, as in the uninterrupted run, not at the count since the resume
    root = image_folder(tmp_path / "imgs", bad=True)
    good_png(root / "train" / "c1" / "extra.png", 7)
    over = ["trainer.max_steps=5", "trainer.val_check_interval=2"]
    cfg = folder_cfg(tiny_cfg, root, over, name="killed")
    with monkeypatch.context() as m:
        killed_at(m, 3)
        with pytest.raises(RuntimeError, match="killed"):
            train(cfg)
    train(folder_cfg(tiny_cfg, root, [*over, "ckpt_path=last"], name="killed"))
    skipped = run_metrics(cfg)["data/skipped"].dropna()
    assert skipped.iloc[-1] == 3 and skipped.is_monotonic_increasing


def test_a_mostly_unreadable_folder_stops_with_the_files_named(tiny_cfg, tmp_path, caplog):
    """94 % of the training files unreadable: after one epoch (32 samples, fewer than 256) the run stops naming
    the files, instead of finishing trained on two images; the end-of-run summary lists them too."""
    root = image_folder(tmp_path / "imgs", n=1)
    for c in (0, 1):
        for i in range(15):
            (root / "train" / f"c{c}" / f"bad{i:02d}.png").write_bytes(b"")
    cfg = folder_cfg(tiny_cfg, root, ["trainer.max_steps=30", "callbacks.knn=null"], name="mostly")
    with caplog.at_level(logging.WARNING, logger="siftguide.data"):
        with pytest.raises(RuntimeError, match=r"30 of the 32 training samples seen \(94%\) were unreadable, more "
                                               r"than data.max_skip_fraction=0.5.*bad"):
            train(cfg)
    assert "30 unreadable files were skipped in this run (30 of 32 training samples seen)" in caplog.text
    result = (Path(cfg.paths.output_dir) / "results.json").read_text()
    assert '"status": "failed"' in result and "UnreadableDataError" in result
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="siftguide.data"):  # a ceiling above the share: trains
        train(folder_cfg(tiny_cfg, root, ["trainer.max_steps=2", "callbacks.knn=null", "data.max_skip_fraction=0.95"],
                          name="tolerant"))
    assert "unreadable files were skipped in this run" in caplog.text


def test_each_unreadable_file_is_warned_once_per_run_not_per_worker(tiny_cfg, tmp_path, caplog):
    """Two loader workers, three epochs: every worker meets the bad files, the main process warns once per file
    (the workers' own warnings never reached the run's log)."""
    root = image_folder(tmp_path / "imgs", n=3, bad=True)
    cfg = folder_cfg(tiny_cfg, root, ["data.num_workers=2", "trainer.max_steps=6", "trainer.val_check_interval=6",
                                       "callbacks.knn=null", "data.batch_size=3"], name="workers")
    with caplog.at_level(logging.WARNING, logger="siftguide.data"):
        train(cfg)
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]
    assert sorted(m.split()[3] for m in warned) == sorted(str(p) for p in bad_files_of(root))
    assert run_metrics(cfg)["data/skipped"].dropna().iloc[-1] == 6  # 3 files x 2 epochs: counted every time
