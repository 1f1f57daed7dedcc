#!/usr/bin/env bash
# Per-image maps composed with the dataset prior (relevance.prior_mix, prior_form, min_keypoints; the dense
# relevance.mode=dog): does a composed SIFT map beat the dataset-mean map, at three object sizes? Each part is one
# `python -m siftguide.study` (finished runs are skipped: rerun a part to resume it); its report in $OUT/<part>/report/.
#   bash scripts/composition_study.sh screen        small objects (data.object_scale=[0.2,0.35]), `prior` alone, 2
#                                                   seeds: today's SIFT map, the mixture and the product with the mean
#                                                   map, the keypoint-count fallback, the dense DoG map (alone and
#                                                   mixed); the mean map; the baseline
#   bash scripts/composition_study.sh confirm SIZE  one object-size range (small | mid | large: the default 24-44 px):
#                                                   `prior` alone and `[prior,token_drop]` (keep 0.5, 720 steps: about
#                                                   the baseline's compute) with $MAP (the screen's best composition),
#                                                   each against the mean map, the composed map with another image's
#                                                   part (shuffled) and random; the baseline; $SEEDS seeds
#   bash scripts/composition_study.sh budget SIZE   token dropping with a per-image budget: `[prior,token_drop]` as in
#                                                   confirm with guidance.token_drop.budget=entropy (the same mean keep;
#                                                   the rows run 0.75 of the patches), $SEEDS seeds; compared, paired by
#                                                   seed, with confirm's fixed-budget arm (the same runs otherwise):
#                                                   the report part writes docs/results/composition/budget_SIZE/
#   bash scripts/composition_study.sh ibot          iBOT (experiment=ibot_fm, translated, 300 steps, kNN on the teacher):
#                                                   attmask with SIFT maps (AttMask-High) against random, mean and
#                                                   shuffled maps, and iBOT's block masking (the baseline); $IBOT_SEEDS
#                                                   seeds (3). ibot_attmask: the teacher's own attention (AttMask);
#                                                   ibot_hints: AttMask-Hint with SIFT maps; the same settings
#   bash scripts/composition_study.sh report        the published tables: docs/results/composition/<part>/ (the
#                                                   study's own report: table.md, curves.png, verdict.md, verdict.json,
#                                                   recommended.yaml); runs still training are left out
# Cost axis: val/cost_s (process CPU time of the training steps; each run has one thread: JOBS=2 on 2 cores).
# Env: OUT (logs/composition_study), JOBS (2), SEEDS (5), MAP (the composition: relevance overrides, space-separated).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-logs/composition_study}
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-5}
MAP=${MAP:-"relevance.prior_mix=0.5"}
export WANDB_MODE=offline WANDB_SILENT=true
# sized for 2 CPU cores (about 6 min a run, two at a time): batch 64, 400 steps, validation every 50 on 1,000 images
SUP=(data=fashion_mnist_translated logger=csv trainer.enable_progress_bar=false data.batch_size=64
     trainer.max_steps=400 trainer.val_check_interval=50 data.val_subset=1000 module.warmup_steps=40 callbacks.knn=null)
PRIOR="guidance.prior.schedule.fraction=0.5"
DROP540="trainer.max_steps=720"  # token dropping at keep 0.5: 1.8x the steps, about the baseline's compute
scale() {
  case "$1" in
    small) echo "data.object_scale=[0.2,0.35]" ;;
    mid) echo "data.object_scale=[0.35,0.5]" ;;
    large) echo "data.object_scale=[0.375,0.6875]" ;;  # the variant's default 24-44 px, written out
    *) echo "unknown size $1 (small | mid | large)" >&2; exit 2 ;;
  esac
}
# iBOT sized for 2 CPU cores (a run is about 3.5 supervised steps' compute per step): batch 32, 300 steps
IBOT=(experiment=ibot_fm data=fashion_mnist_translated logger=csv trainer.enable_progress_bar=false data.batch_size=32
      trainer.max_steps=300 trainer.val_check_interval=50 data.val_subset=1000 callbacks.knn.bank_size=2000
      callbacks.knn.query_size=1000 --metric val/knn_acc --seeds "${IBOT_SEEDS:-3}")
study() { $PY -m siftguide.study --jobs "$JOBS" "${SUP[@]}" "$@"; }
part=${1:?part: screen | confirm SIZE | budget SIZE | ibot | ibot_attmask | ibot_hints | report}; shift
case "$part" in
  screen)
    study "$(scale small)" --seeds 2 --controls none --out "$OUT/screen" --modes \
      "prior $PRIOR" \
      "prior $PRIOR relevance.prior_mix=0.5" \
      "prior $PRIOR relevance.prior_mix=0.5 relevance.prior_form=product" \
      "prior $PRIOR relevance.min_keypoints=3" \
      "prior $PRIOR relevance.mode=dog" \
      "prior $PRIOR relevance.mode=dog relevance.prior_mix=0.5" \
      "prior $PRIOR relevance.kind=mean" "$@" ;;
  confirm)
    size=${1:?confirm needs a size: small | mid | large}; shift
    study "$(scale "$size")" --seeds "$SEEDS" --controls mean,shuffled,random --out "$OUT/$size" --modes \
      "prior $PRIOR $MAP" "[prior,token_drop] $PRIOR $DROP540 $MAP" "$@" ;;
  budget)
    size=${1:?budget needs a size: small | mid | large}; shift
    study "$(scale "$size")" --seeds "$SEEDS" --controls none --no-baseline --out "$OUT/budget_$size" --modes \
      "[prior,token_drop] $PRIOR $DROP540 $MAP guidance.token_drop.budget=entropy" "$@" ;;
  ibot)  # iBOT with SIFT-ranked masks against random, the mean map, another image's map and iBOT's block masks
    $PY -m siftguide.study --jobs "$JOBS" "${IBOT[@]}" --controls random,mean,shuffled --out "$OUT/ibot" \
      --modes attmask "$@" ;;
  ibot_hints)  # AttMask-Hint with SIFT maps (a share of the top patches left visible)
    $PY -m siftguide.study --jobs "$JOBS" "${IBOT[@]}" --controls none --no-baseline --out "$OUT/ibot_hints" \
      --modes "attmask guidance.attmask.hints=0.1" "$@" ;;
  ibot_attmask)  # AttMask itself (the teacher's attention): unguided, so its own study (a second baseline-like arm)
    $PY -m siftguide.study --jobs "$JOBS" "${IBOT[@]}" --controls none --no-baseline --out "$OUT/ibot_attmask" \
      --modes "none objective.mask_pattern=attention" "$@" ;;
  report)
    if ls "$OUT"/ibot/*/*/s*/results.json > /dev/null 2>&1; then
      mapfile -t runs < <($PY -c 'import sys; from pathlib import Path
from siftguide.analysis.study_report import is_finished
sys.stdout.write("".join(f"{d}\n" for a in sys.argv[1:] for d in sorted(Path(a).glob("*/*/s*")) if is_finished(d)))' \
        "$OUT/ibot" "$OUT/ibot_attmask" "$OUT/ibot_hints")
      $PY -m siftguide.analysis.compare "${runs[@]}" --metric val/knn_acc --baseline mask_pattern=block --verdict \
        --out docs/results/composition/ibot_all | tail -n 3
    fi
    for d in "$OUT"/budget_*/; do  # the per-image budget against confirm's fixed budget, paired by seed
      [ -d "$d" ] || continue
      size=${d%/}; size=${size##*budget_}
      mapfile -t runs < <(ls -d "$d"*/sift/s* "$OUT/$size"/prior+token_drop*/sift/s* "$OUT/$size"/baseline/none/s* \
        2> /dev/null)
      $PY -m siftguide.analysis.compare "${runs[@]}" --verdict \
        --out "docs/results/composition/budget_$size" | tail -n 3 || echo "budget_$size: no comparison yet"
    done
    for d in "$OUT"/*/; do
      name=$(basename "$d")
      [ -f "$d/study.json" ] && [ "${name#budget_}" = "$name" ] || continue
      $PY -m siftguide.analysis.study_report "$d" | tail -n 3 || { echo "$name: no report yet"; continue; }
      mkdir -p "docs/results/composition/$name"
      cp "$d/report/"{table.md,curves.png,verdict.md,verdict.json,recommended.yaml} "docs/results/composition/$name/"
    done ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
