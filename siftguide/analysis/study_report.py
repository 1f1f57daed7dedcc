"""The report of a study directory: ``python -m siftguide.analysis.study_report OUT``.

Reads ``OUT/study.json`` (written by ``python -m siftguide.study``: its runs, their overrides, the common overrides
and the metric), compares the finished runs (:mod:`siftguide.analysis.compare`: ``report/table.md``, ``curves.png``,
``verdict.md``, ``verdict.json``) and writes the recipe (``report/recommended.yaml``,
:mod:`siftguide.analysis.recipe`). Every planned run's state is read from its directory (finished, failed,
interrupted, in flight, missing): a report with runs not finished says ``complete: false`` in ``verdict.json`` (with
the list), on top of ``verdict.md`` and in ``recommended.yaml`` (status ``incomplete``, no advice). The study runs it
in a process of its own once its runs are done; run it by hand to rebuild a report from the files alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from filelock import FileLock

from ..run.lock import RunDirectoryInUse, RunLock
from . import compare, recipe

__all__ = ["main", "write_report", "is_finished", "run_state"]


def is_finished(run_dir: Path) -> bool:
    """A run that ended normally (train.py wrote ``results.json`` with ``status: finished``)."""
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def _data_name(common: list[str]) -> str:
    """The data the study ran on, from its overrides (``data=...``, plus ``data.root``), else the default."""
    data = next((o.split("=", 1)[1] for o in reversed(common) if o.startswith("data=")), "fashion_mnist (default)")
    root = next((o.split("=", 1)[1] for o in reversed(common) if o.startswith("data.root=")), None)
    return f"{data} (root={root})" if root else data


def _own_overrides(run: dict, common: list[str]) -> list[str]:
    """A run's own overrides: those of its mode and map kind, without the study's common ones and the seed."""
    ovr = run["overrides"]
    own = ovr[len(common):] if ovr[:len(common)] == common else [o for o in ovr if o not in common]
    return [o for o in own if not o.startswith("seed=")]


def run_state(run_dir: Path) -> str:
    """``finished``, ``failed``, ``interrupted`` (its results.json says so, or it was killed: a checkpoint or metrics
    without results), ``in flight`` (a study or a training holds its lock now) or ``missing`` (never started)."""
    try:
        status = json.loads((run_dir / "results.json").read_text()).get("status")
    except (OSError, ValueError):
        status = None
    if status in ("finished", "failed", "interrupted"):
        return status
    for name in ("study.lock", "run.lock"):
        if (run_dir / name).exists():
            probe = RunLock(run_dir, name=name)
            try:
                probe.acquire()
            except RunDirectoryInUse:
                return "in flight"
            probe.release()
    if (run_dir / "checkpoints").is_dir() or (run_dir / "metrics.csv").is_file():
        return "interrupted"
    return "missing"


def write_report(out: Path) -> int:
    """The report of the study in ``out`` (see the module docstring), written under ``out/report.lock`` (two
    studies sharing ``out`` never write it at once); returns the compare's exit code (1: no finished baseline run
    yet, nothing written)."""
    with FileLock(out / "report.lock", timeout=600):
        return _write_report(out)


def _write_report(out: Path) -> int:
    plan = json.loads((out / "study.json").read_text())
    runs, common, metric = plan["runs"], plan["common_overrides"], plan["metric"]
    states = {r["directory"]: run_state(out / r["directory"]) for r in runs}
    done = [out / r["directory"] for r in runs if states[r["directory"]] == "finished"]
    not_finished = [{"run": d, "state": s} for d, s in states.items() if s != "finished"]
    if not_finished:
        listed = ", ".join(f"{r['run']}: {r['state']}" for r in not_finished[:6])
        print(f"the study is incomplete: {len(not_finished)} of {len(runs)} runs not finished ({listed}"
              f"{' ...' if len(not_finished) > 6 else ''})")
    if not any(r["kind"] == "none" and states[r["directory"]] == "finished" for r in runs):
        print("no finished baseline run yet: no report")
        return 1
    rc = compare.main([*map(str, done), "--out", str(out / "report"), "--metric", metric, "--verdict"])
    path = out / "report" / "verdict.json"
    if rc != 0 or not path.is_file():
        return rc
    verdict = json.loads(path.read_text())
    by_dir = {str((out / r["directory"]).resolve()): r for r in runs}
    unfinished_modes = {r["mode"] for r in runs if states[r["directory"]] != "finished"}
    for g in verdict["groups"]:
        mine = [by_dir.get(str(Path(d).resolve())) for d in g["runs"]]
        own = {tuple(_own_overrides(r, common)) for r in mine if r is not None}
        g["overrides"] = list(own.pop()) if len(own) == 1 and None not in mine else None
        g["incomplete"] = any(r is not None and r["mode"] in unfinished_modes for r in mine)
    verdict.update(common_overrides=common, data=_data_name(plan["overrides"]), complete=not not_finished,
                   not_finished=not_finished)
    path.write_text(json.dumps(verdict, indent=1) + "\n")
    if not_finished:
        md = out / "report" / "verdict.md"
        md.write_text(f"**Incomplete study** (complete: false): {len(not_finished)} of {len(runs)} planned runs did "
                      f"not finish: " + ", ".join(f"`{r['run']}` ({r['state']})" for r in not_finished)
                      + ". No advice until they do.\n\n" + md.read_text())
    rec = recipe.recommend(verdict)
    (out / "report" / "recommended.yaml").write_text(recipe.recommendation_yaml(rec))
    print(f"{rec['status']}: {rec['statement']}")
    if rec["command"]:
        print(f"command: {rec['command']}")
    print(f"wrote {path} and {out / 'report' / 'recommended.yaml'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m siftguide.analysis.study_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the study directory (holds study.json)")
    args = ap.parse_args(argv)
    if not (Path(args.out) / "study.json").is_file():
        ap.error(f"{args.out} holds no study.json: not a study directory (python -m siftguide.study writes it)")
    return write_report(Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
