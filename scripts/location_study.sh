#!/usr/bin/env bash
# Issue 13's experiment: where object position varies, does guidance converge faster, and is it SIFT?
# Each part is one `python -m siftguide.study` (finished runs are skipped: rerun a part to resume it) and ends
# with its compare report in $OUT/<part>/report/ (table.md, curves.png, verdict.md).
#   bash scripts/location_study.sh screen_sup     supervised, translated: 4 modes + main wrong-map control, 2 seeds
#   bash scripts/location_study.sh confirm_sup    supervised, translated: $BEST, its controls ($CONTROLS) and the
#                                                 baseline over $SEEDS seeds, in the screen's directory (reused)
#   bash scripts/location_study.sh screen_mae     MAE (kNN), translated: masking, recon_weight, attention, 2 seeds
#   bash scripts/location_study.sh mae_long       MAE (kNN), translated, a long schedule ($MAE_STEPS, validation every
#                                                 100 steps): baseline and SIFT masking, $MAE_SEEDS seeds (1)
#   bash scripts/location_study.sh mae_long_ctrl  the same long schedule with each mode's main control: masking
#                                                 (random masking) and recon_weight (shuffled), $MAE_SEEDS seeds; sized
#                                                 for a GPU: PY=python3 JOBS=8 MAE_SEEDS=5 ... data.root=<.gz folder>
#   bash scripts/location_study.sh knobs_sup      supervised, translated, 2 seeds with the main control: prior on
#                                                 every block, prior's beta decayed over the first half or third,
#                                                 prior also at evaluation; both decays at 5 seeds (+ mean map,
#                                                 3); token_drop for 540 steps (the baseline's compute), 5 seeds
#   bash scripts/location_study.sh screen_clut    supervised, cluttered: 4 modes + main control, 2 seeds
#   bash scripts/location_study.sh confirm_clut   supervised, cluttered: as confirm_sup, in the cluttered screen's
#                                                 directory
#   bash scripts/location_study.sh centred        supervised, the centred default: $BEST + controls, 3 seeds
#   bash scripts/location_study.sh report         the published tables: compare over the finished runs of each
#                                                 part into docs/results/location/<table>/ (table.md, curves.png,
#                                                 verdict.md); a run still training is left out
# Env: OUT (logs/location_study), JOBS (2: two 1-thread runs on 2 cores), STEPS (300), BEST (interrelation: the
# screen's best SIFT setting), CONTROLS (main: its main wrong-map control; auto: shuffled, rolled, mean), SEEDS (5),
# MAE_STEPS (2000), MAE_SEEDS (1), GPU_OUT (logs/location_study_gpu: the $OUT of the parts run on a GPU
# machine, copied back).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-logs/location_study}
JOBS=${JOBS:-2}
STEPS=${STEPS:-300}
BEST=${BEST:-interrelation}
CONTROLS=${CONTROLS:-main}
SEEDS=${SEEDS:-5}
MAE_STEPS=${MAE_STEPS:-2000}
MAE_SEEDS=${MAE_SEEDS:-1}
GPU_OUT=${GPU_OUT:-logs/location_study_gpu}
export WANDB_MODE=offline WANDB_SILENT=true
# dense validation on a fixed 2,000-image subset every 25 steps; short warm-up for the short schedule
COMMON=(logger=csv trainer.enable_progress_bar=false trainer.max_steps=$STEPS trainer.val_check_interval=25
        data.val_subset=2000 module.warmup_steps=30)
SUP=("${COMMON[@]}" callbacks.knn=null)
MAE=("${COMMON[@]}" objective=mae callbacks.knn.query_size=2000)
# the part, then arguments for the study
part=${1:?part: screen_sup | confirm_sup | confirm_clut | knobs_sup | screen_mae | mae_long | mae_long_ctrl | screen_clut | centred | report}; shift
study() { $PY -m siftguide.study --jobs "$JOBS" "$@" "${EXTRA[@]}"; }
sup_translated() { study data=fashion_mnist_translated "${SUP[@]}" "$@"; }
mae_long_translated() { study data=fashion_mnist_translated "${MAE[@]}" trainer.max_steps="$MAE_STEPS" \
                          trainer.val_check_interval=100 "$@"; }
EXTRA=("$@")
case "$part" in
  screen_sup)  sup_translated --modes attention interrelation prior token_drop --controls main --seeds 2 \
                 --out "$OUT/screen_sup" ;;
  confirm_sup) sup_translated --modes "$BEST" --controls "$CONTROLS" --seeds "$SEEDS" --out "$OUT/screen_sup" ;;
  confirm_clut) study data=fashion_mnist_cluttered "${SUP[@]}" --modes "$BEST" --controls "$CONTROLS" \
                 --seeds "$SEEDS" --out "$OUT/screen_clut" ;;
  knobs_sup)
    for m in 'prior guidance.prior.layers=[0,1,2,3,4,5]' 'prior guidance.prior.at_eval=true'; do
      sup_translated --modes "$m" --controls main --seeds 2 --out "$OUT/screen_sup"
    done
    # beta decayed over the first half, and over the first third: 5 seeds with shuffled (the first 2 are the
    # screen beside the knobs above), 3 with the mean map
    for n in 150 100; do
      m="prior guidance.prior.schedule.total_steps=$n"
      sup_translated --modes "$m" --controls main --seeds 5 --out "$OUT/screen_sup"
      sup_translated --modes "$m" --controls mean --seeds 3 --out "$OUT/screen_sup"
    done
    sup_translated --modes 'token_drop trainer.max_steps=540' --controls main --seeds 5 --no-baseline \
      --out "$OUT/screen_sup" ;;
  screen_mae)  study data=fashion_mnist_translated "${MAE[@]}" --modes masking recon_weight attention \
                 --controls main --seeds 2 --out "$OUT/screen_mae" ;;
  mae_long)    mae_long_translated --modes masking --controls none --seeds "$MAE_SEEDS" --out "$OUT/mae_long" ;;
  mae_long_ctrl) mae_long_translated --modes masking recon_weight --controls main --seeds "$MAE_SEEDS" \
                 --out "$OUT/mae_long_ctrl" ;;
  screen_clut) study data=fashion_mnist_cluttered "${SUP[@]}" --modes attention interrelation prior token_drop \
                 --controls main --seeds 2 --out "$OUT/screen_clut" ;;
  centred)     study "${SUP[@]}" --modes "$BEST" --controls auto --seeds 3 --out "$OUT/centred" ;;
  report)
    # the finished runs (siftguide.study.is_finished) of every part, found once: <part>/<label>/<kind>/s<seed>
    declare -A DONE=()
    done_list=$($PY -c 'import sys; from pathlib import Path
from siftguide.study import is_finished
print("\n".join(d for d in sys.argv[1:] if is_finished(Path(d))))' "$OUT"/*/*/*/s* "$GPU_OUT"/*/*/*/s*)
    while read -r d; do [ -n "$d" ] && DONE[$d]=1; done <<< "$done_list"
    # table NAME METRIC RUN_DIR_GLOB...: compare the finished runs matching the globs
    table() {
      local name=$1 metric=$2 d; shift 2
      local runs=()
      for d in "$@"; do [ -n "${DONE[$d]:-}" ] && runs+=("$d"); done
      if [ ${#runs[@]} -eq 0 ]; then echo "$name: no finished runs yet"; return; fi
      echo "== $name: ${#runs[@]} runs"
      $PY -m siftguide.analysis.compare "${runs[@]}" --metric "$metric" --verdict --out "docs/results/location/$name" | tail -n 3
    }
    S=$OUT/screen_sup
    table screen val/acc $S/baseline/none/s* $S/{attention,interrelation,token_drop}/*/s* $S/prior/{sift,shuffled}/s*
    table prior val/acc $S/baseline/none/s* $S/prior/*/s*
    table prior_beta2 val/acc $S/baseline/none/s* $S/prior_beta2/*/s*
    table interrelation val/acc $S/baseline/none/s* $S/interrelation/*/s*
    # prior's knobs (2 seeds each: which blocks, a faster beta decay, evaluated with its bias) beside beta=1
    table prior_knobs val/acc $S/baseline/none/s* $S/prior/{sift,shuffled}/s* \
      $S/prior_{layers012345,atevaltrue}/*/s* $S/prior_totalsteps100/{sift,shuffled}/s[01]
    table prior_decay150 val/acc $S/baseline/none/s* $S/prior_totalsteps150/*/s*
    table prior_decay100 val/acc $S/baseline/none/s* $S/prior_totalsteps100/*/s*
    # token dropping at the baseline's compute: 540 steps of keep 0.5 cost about 300 baseline steps
    if [ -d "$S/token_drop_maxsteps540" ]; then
      table token_drop_540 val/acc $S/baseline/none/s* $S/token_drop/*/s* $S/token_drop_maxsteps540/*/s*
    fi
    table mae val/knn_acc_cls $OUT/screen_mae/*/*/s*       # kNN on the class token
    table mae_mean val/knn_acc_mean $OUT/screen_mae/*/*/s*  # ... and on the mean of the patch tokens
    table mae_long val/knn_acc_cls $OUT/mae_long/*/*/s*
    table mae_long_mean val/knn_acc_mean $OUT/mae_long/*/*/s*
    # the long MAE schedule with controls, run on a GPU machine (GPU_OUT: its $OUT, copied back)
    if [ -d "$GPU_OUT/mae_long_ctrl" ]; then
      table mae_long_gpu val/knn_acc_cls $GPU_OUT/mae_long_ctrl/*/*/s*
      table mae_long_gpu_mean val/knn_acc_mean $GPU_OUT/mae_long_ctrl/*/*/s*
    fi
    table cluttered val/acc $OUT/screen_clut/*/*/s*
    table centred val/acc $OUT/centred/*/*/s* ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
