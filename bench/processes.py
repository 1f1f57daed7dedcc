"""Training speed at 1 and 2 processes (DDP through Lightning), and peak memory guided vs baseline, in one run.

    python bench/processes.py [--steps 10] [--warmup 3] [--procs 1 2] [--accelerator cpu] [overrides ...]

Runs ``train.py`` itself (the real entry point: Lightning's subprocess launcher, DDP with gloo on CPU, nccl on
GPU) for baseline (``guidance=none``) and guided (the default attention guidance) at each process count, with
the same *per-process* batch (``data.batch_size``), so the global batch grows with the processes. Each run does
``--warmup`` + ``--steps`` optimizer steps and one small validation at the end (not timed). Steps/s come from
rank 0's ``train/elapsed_s`` in ``metrics.csv`` (training wall-clock, validation excluded), over the steps after
the warm-up; a DDP step includes the gradient all-reduce, so it is the global step rate. Images/s = steps/s x
batch x processes. Peak memory: the largest peak RSS (``VmHWM``) of the run's processes, polled from ``/proc``
(host memory; GPU memory: ``bench/gpu.py``).

Printed: one line per run, the throughput ratio of each process count to 1 process (scaling; the ideal is the
process count), and the guided/baseline peak-memory and throughput ratios. Every process gets
``OMP_NUM_THREADS=1`` (``--threads``), so N processes use N cores: on a machine with fewer cores than processes
the ratio measures contention, not scaling.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from ``/proc/<pid>/task/*/children``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _peak_rss(pid: int) -> int:
    """Peak resident set size of a process in bytes (``VmHWM``), 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(name: str, procs: int, steps: int, accelerator: str, overrides: list[str], out: Path,
        threads: int) -> dict:
    run_dir = out / name
    cmd = [sys.executable, str(ROOT / "train.py"), f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
           "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
           f"trainer.accelerator={accelerator}", "logger=csv", "callbacks.knn=null", "callbacks.attention_divergence.batches=0",
           "data.val_size=256", f"hydra.run.dir={run_dir}", *overrides]
    if procs > 1:
        cmd += ["trainer=ddp", f"trainer.devices={procs}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:  # poll the tree: children exit before the parent, their VmHWM with them
        for p in _tree(proc.pid):
            peaks[p] = max(peaks.get(p, 0), _peak_rss(p))
        time.sleep(0.2)
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{log[-3000:]}")
    import pandas as pd

    m = pd.read_csv(run_dir / "metrics.csv")
    el = m.dropna(subset=["train/elapsed_s"]).drop_duplicates("step", keep="last").set_index("step")["train/elapsed_s"]
    return {"elapsed": el, "peak": max(peaks.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    ap.add_argument("--out", default=None, help="run directories (default: a temporary directory)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. data.batch_size=64)")
    args = ap.parse_args()
    if 1 not in args.procs:
        args.procs = [1, *args.procs]
    total = args.warmup + args.steps
    variants = {"baseline": ["guidance=none"], "guided": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        res = {}
        for procs in args.procs:
            for v, ov in variants.items():
                res[v, procs] = r = run(f"{v}_{procs}", procs, total, args.accelerator, [*args.overrides, *ov], out,
                                        args.threads)
                el = r["elapsed"]
                t = el.loc[el.index >= args.warmup]  # elapsed_s at the ends of steps warmup+1 .. total
                r["steps_s"] = (len(t) - 1) / (t.iloc[-1] - t.iloc[0])
    bs = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("data.batch_size=")), "128 (default)")
    bsz = int(bs.split()[0])
    print(f"accelerator {args.accelerator}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={args.threads} per process, "
          f"per-process batch {bs}, {args.steps} timed steps after {args.warmup}, overrides "
          f"{args.overrides or '(default config)'}")
    for (v, procs), r in res.items():
        print(f"{v:9s} {procs} proc  {r['steps_s']:6.3f} steps/s  {r['steps_s'] * bsz * procs:8.1f} img/s  "
              f"peak RSS {r['peak'] / 2**20:7.0f} MiB per process (largest)")
    for procs in args.procs[1:]:
        for v in variants:
            ratio = res[v, procs]["steps_s"] * procs / res[v, 1]["steps_s"]
            print(f"throughput ratio {procs} proc / 1 proc ({v}): {ratio:.3f} (ideal {procs})")
    for procs in args.procs:
        g, b = res["guided", procs], res["baseline", procs]
        print(f"{procs} proc: guided/baseline throughput {g['steps_s'] / b['steps_s']:.3f}, "
              f"peak memory {g['peak'] / b['peak']:.3f}")


if __name__ == "__main__":
    main()
