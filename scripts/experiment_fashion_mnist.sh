#!/usr/bin/env bash
# The convergence experiment published in docs/results/: default config (Fashion-MNIST, 64 px ViT, 500 steps),
# 3 seeds per group, guided runs with the keypoint cache (built once, shared through data/keypoint_cache).
#   supervised: guidance weight 0 (baseline), 0.3, 1; control: SIFT maps shuffled across the batch, weight 1
#   MAE:        guidance weight 0 (baseline) and 1, compared on kNN accuracy
# ~90 minutes on 2 CPU cores. Then: python -m siftguide.compare (commands at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-logs/experiments/fashion_mnist}
PY=.venv/bin/python
export WANDB_MODE=offline WANDB_SILENT=true
common="trainer.enable_progress_bar=false guidance.cache=true"
$PY train.py -m guidance.weight=0,0.3,1 seed=0,1,2 $common hydra.sweep.dir=$OUT/supervised
$PY train.py -m guidance.target.kind=shuffled guidance.weight=1 seed=0,1,2 $common hydra.sweep.dir=$OUT/control
$PY train.py -m objective=mae guidance.weight=0,1 seed=0,1,2 $common hydra.sweep.dir=$OUT/mae
$PY -m siftguide.compare $OUT/supervised $OUT/control --metric val/acc --out docs/results/supervised
$PY -m siftguide.compare $OUT/mae --metric val/knn_acc --out docs/results/mae
