"""Tables and one figure of scripts/artefact_demo.sh (issue 14): test accuracy of baseline / +prompting / SIFT-guided
models on the artefact datasets, and whether the attention analysis flags the artefact.

    python scripts/artefact_report.py logs/artefact_demo --out docs/results/artefact [--seeds 0 1]

Reads, per run ``OUT/<name>/s<seed>/``: ``results.json`` (val/acc: artefact class-coded; test/acc: decorrelated),
``analysis/spurious_{images,classes}.csv`` (python -m siftguide.analysis.analyze --split test) and
``prompting{,_all}/prompting.csv`` (siftguide-prompt --split test, last block / all blocks). Writes ``table.md``,
``table.csv``, ``summary.png`` (bars: test accuracy; right: attention and gradient excess on keypoint-free
patches) and copies the analysis' ``spurious_overlays.png`` of the two artefact baselines.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from siftguide.data import FASHION_MNIST_CLASSES  # noqa: E402

RUNS = ["clean_baseline", "tint_baseline", "tint_guided", "decoy_baseline", "decoy_guided"]
BAR_BETA = 1.0  # the prior mode's default strength: fixed in advance, not picked on the test split


def _read(run: Path) -> dict | None:
    res = run / "results.json"
    if res.is_file() and json.loads(res.read_text()).get("status") == "finished":
        r = json.loads(res.read_text())
        m = r["metrics"]
        val = pd.read_csv(run / "metrics.csv").dropna(subset=["val/acc"])  # the final validation
        row = {"step": r.get("global_step"), "val_acc": float(val["val/acc"].iloc[-1]), "test_acc": m.get("test/acc")}
    elif (run / "checkpoints" / "last.ckpt").is_file() and (run / "prompting" / "prompting.csv").is_file():
        # stopped early (PARTIAL=1): the last validation of metrics.csv; no full-split test accuracy
        m = pd.read_csv(run / "metrics.csv")
        v = m.dropna(subset=["val/acc"]).iloc[-1]
        row = {"step": int(v["step"]) + 1, "val_acc": float(v["val/acc"]), "test_acc": None, "partial": True}
    else:
        return None
    a = run / "analysis" / "spurious_images.csv"
    if a.is_file():
        img = pd.read_csv(a)
        row.update(analysed=len(img), attn_poor_share=img["attn_poor_share"].mean(),
                   attn_poor_excess=img["attn_poor_excess"].mean(), grad_poor_excess=img["grad_poor_excess"].mean(),
                   poor_patch_frac=img["poor_patch_frac"].mean())
        cls = pd.read_csv(run / "analysis" / "spurious_classes.csv")
        row["top_classes"] = ", ".join(f"{_name(r['class'])} ({r['attn_poor_excess']:+.2f})"
                                       for _, r in cls.head(3).iterrows())
    for tag, sub in (("last", "prompting"), ("all", "prompting_all")):
        p = run / sub / "prompting.csv"
        if p.is_file():
            pr = pd.read_csv(p)
            for _, r in pr.iterrows():
                row[f"prompt_{tag}_acc_b{r['beta']:g}"] = r["accuracy"]
                row[f"prompt_{tag}_poor_b{r['beta']:g}"] = r["poor_share"]
            row[f"prompt_{tag}_images"] = int(pr["images"].iloc[0])
    return row


def _name(c) -> str:
    c = int(c)
    return FASHION_MNIST_CLASSES[c] if 0 <= c < len(FASHION_MNIST_CLASSES) else str(c)


def _fmt(v, d=3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    return f"{v:.{d}f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/results/artefact"))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = ap.parse_args()
    rows = []
    for name in RUNS:
        for s in args.seeds:
            r = _read(args.root / name / f"s{s}")
            if r is None:
                print(f"[missing] {name} s{s}: not finished (or, stopped early, not prompted)")
                continue
            rows.append({"run": name, "seed": s, **r})
    if not rows:
        raise SystemExit(f"no finished runs under {args.root}")
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "table.csv", index=False)
    num = df.drop(columns=["seed", "top_classes"], errors="ignore").groupby("run", sort=False).mean(numeric_only=True)
    seeds = df.groupby("run", sort=False)["seed"].count()
    betas = sorted({float(c.rsplit("_b", 1)[1]) for c in df.columns if c.startswith("prompt_last_acc_b")})

    def g(run, col):
        return num.loc[run, col] if run in num.index and col in num.columns else None

    lines = ["# Planted spurious features: analysis, prompting, SIFT-guided training", "",
             f"Seeds per run: {', '.join(f'{r} {n}' for r, n in seeds.items())}. val: artefact class-coded (as in "
             "training); test: artefact level random (decorrelated from the class). Accuracy on the full 10k test "
             "split from `train.py test=true`; prompting on the first "
             f"{_fmt(g(num.index[0], 'prompt_last_images'), 0) if 'prompt_last_images' in num.columns else '?'} "
             "test images; analysis on the first "
             f"{_fmt(g(num.index[0], 'analysed'), 0) if 'analysed' in num.columns else '?'} test images.", "",
             "## Accuracy", "",
             "| run | val acc | test acc | " + " | ".join(f"prompt β={b:g} (last / all blocks)" for b in betas if b)
             + " |", "|---|---|---|" + "---|" * len([b for b in betas if b])]
    for run in num.index:
        partial = "partial" in df.columns and df[df.run == run]["partial"].eq(True).any()
        label = f"{run} (stopped at step {int(g(run, 'step'))})" if partial else run
        cells = [label, _fmt(g(run, "val_acc")), _fmt(g(run, "test_acc"))]
        for b in betas:
            if b:
                cells.append(f"{_fmt(g(run, f'prompt_last_acc_b{b:g}'))} / {_fmt(g(run, f'prompt_all_acc_b{b:g}'))}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Prompting columns: accuracy on the prompted test images (β=0 there: "
                  + ", ".join(f"{r} {_fmt(g(r, 'prompt_last_acc_b0'))}" for r in num.index) + ").", "",
              "## Does the analysis flag the artefact?", "",
              "Means over the analysed test images of the last block's CLS attention (head mean) and of the input "
              "gradient of the prediction: share on keypoint-free patches, and excess over those patches' fraction "
              "(what uniform attention would give them).", "",
              "| run | keypoint-free patch fraction | attn share | attn excess | grad excess | most flagged classes |",
              "|---|---|---|---|---|---|"]
    for run in num.index:
        top = df[df.run == run]["top_classes"].iloc[0] if "top_classes" in df.columns else ""
        lines.append(f"| {run} | {_fmt(g(run, 'poor_patch_frac'))} | {_fmt(g(run, 'attn_poor_share'))} | "
                     f"{_fmt(g(run, 'attn_poor_excess'), 3)} | {_fmt(g(run, 'grad_poor_excess'), 3)} | "
                     f"{top if isinstance(top, str) else ''} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")

    # ---- figure: accuracy bars (left), poor-patch excess (right)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    groups = [("tint\n(SIFT-invisible)", "tint"), ("decoy\n(SIFT-visible)", "decoy")]
    # every bar on the same prompted test images (beta 0 = the model as trained), so the bars compare exactly
    kinds = [("baseline", lambda a: g(f"{a}_baseline", "prompt_last_acc_b0"), "#888888"),
             (f"+ prompting β={BAR_BETA:g}, last block",
              lambda a: g(f"{a}_baseline", f"prompt_last_acc_b{BAR_BETA:g}"), "#e69f00"),
             (f"+ prompting β={BAR_BETA:g}, all blocks",
              lambda a: g(f"{a}_baseline", f"prompt_all_acc_b{BAR_BETA:g}"), "#d55e00"),
             ("SIFT-guided training", lambda a: g(f"{a}_guided", "prompt_last_acc_b0"), "#0072b2")]
    w = 0.2
    for k, (label, f, color) in enumerate(kinds):
        vals = [f(a) for _, a in groups]
        xs = np.arange(len(groups)) + (k - 1.5) * w
        a1.bar(xs, [v if v is not None else 0 for v in vals], w, label=label, color=color)
        for x, v in zip(xs, vals):
            if v is not None:
                a1.text(x, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    clean = g("clean_baseline", "prompt_last_acc_b0")
    if clean is not None:
        a1.axhline(clean, color="k", ls="--", lw=1, label=f"clean Fashion-MNIST baseline ({clean:.2f})")
    a1.set_xticks(np.arange(len(groups)), [t for t, _ in groups])
    n = g("tint_baseline", "prompt_last_images")
    a1.set_ylabel(f"test accuracy, artefact decorrelated\n(first {_fmt(n, 0)} test images)")
    a1.set_ylim(0, 1.3)
    a1.legend(fontsize=7, loc="upper center", ncol=2)
    a1.set_title(f"What recovers accuracy ({int(seeds.max())} seed{'s' if seeds.max() > 1 else ''})", fontsize=10)
    order = [r for r in ["clean_baseline", "tint_baseline", "tint_guided", "decoy_baseline", "decoy_guided"]
             if r in num.index]
    ys = np.arange(len(order))
    for off, col, color, label in ((-0.18, "attn_poor_excess", "#cc79a7", "CLS attention"),
                                   (0.18, "grad_poor_excess", "#009e73", "input gradient")):
        vals = [g(r, col) if g(r, col) is not None else np.nan for r in order]
        a2.barh(ys + off, vals, 0.36, color=color, label=label)
    a2.axvline(0, color="k", lw=0.8)
    a2.set_yticks(ys, order)
    a2.invert_yaxis()
    a2.set_xlabel("excess share on keypoint-free patches (test)")
    a2.legend(fontsize=7)
    a2.set_title("The analysis' spurious signal", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out / "summary.png", dpi=120)
    plt.close(fig)
    s0 = min(args.seeds)
    for run in ("tint_baseline", "decoy_baseline", "clean_baseline"):
        src = args.root / run / f"s{s0}" / "analysis" / "spurious_overlays.png"
        if src.is_file():
            shutil.copy(src, args.out / f"{run}_flagged.png")
    print((args.out / "table.md").read_text())
    print(f"wrote {args.out}/table.md, table.csv, summary.png")


if __name__ == "__main__":
    main()
