#!/usr/bin/env bash
# Issue 13's experiment: where object position varies, does guidance converge faster, and is it SIFT?
# Each part is one `python -m siftguide.study` (finished runs are skipped: rerun a part to resume it) and ends
# with its compare report in $OUT/<part>/report/ (table.md, curves.png, verdict.md).
#   bash scripts/location_study.sh screen_sup     supervised, translated: 4 modes + main wrong-map control, 2 seeds
#   bash scripts/location_study.sh confirm_sup    supervised, translated: $BEST, its controls ($CONTROLS) and the
#                                                 baseline over $SEEDS seeds, in the screen's directory (its runs reused)
#   bash scripts/location_study.sh screen_mae     MAE (kNN), translated: masking, recon_weight, attention, 2 seeds
#   bash scripts/location_study.sh screen_clut    supervised, cluttered: 4 modes + main control, 2 seeds
#   bash scripts/location_study.sh centred        supervised, the centred default: $BEST + controls, 3 seeds
# Env: OUT (logs/location_study), JOBS (2: two 1-thread runs on 2 cores), STEPS (300), BEST (interrelation: the
# screen's best SIFT setting), CONTROLS (main: its main wrong-map control; auto: shuffled, rolled, mean), SEEDS (5).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-logs/location_study}
JOBS=${JOBS:-2}
STEPS=${STEPS:-300}
BEST=${BEST:-interrelation}
CONTROLS=${CONTROLS:-main}
SEEDS=${SEEDS:-5}
export WANDB_MODE=offline WANDB_SILENT=true
# dense validation on a fixed 2,000-image subset every 25 steps; short warm-up for the short schedule
COMMON=(logger=csv trainer.enable_progress_bar=false trainer.max_steps=$STEPS trainer.val_check_interval=25
        data.val_subset=2000 scheduler.warmup_steps=30)
SUP=("${COMMON[@]}" knn.enabled=false)
MAE=("${COMMON[@]}" objective=mae knn.query_size=2000)
part=${1:?part: screen_sup | confirm_sup | screen_mae | screen_clut | centred}; shift  # the rest goes to the study
study() { $PY -m siftguide.study --jobs "$JOBS" "$@" "${EXTRA[@]}"; }
EXTRA=("$@")
case "$part" in
  screen_sup)  study data=fashion_mnist_translated "${SUP[@]}" --modes attention interrelation prior token_drop \
                 --controls main --seeds 2 --out "$OUT/screen_sup" ;;
  confirm_sup) study data=fashion_mnist_translated "${SUP[@]}" --modes "$BEST" --controls "$CONTROLS" \
                 --seeds "$SEEDS" --out "$OUT/screen_sup" ;;
  screen_mae)  study data=fashion_mnist_translated "${MAE[@]}" --modes masking recon_weight attention \
                 --controls main --seeds 2 --out "$OUT/screen_mae" ;;
  screen_clut) study data=fashion_mnist_cluttered "${SUP[@]}" --modes attention interrelation prior token_drop \
                 --controls main --seeds 2 --out "$OUT/screen_clut" ;;
  centred)     study "${SUP[@]}" --modes "$BEST" --controls auto --seeds 3 --out "$OUT/centred" ;;
  *) echo "unknown part $1" >&2; exit 2 ;;
esac
