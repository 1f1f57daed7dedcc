"""The cost axis: ``train/cost_s`` measures the compute of the training steps, not the machine's load."""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from siftguide.train import train

pytestmark = pytest.mark.e2e


def _hog(stop) -> None:
    while not stop.is_set():  # a busy core, as another user's job would be
        pass


def _cpu_share(seconds: float = 1.0) -> float:
    """CPU time / wall-clock of a busy loop in this process: about 1 on a quiet machine, less when other jobs
    compete for the cores."""
    w0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - w0 < seconds:
        pass
    return (time.process_time() - c0) / (time.perf_counter() - w0)


def _usable_cores() -> int:
    """Cores this process may use: its CPU affinity (all cores where the OS has none), capped by a cgroup v2 CPU
    quota when one is set (a container limited to 2 CPUs on a large host)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def _window(metrics_csv: Path, from_step: int = 30) -> tuple[float, float]:
    """(cost, wall-clock) seconds of the training steps after ``from_step``: the first steps (allocations, lazy
    set-up) vary from run to run and are left out."""
    rows = pd.read_csv(metrics_csv)[["step", "train/cost_s", "train/elapsed_s"]].dropna()
    window = rows[rows["step"] >= from_step]
    assert len(window) >= 2, f"fewer than two logged steps after step {from_step} in {metrics_csv}"
    first, last = window.iloc[0], window.iloc[-1]
    return (last["train/cost_s"] - first["train/cost_s"], last["train/elapsed_s"] - first["train/elapsed_s"])


def test_cost_is_the_same_beside_a_cpu_hog_while_wall_clock_is_not(tiny_cfg):
    """Three runs of one config, the middle one beside busy processes, two per core this process may use (so the
    training thread gets about a third of a core): the middle run's train/cost_s stays within 30 % of the mean of the
    two runs alone (seen here: 1.11-1.16x, shared caches cost a little), while its wall-clock grows by more than 1.5x
    (2.3-2.5x seen here on 2 cores; with one hog per core only 1.24-1.36x, too close to the cost's own run-to-run spread,
    once 0.82x in CI over the whole run). The reference runs need the cores
    to themselves: on a machine already busy (other jobs), the test is skipped rather than compared against a loaded
    reference."""
    share = _cpu_share()
    if share < 0.8:
        pytest.skip(f"the machine is busy (this process got {share:.0%} of a core for a second): no quiet reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one compute thread: no OpenMP spin-waiting to count as compute
    n_hogs = 2 * _usable_cores()
    try:
        common = ["trainer.max_steps=150", "trainer.val_check_interval=150", "callbacks.knn=null",
                  "callbacks.attention_divergence.batches=0", "guidance=prior"]
        metrics = {}
        for name in ("alone", "beside_hogs", "alone_again"):
            cfg = tiny_cfg(common, name=name)
            stop, hogs = mp.Event(), []
            if name == "beside_hogs":
                hogs = [mp.Process(target=_hog, args=(stop,), daemon=True) for _ in range(n_hogs)]
                for h in hogs:
                    h.start()
                time.sleep(0.5)
            try:
                train(cfg)
            finally:
                stop.set()
                for h in hogs:
                    h.join(timeout=10)
                    if h.is_alive():  # never let a hog run on into the next reference run
                        h.terminate()
                        h.join()
            metrics[name] = _window(Path(cfg.paths.output_dir) / "metrics.csv")
    finally:
        torch.set_num_threads(threads)
    cost_a = (metrics["alone"][0] + metrics["alone_again"][0]) / 2
    wall_a = (metrics["alone"][1] + metrics["alone_again"][1]) / 2
    cost_b, wall_b = metrics["beside_hogs"]
    print(f"{n_hogs} hogs: cost {cost_a:.2f} -> {cost_b:.2f} s ({cost_b / cost_a:.2f}x), wall-clock {wall_a:.2f} -> "
          f"{wall_b:.2f} s ({wall_b / wall_a:.2f}x)")
    assert abs(cost_b / cost_a - 1) < 0.3, metrics
    assert wall_b / wall_a > 1.5, metrics  # the hogs stretched wall-clock; the cost did not follow
