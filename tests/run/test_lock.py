"""One process per run directory: a second one fails fast naming the holder; the lock of a killed process is free
again (an OS lock: never stale); the lock is released however the run ends."""
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from siftguide.run.lock import LOCK_FILE, RunDirectoryInUse, RunLock
from siftguide.train import train

HOLD = textwrap.dedent("""
    import sys, time
    from siftguide.run.lock import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def _holder(directory: Path) -> subprocess.Popen:
    """Another process that holds ``directory``'s lock (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_training_into_a_directory_in_use_fails_naming_the_holder(tiny_cfg):
    cfg = tiny_cfg(["callbacks.knn=null", "trainer.max_steps=2"], name="busy")
    run = Path(cfg.paths.output_dir)
    holder = _holder(run)  # a live training elsewhere
    try:
        with pytest.raises(RunDirectoryInUse, match=f"in use by another training \\(pid {holder.pid} on host "
                                                    f"{socket.gethostname()}"):
            train(cfg)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, LOCK_FILE + ".holder"]  # nothing written
    finally:
        holder.kill()  # SIGKILL: no clean-up at all
        holder.wait()
    train(cfg)  # the OS released the killed process's lock: the run trains
    assert json.loads((run / "results.json").read_text())["status"] == "finished"
    assert not (run / (LOCK_FILE + ".holder")).exists()  # released when the run ended


def test_the_lock_is_released_however_the_run_ends(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with RunLock(tmp_path) as lock:
            assert json.loads(lock.holder_path.read_text())["host"] == socket.gethostname()
            with pytest.raises(RunDirectoryInUse):  # held (another open file: even this process is refused)
                RunLock(tmp_path).acquire()
            raise RuntimeError("boom")
    with RunLock(tmp_path) as again:  # free again
        assert again.held
    with RunLock(tmp_path / "other", enabled=False):  # DDP ranks other than 0
        assert not (tmp_path / "other").exists()
