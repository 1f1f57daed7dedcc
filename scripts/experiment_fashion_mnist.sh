#!/usr/bin/env bash
# The convergence experiments published in README and docs/results/: default config (Fashion-MNIST, 64 px ViT,
# 500 steps), 3 seeds per group, guided runs with the keypoint cache (built once, shared through
# data/keypoint_cache). Parts (default: all, in this order; 3-6 min per run on 2 CPU cores):
#   main      guidance weight 0 (baseline), 0.3, 1; control: SIFT maps shuffled across the batch, weight 1;
#             MAE with guidance weight 0 and 1 (kNN accuracy)                                       ~90 min
#   strength  weight 3 constant, its shuffled control, weight 3 with cosine decay to 0             ~50 min
#   budget    a 0.7x training budget (trainer.max_steps=350, LR schedule included): baseline, weight 1,
#             shuffled control weight 1                                                              ~35 min
#   mae_decay MAE with guidance weight 1 decayed linearly to 0 over the first 200 steps                ~17 min
#   compare   the tables and curves in docs/results/ from all runs present
#     bash scripts/experiment_fashion_mnist.sh [PART ...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-logs/experiments/fashion_mnist}
PY=.venv/bin/python
export WANDB_MODE=offline WANDB_SILENT=true
common="trainer.enable_progress_bar=false relevance.cache=true"
sweep() { local dir=$1; shift; $PY train.py -m "$@" $common hydra.sweep.dir=$OUT/$dir; }
present() { local d; for d in "$@"; do if [ -d $OUT/$d ]; then echo $OUT/$d; fi; done; }  # sweeps that exist

for part in "${@:-main strength budget mae_decay compare}"; do for p in $part; do case $p in
  main)
    sweep supervised guidance.weight=0,0.3,1 seed=0,1,2
    sweep control relevance.kind=shuffled guidance.weight=1 seed=0,1,2
    sweep mae objective=mae guidance.weight=0,1 seed=0,1,2 ;;
  strength)
    sweep strong guidance.weight=3 seed=0,1,2
    sweep strong_control relevance.kind=shuffled guidance.weight=3 seed=0,1,2
    sweep strong_cosine guidance.weight=3 guidance.attention.schedule.kind=cosine seed=0,1,2 ;;
  budget)
    sweep budget trainer.max_steps=350 guidance.weight=0,1 seed=0,1,2
    sweep budget_control trainer.max_steps=350 relevance.kind=shuffled guidance.weight=1 seed=0,1,2 ;;
  mae_decay)
    sweep mae_decay objective=mae guidance.weight=1 guidance.attention.schedule.kind=linear guidance.attention.schedule.total_steps=200 \
      seed=0,1,2 ;;
  compare)
    $PY -m siftguide.analysis.compare $(present supervised control strong strong_control strong_cosine) --metric val/acc \
      --out docs/results/supervised
    if [ -d $OUT/budget ]; then
      $PY -m siftguide.analysis.compare $(present supervised control budget budget_control) --baseline max_steps=500 \
        --metric val/acc --out docs/results/budget
    fi
    $PY -m siftguide.analysis.compare $(present mae mae_decay) --metric val/knn_acc --out docs/results/mae ;;
  *) echo "unknown part '$p' (main, strength, budget, mae_decay, compare)" >&2; exit 2 ;;
esac; done; done
