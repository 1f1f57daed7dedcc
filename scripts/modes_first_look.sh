#!/usr/bin/env bash
# A first 500-step, one-seed reading of every guidance mode against its baseline, at the default config
# (supervised: attention, interrelation, background, prior, token_drop; MAE: attention, masking, recon_weight).
# Resumable: a run whose metrics.csv already holds the final validation is skipped. Then compare per objective.
#   bash scripts/modes_first_look.sh [run|sup|mae|compare]     (run = sup + mae + compare)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-logs/modes_first_look}
export WANDB_MODE=offline WANDB_SILENT=true
SEED=${SEED:-0}
EXTRA=${EXTRA:-}   # overrides added to every run (e.g. data.root=...)

run() {  # run NAME OVERRIDES...
  local name=$1; shift
  local dir="$OUT/$name"
  if [ -f "$dir/metrics.csv" ] && grep -q "^" "$dir/metrics.csv" && \
     $PY -c "import pandas as pd,sys; m=pd.read_csv('$dir/metrics.csv'); sys.exit(0 if (m['val/step']==500).any() else 1)" 2>/dev/null; then
    echo "[skip] $name"; return
  fi
  echo "[run] $name: $*"
  # shellcheck disable=SC2086
  $PY train.py seed=$SEED logger=csv trainer.enable_progress_bar=false "hydra.run.dir=$dir" "$@" ${EXTRA:-} > "$OUT/$name.log" 2>&1
}

part=${1:-run}
mkdir -p "$OUT"
C="relevance.cache=true"
if [ "$part" = run ] || [ "$part" = sup ]; then
  run sup_baseline guidance=none
  run sup_attention guidance=attention $C
  run sup_interrelation guidance=interrelation $C
  run sup_background guidance=background $C
  run sup_prior guidance=prior $C
  run sup_token_drop guidance=token_drop $C
  run sup_token_drop_random guidance=token_drop relevance.kind=random
fi
if [ "$part" = run ] || [ "$part" = mae ]; then
  M="objective=mae"
  run mae_baseline $M guidance=none
  run mae_attention $M guidance=attention $C
  run mae_masking $M guidance=masking $C
  run mae_recon_weight $M guidance=recon_weight $C
fi
if [ "$part" = run ] || [ "$part" = compare ]; then
  CMP=${CMP:-docs/results/modes_first_look}
  $PY -m siftguide.analysis.compare "$OUT"/sup_*/ --out "$CMP/supervised" --metric val/acc --verdict || true
  $PY -m siftguide.analysis.compare "$OUT"/mae_*/ --out "$CMP/mae" --metric val/knn_acc --verdict || true
fi
