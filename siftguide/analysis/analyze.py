"""SIFT-weighted patch interrelation analysis of a ViT's multi-head self-attention (Wu et al. 2022, arXiv 2211.08543).

Patches carry different *semantic concentration*: the number of SIFT keypoints that fall in them. For every layer
and head the analysis measures how attention flows between patches of high and low concentration, how well the
class token's attention agrees with the SIFT relevance map, and, at inference, which images and classes put their
attention (and their input gradients) on keypoint-poor patches: candidates for spurious correlations.

The measures and their formulas are in :mod:`siftguide.analysis.metrics`; their sums over the image set in
:mod:`siftguide.analysis.interrelation`. This module is the command: it loads the model and the images, runs the
analysis and writes the report (``report.md``, ``metrics.csv``, figures).

Command line (``python -m siftguide.analysis.analyze --help``)::

    python -m siftguide.analysis.analyze logs/train/runs/<date>/checkpoints/last.ckpt --out analysis/
    python -m siftguide.analysis.analyze vit_small_patch16_224 --out analysis/ --images photos/ --num-images 64
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..attention import AttentionCapture
from ..relevance import MODES as RELEVANCE_MODES
from ..relevance import detect_keypoints
from .images import DatasetImages, FolderImages, dataset_source, image_batches, prepare_images
from .interrelation import (MAX_LEVEL, RANK_BY, Collected, InterrelationStats, class_name, collect, imagenet_names,
                            metric_rows, spurious_tables)
from .loading import RANDOM_INIT, AnalyzeError, LoadedModel, load_checkpoint_model, load_timm_model, looks_like_path
from .metrics import (BIN_SCHEMES, attention_entropy, average_ranks, bin_flow, bin_key, bin_labels, bin_mass,
                      concentration_bins, concentration_thresholds, input_gradient_attribution, kl_divergence,
                      mean_attention_distance, patch_distances, poor_share, spearman, split_attention)
from .plots import plot_heatmaps, plot_interrelation, plot_overlays
from .tables import md_table, write_csv

# the public names of the analysis, importable from here as before they moved to their own files
__all__ = [
    "BIN_SCHEMES", "concentration_thresholds", "concentration_bins", "bin_labels", "split_attention", "bin_flow",
    "bin_mass", "kl_divergence", "average_ranks", "spearman", "patch_distances", "mean_attention_distance",
    "attention_entropy", "poor_share", "input_gradient_attribution", "prepare_images", "InterrelationStats",
    "collect", "analyze", "main", "RANDOM_INIT", "MAX_LEVEL", "RANK_BY", "Collected", "AnalyzeError", "LoadedModel",
    "load_checkpoint_model", "load_timm_model", "FolderImages", "DatasetImages", "dataset_source", "image_batches",
    "metric_rows", "spurious_tables", "plot_heatmaps", "plot_interrelation", "plot_overlays", "build_parser",
]


def analyze(model: LoadedModel, source: Any, out: Path, *, num_images: int = 512, batch_size: int = 64,
            bins: str = "fixed", layer: int = -1, head: int | None = None, spurious: bool | None = None,
            overlays: int = 6, top: int = 6, device: str = "cpu", command: str = "",
            relevance_mode: str | None = None, max_keypoints: int | None = None, source_desc: str = "",
            progress: bool = True, rank_by: str = "excess") -> dict[str, Any]:
    """Run the analysis of ``model`` on ``source`` and write every output into ``out``; returns a summary."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    net = model.net.eval().requires_grad_(False)
    size, patch = model.img_size, model.patch_size
    if size[0] % patch[0] or size[1] % patch[1]:
        raise AnalyzeError(f"patch size {patch[0]}x{patch[1]} does not divide the image size {size[0]}x{size[1]}")
    grid = (size[0] // patch[0], size[1] // patch[1])
    ids = list(range(min(num_images, len(source))))
    if not ids:
        raise AnalyzeError("no images to analyse (empty source or --num-images 0)")
    spurious = source.has_labels if spurious is None else spurious
    sift = dict(model.sift)
    if max_keypoints is not None:
        sift["max_keypoints"] = max_keypoints
    relevance = dict(model.relevance)
    if relevance_mode is not None:
        relevance["mode"] = relevance_mode
    has_head = getattr(net, "num_classes", 0) > 0
    t0 = time.time()
    nb = math.ceil(len(ids) / batch_size)
    with tqdm(total=nb, desc="analyse", unit="batch", disable=not progress) as bar:
        col = collect(net, image_batches(source, ids, batch_size, model.in_chans, size), mean=model.mean, std=model.std,
                      sift=sift, relevance=relevance, layer=layer, head=head, gradients=spurious and has_head,
                      device=device, progress=bar)
    elapsed = time.time() - t0
    stats = col.stats
    layers = stats.layers
    thresholds = concentration_thresholds(stats.histogram(), bins)
    res = stats.result(thresholds)
    rows = metric_rows(res, layers)
    layer_rows = metric_rows(res, layers, head_mean=True)
    write_csv(out / "metrics.csv", rows)
    write_csv(out / "metrics_layers.csv", layer_rows)
    keys = [bin_key(lb) for lb in res["labels"]]
    plot_heatmaps(rows, layers, stats.num_heads, keys, res["labels"], out / "heatmaps.png")
    plot_interrelation(res, layers, out / "interrelation.png")

    sel_layer = layers[layer]
    head_desc = "head mean" if head is None else f"head {head}"
    attn_title = ("CLS" if stats.cls_index >= 0 else "mean received") + f" attn, layer {sel_layer}, {head_desc}"
    attn_all, counts_all = col.cat("attn"), col.cat("counts")
    grad_all = col.cat("grad") if col.grad else None

    def overlay(sel: list[int], path: Path, titles: list[str]) -> None:
        x, _, _ = source.load([ids[i] for i in sel], model.in_chans, size)
        kp = detect_keypoints(x if x.shape[1] in (1, 3) else x.mean(1, keepdim=True), **sift)
        plot_overlays(x, kp, attn_all[sel], counts_all[sel], grid, titles, attn_title, path,
                      grad_all[sel] if grad_all is not None else None)

    names = source.class_names
    pred_names = names if model.source == "checkpoint" and not isinstance(source, FolderImages) else \
        imagenet_names(getattr(net, "num_classes", 0))
    n_ov = min(overlays, len(ids))
    if n_ov:
        sel = list(range(n_ov))
        titles = [(Path(col.index[i]).name if isinstance(col.index[i], str) else f"#{col.index[i]}")
                  + f" {class_name(col.labels[i], names)}" for i in sel]
        overlay(sel, out / "overlays.png", titles)
    summary: dict[str, Any] = dict(images=len(ids), grid=grid, bins=bins, thresholds=thresholds, labels=res["labels"],
                                   seconds=elapsed, random_init=model.random_init, out=str(out))
    spur_md = ""
    if spurious:
        by = "label" if source.has_labels and any(v >= 0 for v in col.labels) else "pred"
        # a timm name's classes (ImageNet) are not the data's: predictions are kept, accuracy is not computed
        labels_match = model.source == "checkpoint" and not isinstance(source, FolderImages)
        img_rows, cls_rows = spurious_tables(col, names, pred_names, by, labels_match, rank_by)
        write_csv(out / "spurious_images.csv", img_rows)
        write_csv(out / "spurious_classes.csv", cls_rows)
        pos = {ix: i for i, ix in enumerate(col.index)}
        k = min(top, len(img_rows))
        sel = [pos[r["index"]] for r in img_rows[:k]]
        titles = [f"#{r['rank']} {r['label_name'][:14]} → {r['pred_name'][:14]}\npoor-patch share "
                  f"{r['attn_poor_share']:.2f} ({r['attn_poor_excess']:+.2f})" for r in img_rows[:k]]
        if sel:
            overlay(sel, out / "spurious_overlays.png", titles)
        spur_md = _spurious_markdown(img_rows, cls_rows, by, grad_all is not None, has_head, sel_layer, head_desc,
                                     k, rank_by, stats.cls_index >= 0)
        summary["spurious_classes"] = cls_rows
    _write_report(out, model, res, layers, layer_rows, rows, summary, command, source_desc, attn_title,
                  stats.cls_index >= 0, spur_md, relevance, sift, grad_all is not None)
    return summary


def _spurious_markdown(img_rows, cls_rows, by, has_grad, has_head, layer, head_desc, k, rank_by, has_cls) -> str:
    g = has_grad
    lines = ["## Spurious-correlation candidates", "",
             f"Share of the {'class token' if has_cls else 'mean received'} attention (layer {layer}, {head_desc}) "
             "on keypoint-poor (0-keypoint) "
             "patches, per image; `excess` = share minus the fraction of poor patches (what uniform attention "
             "would give them). "
             + ("Second signal: the share of the input-gradient attribution |∂ logit_pred / ∂ x| on those patches."
                if g else ("No input-gradient signal: the model has no classifier head." if not has_head else "")),
             f"Classes are grouped by {'true label' if by == 'label' else 'predicted class (no labels)'} and "
             f"ranked by the attention {rank_by}"
             + (" (the raw share ranks images with few keypoints first: an image without keypoints has share 1)"
                if rank_by == "excess" else "")
             + "; full tables in `spurious_classes.csv` and `spurious_images.csv`.", ""]
    head = ["class", "images", "accuracy", "poor patch frac", "attn poor share", "attn excess"]
    if g:
        head += ["grad poor share", "grad excess"]
    rows = []
    for r in cls_rows[:10]:
        row = [r["name"], r["images"], r["accuracy"], r["poor_patch_frac"], r["attn_poor_share"],
               r["attn_poor_excess"]]
        if g:
            row += [r["grad_poor_share"], r["grad_poor_excess"]]
        rows.append(row)
    lines += [f"Most affected classes (highest attention {rank_by} on keypoint-poor patches):", "",
              md_table(head, rows), ""]
    other = "share" if rank_by == "excess" else "excess"
    top_other = sorted(cls_rows, key=lambda r: -r[f"attn_poor_{other}"])[:5]
    lines += [f"By attention {other} instead: "
              + ", ".join(f"{r['name']} ({r[f'attn_poor_{other}']:.3f})" for r in top_other) + ".", ""]
    head = ["rank", "image", "label", "prediction", "keypoints", "poor patch frac", "attn poor share", "attn excess"]
    if g:
        head += ["grad poor share"]
    rows = []
    for r in img_rows[:max(k, 10)]:
        row = [r["rank"], r["index"] if not isinstance(r["index"], str) else Path(r["index"]).name, r["label_name"],
               r["pred_name"], r["keypoints"], r["poor_patch_frac"], r["attn_poor_share"], r["attn_poor_excess"]]
        if g:
            row += [r["grad_poor_share"]]
        rows.append(row)
    lines += ["Top images:", "", md_table(head, rows), "", "![top images](spurious_overlays.png)", ""]
    return "\n".join(lines)


def _write_report(out: Path, model: LoadedModel, res: dict, layers, layer_rows, rows, summary, command: str,
                  source_desc: str, attn_title: str, has_cls: bool, spur_md: str, relevance: dict, sift: dict,
                  has_grad: bool) -> None:
    labels, keys = res["labels"], [bin_key(lb) for lb in res["labels"]]
    lines = ["# SIFT-weighted patch interrelation analysis", ""]
    if model.random_init:
        lines += [f"> **{model.pretrained}**", "> The numbers below describe a randomly initialised network.", ""]
    ppi = ", ".join(f"{lb}: {float(v):.1f}" for lb, v in zip(labels, res["patches_per_image"]))
    lines += [
        f"- command: `{command}`" if command else "- command: (Python API)",
        f"- model: `{model.name}` ({model.source}); weights: {model.pretrained}",
        f"- images: {summary['images']} from {source_desc}; model input {model.img_size[0]}x{model.img_size[1]}, "
        f"{model.in_chans} channel(s), patches {model.patch_size[0]}x{model.patch_size[1]} "
        f"(grid {summary['grid'][0]}x{summary['grid'][1]}); normalisation mean {model.mean} std {model.std}",
        f"- concentration bins (keypoints per patch, {summary['bins']}): {', '.join(labels)}; mean patches per "
        f"image: {ppi}",
        f"- SIFT: {sift or 'defaults'}; relevance: {relevance or 'count (default)'}",
        f"- class token: {'yes' if has_cls else 'no (CLS columns use the mean attention each patch receives)'}",
        f"- time: {summary['seconds']:.1f} s",
        "",
        "Ratios compare with uniform attention (1 = uniform, > 1 = more than uniform). `recv`: mean attention a "
        "patch of the bin receives from the patch queries; `send`: share of a patch's attention that goes to patch "
        "tokens rather than prefix tokens; `CLS`: class token's attention per patch of the bin; `rich→poor`: flow "
        f"from {labels[-1]}-keypoint patches to {labels[0]}-keypoint patches; KL(relevance ‖ CLS) in nats; "
        "Spearman between SIFT relevance and CLS attention per image; distance in patches. Definitions in "
        "`siftguide/analysis/metrics.py`.",
        "",
        "## Per-layer summary (heads averaged)",
        "",
    ]
    head = (["layer"] + [f"recv {lb}" for lb in labels] + [f"CLS {lb}" for lb in labels]
            + ["rich→poor", "poor→rich", "KL", "Spearman", "distance", "entropy", "prefix share"])
    body = [[r["layer"]] + [r[f"recv_{k}"] for k in keys] + [r[f"cls_ratio_{k}"] for k in keys]
            + [r["rich_to_poor"], r["poor_to_rich"], r["kl"], r["spearman"], r["distance"], r["entropy"],
               r["prefix_share"]] for r in layer_rows]
    lines += [md_table(head, body), "", "![layer x head heat maps](heatmaps.png)", "",
              "![bin interrelation per layer](interrelation.png)", "", "## Per layer and head", ""]
    head = (["layer", "head"] + [f"recv {lb}" for lb in labels] + [f"CLS share {lb}" for lb in labels]
            + ["rich→poor", "poor→rich", "KL", "Spearman", "distance", "entropy"])
    body = [[r["layer"], r["head"]] + [r[f"recv_{k}"] for k in keys] + [r[f"cls_share_{k}"] for k in keys]
            + [r["rich_to_poor"], r["poor_to_rich"], r["kl"], r["spearman"], r["distance"], r["entropy"]]
            for r in rows]
    lines += [md_table(head, body), "", "All numbers per layer/head: `metrics.csv` (heads averaged: "
              "`metrics_layers.csv`).", "", "## Overlays", "",
              f"Columns: the image with its SIFT keypoints (red); {attn_title} (colour scale 0 to its maximum); "
              "keypoints per patch" + ("; |input gradient| of the predicted logit per patch." if has_grad else "."),
              "",
              "![overlays](overlays.png)", ""]
    if spur_md:
        lines += [spur_md]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _parse_head(v: str) -> int | None:
    if v.lower() in ("mean", "all", "none"):
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--head must be an integer or 'mean', got {v!r}") from None


def _parse_model_arg(v: str) -> tuple[str, Any]:
    import yaml

    if "=" not in v:
        raise argparse.ArgumentTypeError(f"--model-arg must look like KEY=VALUE, got {v!r}")
    k, val = v.split("=", 1)
    return k, yaml.safe_load(val)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m siftguide.analysis.analyze",
        description="SIFT-weighted patch interrelation analysis of a ViT's self-attention: how each layer and head "
                    "distributes attention across patches of high and low SIFT keypoint concentration, agreement "
                    "with SIFT relevance, and spurious-correlation candidates. Writes metrics.csv, report.md and "
                    "PNGs into --out.")
    p.add_argument("model", metavar="MODEL",
                   help="a siftguide checkpoint (.ckpt file or run directory) or a timm model name")
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE",
                   help="overrides of the data config (checkpoint's, else Fashion-MNIST), e.g. data.val_size=1000")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", help="a folder of image files (resized to the model's input size) instead of the "
                                    "data config's validation split")
    p.add_argument("--split", default="val", choices=("val", "test", "train"), help="data split (default val)")
    p.add_argument("--num-images", type=int, default=512, help="images analysed (default 512)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bins", default="fixed", choices=BIN_SCHEMES,
                   help="concentration bins: fixed = 0 / 1 / 2+ keypoints per patch; tercile = terciles of the "
                        "pooled counts")
    p.add_argument("--layer", type=int, default=-1, help="block of the overlays and spurious signal (default -1)")
    p.add_argument("--head", type=_parse_head, default=None, help="head of the overlays and spurious signal "
                                                                  "(default: mean over heads)")
    sp = p.add_mutually_exclusive_group()
    sp.add_argument("--spurious", dest="spurious", action="store_true", default=None,
                    help="spurious-correlation ranking (default: on when the images have labels)")
    sp.add_argument("--no-spurious", dest="spurious", action="store_false")
    p.add_argument("--rank-by", choices=RANK_BY, default="excess",
                   help="spurious ranking: excess = attention share on 0-keypoint patches minus their fraction "
                        "(default), share = the raw share")
    p.add_argument("--overlays", type=int, default=6, help="images in overlays.png (default 6)")
    p.add_argument("--top", type=int, default=6, help="images in spurious_overlays.png (default 6)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size: timm names are created at this size; checkpoints must match their own")
    p.add_argument("--model-arg", type=_parse_model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model kwargs for a timm name (e.g. depth=6), repeatable")
    p.add_argument("--random-init", action="store_true", help="timm names: do not try pretrained weights")
    p.add_argument("--relevance-mode", choices=RELEVANCE_MODES, default=None,
                   help="SIFT relevance for KL/Spearman (default: the checkpoint's, else count)")
    p.add_argument("--max-keypoints", type=int, default=None, help="SIFT keypoints kept per image")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def _load_model(args, parser) -> LoadedModel:
    import timm

    spec = args.model
    if os.path.exists(spec):
        if args.model_arg:
            parser.error("--model-arg only applies to timm model names, not to checkpoints")
        model = load_checkpoint_model(spec)
    elif looks_like_path(spec) or not timm.is_model(spec):
        hint = ("checkpoint not found: " + spec) if looks_like_path(spec) else (
            f"MODEL {spec!r} is neither an existing checkpoint nor a timm model name (see timm.list_models())")
        raise AnalyzeError(hint)
    else:
        kwargs = dict(args.model_arg)
        if args.img_size is not None:
            kwargs.setdefault("img_size", args.img_size)
        patch = kwargs.get("patch_size")
        if args.img_size is not None and patch is not None and args.img_size % int(patch):
            raise AnalyzeError(f"patch size {patch} does not divide the image size {args.img_size}")
        try:
            model = load_timm_model(spec, kwargs, pretrained=not args.random_init)
        except AnalyzeError:
            raise
        except Exception as e:  # noqa: BLE001 - bad kwargs for this architecture
            raise AnalyzeError(f"could not create timm model {spec!r} with {kwargs}: {type(e).__name__}: {e}") from e
    if not hasattr(model.net, "blocks") or not hasattr(model.net, "patch_embed"):
        raise AnalyzeError(f"{spec}: not a timm VisionTransformer-style model (needs .blocks and .patch_embed)")
    try:
        AttentionCapture(model.net, layers=list(range(len(model.net.blocks))))
    except TypeError as e:  # an attention module whose probabilities cannot be captured exactly
        raise AnalyzeError(f"{spec}: {e}") from e
    size, patch = model.img_size, model.patch_size
    if args.img_size is not None and tuple([args.img_size] * 2) != size:
        raise AnalyzeError(f"image size mismatch: the model takes {size[0]}x{size[1]} images, got --img-size "
                           f"{args.img_size}" + (" (a checkpoint's input size is fixed by its config)"
                                                 if model.source == "checkpoint" else ""))
    if size[0] % patch[0] or size[1] % patch[1]:
        raise AnalyzeError(f"patch size {patch[0]}x{patch[1]} does not divide the image size {size[0]}x{size[1]}")
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; user errors exit with status 2 and a one-line message."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # data.KEY=VALUE overrides may follow the options
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m siftguide.analysis.analyze " + " ".join(shlex.quote(a) for a in argv_list)
    try:
        if args.num_images < 1 or args.batch_size < 1:
            raise AnalyzeError("--num-images and --batch-size must be >= 1")
        model = _load_model(args, parser)
        depth = len(model.net.blocks)
        if not -depth <= args.layer < depth:
            raise AnalyzeError(f"--layer {args.layer} out of range for a model with {depth} blocks")
        heads = model.net.blocks[0].attn.num_heads
        if args.head is not None and not 0 <= args.head < heads:
            raise AnalyzeError(f"--head {args.head} out of range for a model with {heads} heads")
        if args.images:
            if args.overrides:
                raise AnalyzeError("data overrides do not apply with --images")
            source: Any = FolderImages(args.images)
            desc = f"folder `{args.images}` ({len(source)} files)"
        else:
            source = dataset_source(model, args.overrides, args.split)
            node = (model.config or {}).get("data") or {}
            desc = (f"the {args.split} split of {node.get('_target_', 'siftguide.data.FashionMNISTDataModule')}"
                    + (" (the checkpoint's data config)" if model.config else " (default data)"))
            if args.overrides:
                desc += " with " + " ".join(args.overrides)
        summary = analyze(model, source, Path(args.out), num_images=args.num_images, batch_size=args.batch_size,
                          bins=args.bins, layer=args.layer, head=args.head, spurious=args.spurious,
                          overlays=args.overlays, top=args.top, device=args.device, command=command,
                          relevance_mode=args.relevance_mode, max_keypoints=args.max_keypoints, source_desc=desc,
                          progress=not args.no_progress, rank_by=args.rank_by)
    except AnalyzeError as e:
        parser.error(str(e))
    if model.random_init:
        print(model.pretrained)
    print(f"analysed {summary['images']} images in {summary['seconds']:.1f} s; wrote {summary['out']}/report.md, "
          "metrics.csv, heatmaps.png, interrelation.png, overlays.png"
          + (", spurious_images.csv, spurious_classes.csv, spurious_overlays.png" if "spurious_classes" in summary
             else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
