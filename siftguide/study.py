"""Does guidance help on *my* data, and is it SIFT? One command:

    python -m siftguide.study data=fashion_mnist_translated --modes attention prior token_drop --seeds 3

runs the baseline (``guidance=none``), every chosen guidance mode with SIFT relevance, and each mode's wrong-map
controls (``relevance.kind=shuffled|rolled|mean``, ``random`` for token dropping and masking, the ``foreground``
oracle on request) over the seeds, then writes the compare report (``report/table.md``, ``curves.png``), a
plain verdict (``report/verdict.md``, the same machine-readable in ``report/verdict.json``) and the recipe
(``report/recommended.yaml``): the best setting for this data, its evidence and the one command that trains with
it, or a plain statement that no setting beat its wrong-map controls and the baseline is the one to use (see
``siftguide.analysis.recipe``).

* Every run is one ``train.py`` process with ``hydra.run.dir=OUT/<mode>/<kind>/s<seed>`` (the baseline:
  ``OUT/baseline/none/s<seed>``): one failing run does not stop the study, and runs can go in parallel
  (``--jobs``).
* Finished runs (``results.json`` with ``status: finished``) are skipped, so an interrupted study is resumed by
  running the same command again; a run that was cut short continues from its last checkpoint (every run gets
  ``ckpt_path=last``: exact resume in place, a fresh start when it has none) and appends to its ``console.log``; the
  study's plan is kept in ``OUT/study.json``. A run being trained holds ``study.lock`` (an OS file lock, released
  when the study ends however it ends; ``study.lock.holder`` names the training process and its host): several
  studies may share a directory (or a disk, from several machines) without training a run twice.
* Runs are ordered seed by seed: after k seeds every setting has k seeds, so a study cut short is still balanced.
* A mode is a guidance config name, optionally with overrides in the same string:
  ``--modes attention 'prior guidance.prior.beta=2' '[attention,token_drop]'``.
* Overrides before/after the options apply to every run (``data=...``, ``trainer.max_steps=300``, ...).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from siftguide.run.resume import RESULTS_FILE
from siftguide.run.lock import RunDirectoryInUse, RunLock, holder_text, read_holder

__all__ = ["StudyRun", "plan", "is_finished", "claim", "main", "CONTROLS"]

# wrong-map controls per mode: "main" is the one a screening uses, "auto" all of them
CONTROLS = {
    "default": {"main": ["shuffled"], "auto": ["shuffled", "rolled", "mean"]},
    "token_drop": {"main": ["random"], "auto": ["random", "shuffled", "rolled", "mean"]},
    "masking": {"main": ["random"], "auto": ["random", "shuffled", "rolled", "mean"]},
}
TRAIN_MODULE = "siftguide.train"  # each run: `python -m siftguide.train` (works from an installed wheel too)
REPORT_MODULE = "siftguide.analysis.study_report"  # the report: `python -m siftguide.analysis.study_report OUT`
# put before the user's overrides in every run (see ``plan``); the recipe's command keeps them
STUDY_OVERRIDES = ["relevance.cache=auto"]


@dataclass
class StudyRun:
    """One training run of a study."""

    mode: str                      # label of the mode setting ("baseline" for guidance=none)
    kind: str                      # relevance kind ("none" for the baseline)
    seed: int
    overrides: list[str] = field(default_factory=list)
    tag: str = ""                  # --new: a short hash of the overrides, so the run gets a folder of its own

    def directory(self, out: Path) -> Path:
        return out / self.mode / self.kind / (f"s{self.seed}-{self.tag}" if self.tag else f"s{self.seed}")


RECORD_FILE = "study_run.json"  # in each run directory: the overrides the study trained it with
# in each run directory: the training process's output (stdout and stderr), each attempt under a header; the run's
# own log records are in train.log (Hydra's), so no line is written twice into one file
CONSOLE_FILE = "console.log"


def trained_with(run_dir: Path) -> list[str] | None:
    """The overrides a study trained ``run_dir`` with (``study_run.json``), or None (not trained by a study)."""
    try:
        return list(json.loads((run_dir / RECORD_FILE).read_text())["overrides"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def differing_keys(old: list[str], new: list[str]) -> list[str]:
    """``key: old -> new`` for every override whose value differs or that only one list has (``<absent>``)."""
    a, b = (dict(o.split("=", 1) for o in x if "=" in o) for x in (old, new))
    return [f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def mismatched(runs: list["StudyRun"], out: Path) -> dict[Path, list[str]]:
    """The runs of this plan whose directory holds a run trained with other overrides: ``{directory: differing
    keys}`` (a directory without a record, or not started, is not a mismatch)."""
    found = {}
    for r in runs:
        old = trained_with(r.directory(out))
        if old is not None and old != r.overrides:
            found[r.directory(out)] = differing_keys(old, r.overrides)
    return found


def _mode_label(spec: str) -> tuple[str, str, list[str]]:
    """``(label, guidance, overrides)`` of a mode spec ``"NAME [key=value ...]"``."""
    parts = shlex.split(spec)
    if not parts:
        raise ValueError("empty --modes entry")
    name, extra = parts[0], parts[1:]
    if "=" in name:
        raise ValueError(f"--modes entry {spec!r} is an override, not a guidance config name: put overrides "
                         f"before --modes, or inside a mode ('NAME key=value')")
    for o in extra:
        if "=" not in o:
            raise ValueError(f"mode {spec!r}: {o!r} is not a key=value override")
    base = re.sub(r"[^A-Za-z0-9_]+", "+", name.strip("[]"))
    tags = [f"{o.split('=', 1)[0].rsplit('.', 1)[-1]}{o.split('=', 1)[1]}" for o in extra]
    label = "_".join([base] + [re.sub(r"[^A-Za-z0-9.+-]+", "", t) for t in tags])
    return label, name, extra


def _mode_names(guidance: str) -> list[str]:
    return [n.strip() for n in guidance.strip("[]").split(",") if n.strip()]


def controls_for(guidance: str, which: str) -> list[str]:
    """The wrong-map controls of a mode for ``which`` = ``main`` | ``auto`` | ``none`` | a comma list."""
    if which == "none":
        return []
    if which in ("main", "auto"):
        out: list[str] = []
        for n in _mode_names(guidance):
            for k in CONTROLS.get(n, CONTROLS["default"])[which]:
                if k not in out:
                    out.append(k)
        return out
    return [k.strip() for k in which.split(",") if k.strip()]


def plan(modes: list[str], seeds: list[int], controls: str = "main", oracle: bool = False,
         overrides: list[str] | None = None, baseline: bool = True, new: bool = False) -> list[StudyRun]:
    """Every run of a study, seed by seed (baseline, then each mode with SIFT, its controls, the oracle); ``new``:
    each run's folder carries a hash of its overrides (``s0-<hash>``), apart from runs trained with other ones."""
    common = list(overrides or [])
    per_seed: list[tuple[str, str, list[str]]] = []
    if baseline:
        per_seed.append(("baseline", "none", ["guidance=none"]))
    labels = set()
    for spec in modes:
        label, guidance, extra = _mode_label(spec)
        if label in labels:
            raise ValueError(f"--modes has {label!r} twice")
        labels.add(label)
        kinds = ["sift"] + controls_for(guidance, controls) + (["foreground"] if oracle else [])
        for kind in dict.fromkeys(kinds):
            per_seed.append((label, kind, [f"guidance={guidance}", f"relevance.kind={kind}", *extra]))
    # the keypoint cache wherever the data allows it (in-memory images, image folders), for every run (runs without
    # keypoints ignore it), so that it is not a compared setting; a user's relevance.cache=... comes later and wins
    out = [StudyRun(label, kind, s, [*STUDY_OVERRIDES, *common, *ovr, f"seed={s}"])
           for s in seeds for label, kind, ovr in per_seed]
    if new:
        for r in out:
            r.tag = hashlib.sha1(json.dumps(r.overrides).encode()).hexdigest()[:8]
    return out


def is_finished(run_dir: Path) -> bool:
    """A run that ended normally (train.py wrote ``results.json`` with ``status: finished``)."""
    try:
        return json.loads((run_dir / RESULTS_FILE).read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


LOCK_FILE = "study.lock"  # in a run directory while a study trains it (holder: its train.py process)


def claim(run_dir: Path) -> RunLock | None:
    """Take ``run_dir`` for this study (an OS file lock, :class:`~siftguide.run.lock.RunLock`: released when the
    study ends, however it ends), unless it is finished or another study holds it: two studies on one directory (or
    ``--jobs`` of several machines on a shared disk) never train one run twice. Returns the held lock, or None."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_finished(run_dir):
        return None
    lock = RunLock(run_dir, name=LOCK_FILE, what="study")
    try:
        lock.acquire()
    except RunDirectoryInUse:
        return None
    if is_finished(run_dir):  # finished while we waited for the lock
        lock.release()
        return None
    return lock


def lock_note(run_dir: Path) -> str:
    """Who holds ``run_dir``'s study lock, for a message (empty when nobody does)."""
    holder = read_holder(run_dir / (LOCK_FILE + ".holder"))
    return f" (held by {holder_text(holder)})" if holder else ""


def _key(override: str) -> str:
    """The config key an override sets: ``+a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


class Launcher:
    """Starts the runs' training processes and passes a SIGTERM / SIGINT the study receives on to them: no new run
    starts, each running one saves its checkpoint and ends as a plain run does, the study waits for them and exits
    ``128 + signal``."""

    def __init__(self) -> None:
        self.procs: set[subprocess.Popen] = set()
        self.signum: int | None = None
        self._lock = threading.Lock()
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._forward)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _forward(self, signum, frame) -> None:
        self.signum = signum
        with self._lock:
            for p in self.procs:
                if p.poll() is None:
                    p.send_signal(signum)

    def start(self, cmd: list[str], **kw) -> subprocess.Popen | None:
        with self._lock:
            if self.signum is not None:
                return None
            proc = subprocess.Popen(cmd, **kw)
            self.procs.add(proc)
            return proc

    def done(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self.procs.discard(proc)


def _launch(run: StudyRun, out: Path, threads: int | None, python: str, script: Path | None,
            launcher: Launcher) -> tuple[StudyRun, int | None, float]:
    """Train one run; ``rc`` None when it was skipped (finished, trained by another study meanwhile, or the study
    was stopped by a signal before it started)."""
    d = run.directory(out)
    lock = claim(d)
    if lock is None:
        return run, None, 0.0
    entry = [str(script)] if script is not None else ["-m", TRAIN_MODULE]
    cmd = [python, *entry, *run.overrides, f"hydra.run.dir={d}"]
    if not any(_key(o) == "ckpt_path" for o in run.overrides):
        cmd.append("ckpt_path=last")  # a run interrupted before (killed, pre-empted) continues from its checkpoint
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_SILENT", "true")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    try:
        with open(d / CONSOLE_FILE, "a") as f:  # an earlier attempt's output is kept above this one
            f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}\n" + " ".join(shlex.quote(c) for c in cmd) + "\n")
            f.flush()
            (d / RECORD_FILE).write_text(json.dumps({"overrides": run.overrides}, indent=1) + "\n")
            proc = launcher.start(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            if proc is None:
                return run, None, 0.0
            lock.name_holder(proc.pid)  # the training process is the holder others are told about
            try:
                rc = proc.wait()
            finally:
                launcher.done(proc)
    finally:
        lock.release()
    return run, rc, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m siftguide.study", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Overrides (key=value) apply to every run, e.g. data=fashion_mnist_translated "
                                        "trainer.max_steps=300 logger=csv.")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    ap.add_argument("--modes", nargs="+", default=["attention"],
                    help="guidance configs, each optionally with overrides: 'prior guidance.prior.beta=2'")
    ap.add_argument("--controls", default="main",
                    help="main (one wrong-map control per mode: shuffled; random for token_drop/masking), auto "
                         "(shuffled, rolled, mean, + random), none, or a comma list of relevance kinds")
    ap.add_argument("--oracle", action="store_true", help="also run relevance.kind=foreground (not SIFT: an oracle)")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds")
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--no-baseline", action="store_true", help="skip the guidance=none runs")
    ap.add_argument("--out", default="logs/study", help="study directory (runs, study.json, report/)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cpu_count / jobs threads)")
    ap.add_argument("--metric", default=None,
                    help="compare metric (default: val/acc; val/knn_acc for objective=mae|dino|ibot)")
    ap.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    ap.add_argument("--report-only", action="store_true", help="only write the report of the finished runs")
    ap.add_argument("--new", action="store_true",
                    help="runs whose folder holds a run trained with other overrides are trained anew in folders of "
                         "their own (s<seed>-<hash>) instead of stopping the study")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--train-script", default=None,
                    help="a training script to run instead of the package's entry point (python -m siftguide.train)")
    # intermixed: overrides may also follow the options (scripts append a user's extra overrides at the end)
    args = ap.parse_intermixed_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    for o in args.overrides:
        if "=" not in o:
            ap.error(f"{o!r} is not a key=value override")
        if _key(o) in ("guidance", "relevance.kind", "seed", "hydra.run.dir"):
            ap.error(f"{o!r}: the study sets {o.split('=', 1)[0]} itself (use --modes, --controls, --seeds)")
    script = Path(args.train_script) if args.train_script else None
    if script is not None and not script.is_file():
        ap.error(f"train script {script} not found")
    try:
        runs = plan(args.modes, list(range(args.seed_start, args.seed_start + args.seeds)), args.controls,
                    args.oracle, args.overrides, baseline=not args.no_baseline)
    except ValueError as e:
        ap.error(str(e))
    out = Path(args.out)
    clash = mismatched(runs, out)
    if clash and args.new:
        runs = plan(args.modes, list(range(args.seed_start, args.seed_start + args.seeds)), args.controls,
                    args.oracle, args.overrides, baseline=not args.no_baseline, new=True)
    elif clash:
        d, keys = next(iter(clash.items()))
        print(f"error: {len(clash)} run folder(s) of {out} hold runs trained with other settings than this study's "
              f"(e.g. {d}: {'; '.join(keys)}): reusing them would mix experiments. Use another --out, or --new to "
              f"train this study's runs in folders of their own", file=sys.stderr)
        return 1
    todo = [r for r in runs if not is_finished(r.directory(out))]
    print(f"study {out}: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run")
    if args.dry_run:
        for r in runs:
            state = "done" if r not in todo else "todo"
            print(f"  [{state}] {r.directory(out)}: {' '.join(r.overrides)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    unsupervised = ("objective=mae", "objective=dino", "objective=ibot", "experiment=dino_fm", "experiment=ibot_fm")
    metric = args.metric or ("val/knn_acc" if any(o in unsupervised for o in args.overrides) else "val/acc")
    (out / "study.json").write_text(json.dumps({
        "argv": sys.argv[1:] if argv is None else argv, "overrides": args.overrides,
        "common_overrides": [*STUDY_OVERRIDES, *args.overrides], "metric": metric,
        "runs": [{**asdict(r), "directory": str(r.directory(Path("")))} for r in runs]}, indent=1))
    failed, launcher = [], Launcher()
    if todo and not args.report_only:
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
        launcher.install()
        try:
            with ThreadPoolExecutor(args.jobs) as pool:
                futures = [pool.submit(_launch, r, out, threads, args.python, script, launcher) for r in todo]
                results = []
                for fut in futures:
                    while not fut.done():  # a short wait: the main thread must stay free to take a signal
                        time.sleep(0.2)
                    results.append(fut.result())
                    _progress(len(results), len(todo), *results[-1], out, failed)
        finally:
            launcher.restore()
        if launcher.signum is not None:
            print(f"{signal.Signals(launcher.signum).name}: the running trainings were stopped at a step boundary "
                  f"with their checkpoints; run the same command again to continue", flush=True)
            _report(args, out, failed)
            return 128 + launcher.signum
    return _report(args, out, failed)


def _progress(i: int, n: int, run: StudyRun, rc: int | None, dt: float, out: Path, failed: list[StudyRun]) -> None:
    """Print how a run ended (and remember a failure)."""
    if rc is None:
        print(f"[{i}/{n}] {run.mode}/{run.kind}/s{run.seed}: skipped (finished, being trained by another study"
              f"{lock_note(run.directory(out))}, or the study was stopped)", flush=True)
        return
    state = "ok" if rc == 0 and is_finished(run.directory(out)) else f"FAILED (exit {rc})"
    if state != "ok":
        failed.append(run)
    print(f"[{i}/{n}] {run.mode}/{run.kind}/s{run.seed}: {state} in {dt / 60:.1f} min", flush=True)


def run_report(out: Path, python: str = sys.executable) -> int:
    """The study's report, in a process of its own (:mod:`siftguide.analysis.study_report` reads ``study.json``)."""
    return subprocess.run([python, "-m", REPORT_MODULE, str(out)]).returncode


def _report(args, out: Path, failed: list[StudyRun]) -> int:
    if failed:
        print(f"{len(failed)} runs failed; their logs: " + ", ".join(str(r.directory(out) / CONSOLE_FILE) for r in failed))
    rc = run_report(out)
    return 1 if failed else rc


if __name__ == "__main__":
    sys.exit(main())
