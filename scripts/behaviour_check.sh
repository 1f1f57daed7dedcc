#!/usr/bin/env bash
# Behaviour unchanged by a refactor: the same fixed-seed runs from two revisions, their metrics.csv compared column by
# column (wall-clock and cost columns left out: they measure the machine).
#   bash scripts/behaviour_check.sh OLD_REV [NEW_REV=HEAD]     (worktrees and runs under $OUT, default /tmp/behaviour)
# Runs: the default job (60 steps), MAE with keypoint masking and KAMIM weights, [prior,token_drop], attention +
# token_drop with the shuffled map, the prior with the dataset-mean map on translated data (4,096 training images).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?old revision}; NEW=${2:-HEAD}; OUT=${OUT:-/tmp/behaviour}
export WANDB_MODE=offline WANDB_SILENT=true
mkdir -p "$OUT"
RUNS=(
  "default|trainer.max_steps=60"
  "mae|objective=mae guidance=[masking,recon_weight] trainer.max_steps=60 data.train_subset=4096"
  "prior_drop|guidance=[prior,token_drop] trainer.max_steps=60 data.train_subset=4096"
  "attn_drop_shuffled|guidance=[attention,token_drop] relevance.kind=shuffled trainer.max_steps=40 data.train_subset=4096"
  "mean_prior|data=fashion_mnist_translated guidance=prior relevance.kind=mean trainer.max_steps=40 data.train_subset=4096"
)
for rev in "$OLD" "$NEW"; do
  wt="$OUT/src-$rev"
  [ -d "$wt" ] || git worktree add -q --detach "$wt" "$rev"
  ln -sfn "$PWD/.venv" "$wt/.venv"; mkdir -p data; ln -sfn "$PWD/data" "$wt/data"  # one keypoint cache for both
  for r in "${RUNS[@]}"; do
    name=${r%%|*}; ovr=${r#*|}
    [ -f "$OUT/$rev/$name/results.json" ] && continue
    # shellcheck disable=SC2086
    (cd "$wt" && .venv/bin/python train.py hydra.run.dir="$OUT/$rev/$name" trainer.enable_progress_bar=false $ovr \
      > "$OUT/$rev-$name.log" 2>&1) || { echo "$rev $name failed: $OUT/$rev-$name.log"; exit 1; }
  done
done
.venv/bin/python scripts/compare_metrics.py "$OUT/$OLD" "$OUT/$NEW"
