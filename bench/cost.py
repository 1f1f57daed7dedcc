"""The cost axis under contention: the same short CPU run alone and beside two CPU-bound processes, in one script.

    python bench/cost.py [--steps 30] [--reps 2] [--settings default one_thread spin] [overrides ...]

Each setting runs ``train.py`` (a real run: ``guidance=prior relevance.cache=false``, 2,048 training images, 30 steps
by default) ``--reps`` times alone and ``--reps`` times beside two busy-loop processes
(another user's jobs on the same cores), alternating, and reads the final ``train/cost_s`` (process CPU time of the
training steps) and ``train/elapsed_s`` (wall-clock) from ``metrics.csv``. Printed per setting: the median cost
alone and beside the hogs, their ratio (the cost axis holds when it is within 10 % of 1) and the wall-clock ratio
(which the hogs do bend). Settings:

* ``default``: torch's threads (one per core), waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE``, set by
  ``siftguide.train`` before torch loads OpenMP): ``python train.py cpu_threads=null``;
* ``one_thread``: ``OMP_NUM_THREADS=1``: one compute thread, what ``python train.py`` does (``cpu_threads: 1``);
* ``spin``: ``OMP_WAIT_POLICY=ACTIVE``: OpenMP's spin-waiting, how runs behaved before the passive default.

The alone runs need quiet cores: the script says how much of a core a busy loop got before it starts.

Measured on the project's 2-core CPU, quiet (``python bench/cost.py --reps 1``, one run per cell): ``one_thread``
52.2 s alone, 53.7 s beside two busy processes (1.03x; wall-clock 1.65x); ``default`` with a thread per core 68.6 s
and 53.8 s (0.78x); ``spin`` 57.6 s and 110.7 s (1.92x, wall-clock 3.85x). Hence ``cpu_threads: 1``, the default
(``siftguide.train.cpu_threads``; ``default`` above is ``cpu_threads=null``).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"default": {}, "one_thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
            "spin": {"OMP_WAIT_POLICY": "ACTIVE"}}
THREADS = {"default": "cpu_threads=null", "one_thread": "cpu_threads=1", "spin": "cpu_threads=null"}
RUN = ["guidance=prior", "relevance.cache=false", "data.train_subset=2048", "data.val_subset=256", "logger=csv",
       "callbacks.knn=null", "callbacks.attention_divergence.batches=0", "trainer.enable_progress_bar=false",
       "trainer.enable_model_summary=false"]


def _hog() -> None:
    while True:
        pass


def cpu_share(seconds: float = 1.0) -> float:
    """CPU time / wall-clock of a busy loop here: about 1 on quiet cores."""
    w0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - w0 < seconds:
        pass
    return (time.process_time() - c0) / (time.perf_counter() - w0)


def one_run(setting: str, hogs: int, steps: int, overrides: list[str], out: Path) -> tuple[float, float]:
    """``(train/cost_s, train/elapsed_s)`` of one run beside ``hogs`` busy processes."""
    run_dir = Path(tempfile.mkdtemp(dir=out))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **SETTINGS[setting]}
    procs = [mp.Process(target=_hog, daemon=True) for _ in range(hogs)]
    for p in procs:
        p.start()
    try:
        subprocess.run([sys.executable, str(ROOT / "train.py"), *RUN, THREADS[setting], f"trainer.max_steps={steps}",
                        f"trainer.val_check_interval={steps}", *overrides, f"hydra.run.dir={run_dir}"],
                       env=env, check=True, capture_output=True, cwd=ROOT)
    finally:
        for p in procs:
            p.terminate()
            p.join()
    m = pd.read_csv(run_dir / "metrics.csv")
    return float(m["train/cost_s"].dropna().iloc[-1]), float(m["train/elapsed_s"].dropna().iloc[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args(argv)
    print(f"a busy loop got {cpu_share():.0%} of a core before the runs (quiet cores: ~100 %)", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            runs = {0: [], 2: []}
            for _ in range(args.reps):
                for hogs in (0, 2):
                    runs[hogs].append(one_run(setting, hogs, args.steps, args.overrides, Path(tmp)))
            cost = {h: statistics.median(c for c, _ in r) for h, r in runs.items()}
            wall = {h: statistics.median(w for _, w in r) for h, r in runs.items()}
            results[setting] = {"cost_alone_s": cost[0], "cost_beside_two_s": cost[2],
                                "cost_ratio": cost[2] / cost[0], "wall_ratio": wall[2] / wall[0],
                                "costs": {h: [c for c, _ in r] for h, r in runs.items()}}
            r = results[setting]
            print(f"{setting:10s} cost alone {cost[0]:6.2f} s, beside two busy processes {cost[2]:6.2f} s: "
                  f"{r['cost_ratio']:.2f}x ({'within' if abs(r['cost_ratio'] - 1) <= 0.1 else 'NOT within'} 10 %); "
                  f"wall-clock {r['wall_ratio']:.2f}x; runs {r['costs']}", flush=True)
    return results


if __name__ == "__main__":
    main()
