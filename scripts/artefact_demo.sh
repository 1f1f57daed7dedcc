#!/usr/bin/env bash
# Issue 14's demonstration: does the SIFT-weighted attention analysis find a planted spurious feature, and how much
# test accuracy do inference prompting and SIFT-guided training recover once the artefact is decorrelated?
# Two artefacts (siftguide/synthetic.py), class-coded in train/val and random in the test split:
#   tint  = a uniform background grey (no SIFT keypoints: invisible to SIFT)
#   decoy = a small grey square in a corner (a blob: SIFT finds keypoints on it)
# Runs: baseline (guidance=none) and SIFT-guided (guidance=attention) per artefact, plus the same baseline on clean
# Fashion-MNIST as the reference of "normal" attention. Each run is resumable (skipped when its results.json says
# "finished"); `test=true` evaluates the final weights on the held-out test split (artefact decorrelated).
#   bash scripts/artefact_demo.sh [all|train|analyze|prompt|report]      (all = train + analyze + prompt + report)
# Env: OUT (logs/artefact_demo), SEEDS ("0"), STEPS (300), JOBS (2 parallel 1-thread runs), DOCS
# (docs/results/artefact), NUM_IMAGES (500 analysed), NUM_PROMPT (1000 prompted), PARTIAL (1: analyse
# unfinished runs' last checkpoints). Finished: tables + summary.png in DOCS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-logs/artefact_demo}
SEEDS=${SEEDS:-0}
STEPS=${STEPS:-300}
JOBS=${JOBS:-2}
DOCS=${DOCS:-docs/results/artefact}
NUM_IMAGES=${NUM_IMAGES:-500}      # test images analysed (attention + input gradients)
NUM_PROMPT=${NUM_PROMPT:-1000}      # test images prompted (forwards only)
export WANDB_MODE=offline WANDB_SILENT=true OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
COMMON=(logger=csv trainer.enable_progress_bar=false trainer.max_steps=$STEPS trainer.val_check_interval=100
        data.val_subset=2000 callbacks.knn=null test=true)
# name -> overrides
declare -A RUNS=(
  [clean_baseline]="data=fashion_mnist guidance=none"
  [tint_baseline]="data=fashion_mnist_tint guidance=none"
  [tint_guided]="data=fashion_mnist_tint guidance=attention relevance.cache=true"
  [decoy_baseline]="data=fashion_mnist_decoy guidance=none"
  [decoy_guided]="data=fashion_mnist_decoy guidance=attention relevance.cache=true"
)
ORDER=(tint_baseline decoy_baseline clean_baseline tint_guided decoy_guided)

finished() { [ -f "$1/results.json" ] && grep -q '"status": "finished"' "$1/results.json"; }
# analyze/prompt: finished runs only, or with PARTIAL=1 any run with a checkpoint (a run stopped early; the report
# gives its step)
usable() { finished "$1" || { [ "${PARTIAL:-0}" = 1 ] && [ -f "$1/checkpoints/last.ckpt" ]; }; }

train_one() {  # train_one NAME SEED
  local name=$1 seed=$2 dir="$OUT/$1/s$2"
  if finished "$dir"; then echo "[skip] $name s$seed"; return; fi
  # another instance of this script is training it (pid file of a live process): leave it alone
  if [ -f "$dir.pid" ] && kill -0 "$(cat "$dir.pid")" 2>/dev/null; then echo "[busy] $name s$seed"; return; fi
  echo "[run] $name s$seed: ${RUNS[$name]}"
  mkdir -p "$dir"
  # shellcheck disable=SC2086
  $PY train.py seed="$seed" "${COMMON[@]}" ${RUNS[$name]} "hydra.run.dir=$dir" > "$dir.log" 2>&1 &
  echo $! > "$dir.pid"
  wait $! || echo "[fail] $name s$seed (see $dir.log)"
  rm -f "$dir.pid"
}

part=${1:-all}
mkdir -p "$OUT"
if [ "$part" = all ] || [ "$part" = train ]; then
  for seed in $SEEDS; do
    for name in "${ORDER[@]}"; do
      while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
      train_one "$name" "$seed" &
    done
  done
  wait
fi
ckpt() { echo "$OUT/$1/s$2/checkpoints/last.ckpt"; }
if [ "$part" = all ] || [ "$part" = analyze ]; then
  for seed in $SEEDS; do
    for name in "${ORDER[@]}"; do
      a="$OUT/$name/s$seed/analysis"
      if [ -f "$a/spurious_images.csv" ]; then echo "[skip] analyze $name s$seed"; continue; fi
      usable "$OUT/$name/s$seed" || { echo "[missing] $name s$seed: train first"; continue; }
      echo "[analyze] $name s$seed"
      $PY -m siftguide.analysis.analyze "$(ckpt "$name" "$seed")" --out "$a" --split test --num-images "$NUM_IMAGES" \
        --no-progress > "$a.log" 2>&1 || echo "[fail] analyze $name s$seed (see $a.log)"
    done
  done
fi
if [ "$part" = all ] || [ "$part" = prompt ]; then
  for seed in $SEEDS; do
    for name in "${ORDER[@]}"; do
      usable "$OUT/$name/s$seed" || { echo "[missing] $name s$seed: train first"; continue; }
      for layers in -1 all; do  # bias the last block only (the prior mode's default) or every block
        case $layers in all) p="$OUT/$name/s$seed/prompting_all" ;; *) p="$OUT/$name/s$seed/prompting" ;; esac
        if [ -f "$p/prompting.csv" ]; then echo "[skip] prompt $name s$seed $layers"; continue; fi
        echo "[prompt] $name s$seed $layers"
        $PY -m siftguide.analysis.prompt "$(ckpt "$name" "$seed")" --out "$p" --split test \
          --num-images "$NUM_PROMPT" --beta 0.5 1 2 4 --layers "$layers" \
          > "$p.log" 2>&1 || echo "[fail] prompt $name s$seed (see $p.log)"
      done
    done
  done
fi
if [ "$part" = all ] || [ "$part" = report ]; then
  $PY scripts/artefact_report.py "$OUT" --out "$DOCS" --seeds $SEEDS
fi
