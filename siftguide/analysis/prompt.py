"""Inference prompting: bias a trained ViT's attention toward keypoint-rich patches and measure the accuracy.

Wu et al. (2022, arXiv 2211.08543) use the SIFT-weighted patch analysis to *prompt* a model at inference: with no
training, the attention logits of chosen blocks get the additive bias of the ``prior`` guidance mode
(:func:`~siftguide.guidance.prior.relevance_bias`, through :class:`~siftguide.attention.AttentionBias`)::

    logit_ij += beta * log(P r_j + eps)        (patch keys j; 0 for the class token and other prefix tokens)

where ``r`` is the image's SIFT relevance over its ``P`` patches (uniform for images without keypoints, which are
therefore unchanged and counted). ``beta = 0`` is the model as trained, bit for bit. For each ``beta`` the tool
reports on a labelled split: accuracy, its change from ``beta = 0``, images fixed (wrong -> right) and broken
(right -> wrong), and where the class token's attention (head mean, last biased block) goes: its share on
keypoint-free patches and its KL / Spearman agreement with ``r`` (the functions of
:mod:`siftguide.analysis.metrics`). If a model leans on a SIFT-invisible spurious feature (a background tint),
pushing attention onto the keypoints may recover accuracy on a split where that feature is decorrelated; a
SIFT-visible one (a marked corner) attracts the bias instead.

Command line (``siftguide-prompt --help``)::

    siftguide-prompt logs/train/runs/<date>/checkpoints/last.ckpt --out prompting/ --split test --beta 0.5 1 2
    siftguide-prompt RUN_DIR --out prompting/ --layers all --num-images 2000 data.test_artefact=none

Writes ``prompting.csv`` (one row per beta), ``prompting_classes.csv`` (accuracy per class and beta) and
``prompting.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..attention import AttentionCapture, attention_to_patches, prefix_tokens, resolve_layers
from ..guidance.prior import AttentionPrior
from ..relevance import relevance_from_keypoints
from ..relevance import counts_from_keypoints, detect_keypoints
from .images import dataset_source, image_batches, normalise
from .loading import AnalyzeError, LoadedModel, load_checkpoint_model
from .metrics import EPS, kl_divergence, poor_share, spearman
from .tables import md_table, write_csv

__all__ = ["prompt_predictions", "prompting_rows", "class_rows", "main"]


def prompt_predictions(net: nn.Module, batches: Iterable[dict], *, mean: Sequence[float], std: Sequence[float],
                       betas: Sequence[float], layers: int | Sequence[int] = -1, eps: float = 0.1,
                       sift: dict | None = None, relevance: dict | None = None,
                       device: str | torch.device = "cpu") -> dict[str, Any]:
    """Predictions and attention statistics of ``net`` for every ``beta`` on ``batches`` of
    ``{"image": (B, C, H, W) in [0, 1] at the net's size, "label": (B,)}``.

    Returns ``dict(betas, labels (n,), preds (K, n), poor_share (K, n), kl (K, n), spearman (K, n) (NaN where the
    relevance is constant), keypoints (n,), layers, measured_layer)`` with ``K = len(betas)``.
    """
    net = net.eval().to(device)
    prior = AttentionPrior(net, layers=layers, beta=1.0, eps=eps)  # constant schedule; beta is passed per call
    measured = prior.layers[-1]
    cap = AttentionCapture(net, layers=[measured])
    pt = prefix_tokens(net)
    kind = "cls" if pt["cls_index"] >= 0 else "mean"
    ph, pw = (int(s) for s in net.patch_embed.patch_size)
    mean_t = torch.as_tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    keys = ("preds", "poor_share", "kl", "spearman")
    acc: dict[str, list[list[Tensor]]] = {k: [[] for _ in betas] for k in keys}
    labels, kps = [], []
    for batch in batches:
        images = batch["image"].to(device)
        if batch.get("label") is None:
            raise ValueError("prompting accuracy needs labelled images")
        h, w = images.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        grid = (h // ph, w // pw)
        sift_in = images if images.shape[1] in (1, 3) else images.mean(1, keepdim=True)
        kp = detect_keypoints(sift_in, **(sift or {}))
        counts = counts_from_keypoints(kp, grid, (ph, pw)).flatten(1).to(device)  # (B, P)
        rel = relevance_from_keypoints(kp, grid, (ph, pw), **(relevance or {})).to(device)  # (B, Gh, Gw)
        r = rel.flatten(1)
        x = normalise(images, mean_t, std_t)
        for k, beta in enumerate(betas):
            with torch.no_grad(), prior.apply(rel, beta=float(beta)), cap.capture():
                logits = net(x)
            attn = attention_to_patches(cap.maps[measured], pt["num_prefix"], pt["cls_index"], kind)  # (B, P)
            cap.clear()
            acc["preds"][k].append(logits.argmax(-1).cpu())
            acc["poor_share"][k].append(poor_share(attn, counts)[0].cpu())
            acc["kl"][k].append(kl_divergence(r, attn.clamp_min(EPS), 0.0).cpu())
            acc["spearman"][k].append(spearman(r, attn).cpu())
        labels.append(batch["label"].long().cpu())
        kps.append(kp.valid.sum(1).cpu())
    if not labels:
        raise ValueError("no images to prompt")
    out = {k: torch.stack([torch.cat(v) for v in acc[k]]) for k in keys}
    return dict(out, betas=[float(b) for b in betas], labels=torch.cat(labels), keypoints=torch.cat(kps),
                layers=prior.layers, measured_layer=measured)


def prompting_rows(preds: Tensor, labels: Tensor, betas: Sequence[float], **per_image: Tensor) -> list[dict]:
    """One row per beta: ``accuracy``, ``delta`` (vs the ``beta = 0`` row, or the first), ``fixed`` / ``broken``
    (images wrong -> right / right -> wrong against that row), and the mean over images of each ``(K, n)`` tensor
    in ``per_image`` (NaNs skipped). ``preds (K, n)``, ``labels (n,)``."""
    if preds.ndim != 2 or preds.shape != (len(betas), labels.shape[0]):
        raise ValueError(f"preds must be (K={len(betas)}, n={labels.shape[0]}), got {tuple(preds.shape)}")
    ref = [float(b) for b in betas].index(0.0) if 0.0 in [float(b) for b in betas] else 0
    correct = preds == labels[None]  # (K, n)
    rows = []
    for k, beta in enumerate(betas):
        row = dict(beta=float(beta), images=int(labels.shape[0]), correct=int(correct[k].sum()),
                   accuracy=float(correct[k].float().mean()),
                   delta=float(correct[k].float().mean() - correct[ref].float().mean()),
                   fixed=int((correct[k] & ~correct[ref]).sum()), broken=int((~correct[k] & correct[ref]).sum()))
        for name, v in per_image.items():
            row[name] = float(v[k].float().nanmean())
        rows.append(row)
    return rows


def class_rows(preds: Tensor, labels: Tensor, betas: Sequence[float], names: Sequence[str] | None = None) -> list[dict]:
    """Accuracy per true class (rows) and beta (columns ``acc_beta<b>``)."""
    rows = []
    for c in sorted(set(labels.tolist())):
        sel = labels == c
        row: dict[str, Any] = dict(label=c, name=names[c] if names and 0 <= c < len(names) else str(c),
                                   images=int(sel.sum()))
        for k, beta in enumerate(betas):
            row[f"acc_beta{float(beta):g}"] = float((preds[k, sel] == c).float().mean())
        rows.append(row)
    return rows


# ================================================================================================ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="siftguide-prompt",
        description="Inference prompting: add beta * log(P r + eps) (r: SIFT relevance) to chosen blocks' attention "
                    "logits of a trained siftguide classifier and report accuracy with and without it on a "
                    "labelled split. Writes prompting.csv, prompting_classes.csv and prompting.md into --out.")
    p.add_argument("model", metavar="CHECKPOINT",
                   help="a supervised siftguide checkpoint (.ckpt file or run directory)")
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE",
                   help="overrides of the checkpoint's data config, e.g. data.test_artefact=none")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--beta", type=float, nargs="+", default=[1.0],
                   help="bias strengths (default 1); beta 0 (no prompting) is always added")
    p.add_argument("--layers", nargs="+", default=["-1"],
                   help="biased blocks, negative from the end, or 'all' (default -1)")
    p.add_argument("--eps", type=float, default=0.1, help="floor inside the log (default 0.1, as the prior mode)")
    p.add_argument("--split", default="test", choices=("val", "test", "train"), help="data split (default test)")
    p.add_argument("--num-images", type=int, default=2000, help="images evaluated (default 2000; first of the split)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=None, help="checked against the checkpoint's input size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _layers(spec: Sequence[str], net: nn.Module) -> list[int]:
    if list(spec) == ["all"]:
        return list(range(len(net.blocks)))
    try:
        return resolve_layers(net, [int(v) for v in spec])
    except ValueError as e:  # not integers, or out of range
        raise AnalyzeError(f"--layers {' '.join(spec)}: {e} (give block indices, negative from the end, or 'all')")


def _load(args) -> LoadedModel:
    if not Path(args.model).exists():
        raise AnalyzeError(f"checkpoint not found: {args.model} (give a .ckpt file or a run directory)")
    model = load_checkpoint_model(args.model)
    objective = str(((model.config or {}).get("objective") or {}).get("_target_", ""))
    if not objective.endswith("SupervisedObjective"):
        raise AnalyzeError(f"{args.model} was trained with {objective or 'an unknown objective'}: its classification "
                           "head is not trained, so prompting accuracy is meaningless; use a checkpoint of "
                           "objective=supervised")
    size = model.img_size
    if args.img_size is not None and (args.img_size, args.img_size) != size:
        raise AnalyzeError(f"image size mismatch: the checkpoint takes {size[0]}x{size[1]} images, got --img-size "
                           f"{args.img_size} (a checkpoint's input size is fixed by its config)")
    return model


def _markdown(rows: list[dict], crows: list[dict], res: dict, command: str, desc: str, model: LoadedModel,
              eps: float, seconds: float) -> str:
    n = len(res["labels"])
    none = int((res["keypoints"] == 0).sum())
    betas = res["betas"]
    lines = [
        "# Inference prompting", "",
        f"Model: {model.name}. Images: the first {n} of {desc}. Biased blocks: {res['layers']} "
        f"(bias beta * log(P r + eps), eps {eps:g}); attention measured at block "
        f"{res['measured_layer']} (class token, head mean). {none} image(s) without SIFT keypoints get a uniform "
        f"relevance, hence no bias. {seconds:.1f} s.", "",
        md_table(["beta", "accuracy", "Δ vs β=0", "fixed", "broken", "attn on 0-kp patches", "KL(r‖attn)",
                  "Spearman"],
                 [[f"{r['beta']:g}", f"{r['accuracy']:.4f}", f"{r['delta']:+.4f}", r["fixed"], r["broken"],
                   f"{r['poor_share']:.3f}", f"{r['kl']:.3f}", f"{r['spearman']:.3f}"] for r in rows]), "",
        "Accuracy per class:", "",
        md_table(["class", "images"] + [f"β={b:g}" for b in betas],
                 [[r["name"], r["images"]] + [f"{r[f'acc_beta{b:g}']:.3f}" for b in betas] for r in crows]), "",
        f"Command: `{command}`", "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; user errors exit with status 2 and a one-line message."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "siftguide-prompt " + " ".join(shlex.quote(a) for a in argv_list)
    try:
        if args.num_images < 1 or args.batch_size < 1:
            raise AnalyzeError("--num-images and --batch-size must be >= 1")
        if any(not math.isfinite(b) or b < 0 for b in args.beta):
            raise AnalyzeError(f"--beta values must be finite and >= 0, got {args.beta}")
        if args.eps <= 0:
            raise AnalyzeError(f"--eps must be > 0, got {args.eps}")
        model = _load(args)
        layers = _layers(args.layers, model.net)
        source = dataset_source(model, args.overrides, args.split)
        if not source.has_labels:
            raise AnalyzeError(f"the {args.split} split has no labels: prompting accuracy needs them")
        betas = [0.0] + sorted({b for b in args.beta if b != 0})
        ids = list(range(min(args.num_images, len(source))))
        if not ids:
            raise AnalyzeError(f"the {args.split} split is empty")
        node = (model.config or {}).get("data") or {}
        desc = f"the {args.split} split of {node.get('_target_', '?')}" + (
            " with " + " ".join(args.overrides) if args.overrides else "")
        t0 = time.time()
        res = prompt_predictions(model.net, image_batches(source, ids, args.batch_size, model.in_chans, model.img_size),
                                 mean=model.mean, std=model.std, betas=betas, layers=layers, eps=args.eps,
                                 sift=model.sift, relevance=model.relevance, device=args.device)
        seconds = time.time() - t0
    except AnalyzeError as e:
        parser.error(str(e))
    rows = prompting_rows(res["preds"], res["labels"], betas, poor_share=res["poor_share"], kl=res["kl"],
                          spearman=res["spearman"])
    for r in rows:
        r["layers"], r["eps"] = " ".join(str(v) for v in res["layers"]), args.eps
    crows = class_rows(res["preds"], res["labels"], betas, source.class_names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "prompting.csv", rows)
    write_csv(out / "prompting_classes.csv", crows)
    (out / "prompting.md").write_text(_markdown(rows, crows, res, command, desc, model, args.eps, seconds))
    for r in rows:
        print(f"beta {r['beta']:g}: accuracy {r['accuracy']:.4f} ({r['delta']:+.4f}; fixed {r['fixed']}, broken "
              f"{r['broken']}), attention on keypoint-free patches {r['poor_share']:.3f}")
    print(f"prompted {len(ids)} images in {seconds:.1f} s; wrote {out}/prompting.csv, prompting_classes.csv, "
          "prompting.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
