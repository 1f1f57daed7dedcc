#!/usr/bin/env bash
# Issue 24's experiment: combine the keypoint levers (where attention looks: prior; how many tokens a step pays
# for: token_drop) and measure time to accuracy on the cost axis (val/cost_s: process CPU time here, GPU time on
# CUDA), at about the baseline's compute. Each part is one `python -m siftguide.study` (finished runs are skipped:
# rerun a part to resume it) and ends with its compare report in $OUT/<part>/report/.
#   bash scripts/levers_study.sh screen    translated, supervised: the baseline and every combination with SIFT
#                                          maps, 2 seeds (no controls: the screen picks what to confirm)
#   bash scripts/levers_study.sh confirm   translated: $BEST with its wrong-map controls (shuffled, the dataset-mean
#                                          map, random dropping where tokens are dropped) and the baseline, $SEEDS
#                                          seeds, in the screen's directory (its runs reused)
#   bash scripts/levers_study.sh clutter   cluttered, supervised: the baseline, $BEST and prior, 2 seeds (a screen),
#                                          each with the shuffled, dataset-mean and random maps
#   bash scripts/levers_study.sh scale     sized for one GPU (not run on the 2-core CPU): ViT-S/16 at 224 px, bf16, batch
#                                          256, on translated Fashion-MNIST at 224 px (garments 84-154 px): the
#                                          baseline ($SCALE_STEPS steps), $BEST scaled to the same compute and its
#                                          controls, 3 seeds: PY=python3 JOBS=4 bash scripts/levers_study.sh scale
#   bash scripts/levers_study.sh report    the published tables: docs/results/levers/<table>/ (table.md, curves.png,
#                                          verdict.md); the confirmation's recipe in docs/results/levers/recipe/
#                                          (verdict.json, recommended.yaml) and docs/results/headline.json; runs
#                                          still training are left out
# Step budgets: a keep-0.5 step costs about 0.54 of a baseline step (bench/throughput.py), so token dropping runs 540
# steps (about the baseline's 300 in compute) and with full_after=0.8 (all tokens for the last 20 %) 475 steps.
# Env: OUT (logs/levers_study), JOBS (2: two 1-thread runs on 2 cores), SEEDS (5), BEST (the screen's best arm).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-logs/levers_study}
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-5}
export WANDB_MODE=offline WANDB_SILENT=true
SUP=(logger=csv trainer.enable_progress_bar=false trainer.max_steps=300 trainer.val_check_interval=25
     data.val_subset=2000 module.warmup_steps=30 callbacks.knn=null)
PRIOR="guidance.prior.schedule.fraction=0.5"
DROP540="trainer.max_steps=540"
FLIP="guidance.token_drop.full_after=0.8 trainer.max_steps=475"
ARMS=(
  "prior $PRIOR"
  "token_drop $DROP540"
  "[prior,token_drop] $PRIOR $DROP540"
  "token_drop $FLIP"
  "[prior,token_drop] $PRIOR $FLIP"
  "[prior,interrelation] $PRIOR"
)
# the screen's best (cost to target on the mean curve, 2 seeds): prior + token_drop at about the baseline's compute
BEST=${BEST:-"[prior,token_drop] $PRIOR $DROP540"}
SCALE_STEPS=${SCALE_STEPS:-600}
part=${1:?part: screen | confirm | clutter | scale | report}; shift
study() { $PY -m siftguide.study --jobs "$JOBS" "${SUP[@]}" "$@"; }
case "$part" in
  screen)  study data=fashion_mnist_translated --modes "${ARMS[@]}" --controls none --seeds 2 --out "$OUT/screen" "$@" ;;
  confirm) study data=fashion_mnist_translated --modes "$BEST" --controls shuffled,mean,random --seeds "$SEEDS" \
             --out "$OUT/screen" "$@" ;;
  clutter) study data=fashion_mnist_cluttered --modes "$BEST" "prior $PRIOR" --controls shuffled,mean,random \
             --seeds 2 --out "$OUT/clutter" "$@" ;;
  scale)
    study data=fashion_mnist_translated data.canvas_size=224 data.min_size=84 data.max_size=154 \
      model=vit_small_patch16_224 model.in_chans=1 transform=grey trainer=gpu data.batch_size=256 data.num_workers=8 \
      trainer.max_steps="$SCALE_STEPS" trainer.val_check_interval=50 \
      --modes "[prior,token_drop] $PRIOR trainer.max_steps=$((SCALE_STEPS * 9 / 5))" --controls shuffled,mean,random \
      --seeds 3 --out "$OUT/scale" "$@" ;;
  report)
    table() {  # table NAME METRIC DIR...: compare the finished runs below the directories
      local name=$1 metric=$2; shift 2
      local runs
      mapfile -t runs < <($PY -c 'import sys; from pathlib import Path
from siftguide.study import is_finished
sys.stdout.write("".join(f"{d}\n" for a in sys.argv[1:] for d in sorted(Path(a).glob("*/*/s*")) if is_finished(d)))' "$@")
      if [ ${#runs[@]} -eq 0 ]; then echo "$name: no finished runs yet"; return; fi
      echo "== $name: ${#runs[@]} runs"
      $PY -m siftguide.analysis.compare "${runs[@]}" --metric "$metric" --verdict --out "docs/results/levers/$name" | tail -n 3
    }
    table translated val/acc "$OUT/screen"   # every arm of the screen and the confirmation's controls
    table cluttered val/acc "$OUT/clutter"
    table scale val/acc "$OUT/scale"
    # the recipe of the confirmation: the study's own report (verdict.json with each group's overrides,
    # recommended.yaml), and the headline the README and tools read
    study data=fashion_mnist_translated --modes "$BEST" --controls shuffled,mean,random --seeds "$SEEDS" \
      --out "$OUT/screen" --report-only > /dev/null
    mkdir -p docs/results/levers/recipe
    cp "$OUT/screen/report/"{verdict.json,recommended.yaml,verdict.md,table.md,curves.png} docs/results/levers/recipe/
    $PY -m siftguide.analysis.recipe docs/results/levers/recipe/verdict.json --headline docs/results/headline.json \
      --data fashion_mnist_translated ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
