"""One training per run directory: a second one fails fast naming the holder; a stale lock is taken over."""
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from siftguide.runlock import LOCK_FILE, RunDirectoryInUse, RunLock
from siftguide.train import train


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_training_into_a_directory_in_use_fails_naming_the_holder(tiny_cfg, tmp_path):
    cfg = tiny_cfg(["callbacks.knn=null", "trainer.max_steps=2"], name="busy")
    run = Path(cfg.paths.output_dir)
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live training elsewhere
    try:
        (run / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(RunDirectoryInUse, match=f"in use by another training \\(pid {holder.pid} on host "
                                                    f"{socket.gethostname()}"):
            train(cfg)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written: no config.yaml, no metrics
    finally:
        holder.kill()
        holder.wait()
    # another host's lock cannot be checked from here: held, and the message says how to clear it
    (run / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": "other-node"}))
    with pytest.raises(RunDirectoryInUse, match=f"host other-node.*if it is gone, delete {run / LOCK_FILE}"):
        train(cfg)


def test_a_stale_lock_is_taken_over_and_the_lock_is_released(tiny_cfg, caplog):
    cfg = tiny_cfg(["callbacks.knn=null", "trainer.max_steps=2"], name="stale")
    run = Path(cfg.paths.output_dir)
    run.mkdir(parents=True)
    pid = _dead_pid()  # a killed training of this host
    (run / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="siftguide.train"):
        train(cfg)
    assert f"taking over a stale lock (pid {pid} on host {socket.gethostname()}" in caplog.text
    assert not (run / LOCK_FILE).exists()  # released when the run ended


def test_the_lock_is_released_however_the_run_ends(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with RunLock(tmp_path) as lock:
            assert json.loads(lock.path.read_text())["host"] == socket.gethostname()
            with pytest.raises(RunDirectoryInUse):  # this live process holds it
                RunLock(tmp_path).acquire()
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path, enabled=False):  # DDP ranks other than 0
        assert not (tmp_path / LOCK_FILE).exists()
