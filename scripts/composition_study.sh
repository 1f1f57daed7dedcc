#!/usr/bin/env bash
# Per-image maps composed with the dataset prior (relevance.prior_mix, prior_form, min_keypoints; the dense
# relevance.mode=dog): does a composed SIFT map beat the dataset-mean map, at three object sizes? Each part is one
# `python -m siftguide.study` (finished runs are skipped: rerun a part to resume it); its report in $OUT/<part>/report/.
#   bash scripts/composition_study.sh screen        small objects (data.object_scale=[0.2,0.35]), `prior` alone, 2
#                                                   seeds: today's SIFT map, the mixture and the product with the mean
#                                                   map, the keypoint-count fallback, the dense DoG map (alone and
#                                                   mixed); the mean map; the baseline
#   bash scripts/composition_study.sh confirm SIZE  one object-size range (small | mid | large: the default 24-44 px):
#                                                   `prior` alone and `[prior,token_drop]` (keep 0.5, 540 steps: about
#                                                   the baseline's compute) with $MAP (the screen's best composition),
#                                                   each against the mean map, the composed map with another image's
#                                                   part (shuffled) and random; the baseline; $SEEDS seeds
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
SUP=(data=fashion_mnist_translated logger=csv trainer.enable_progress_bar=false trainer.max_steps=300
     trainer.val_check_interval=25 data.val_subset=2000 module.warmup_steps=30 callbacks.knn=null)
PRIOR="guidance.prior.schedule.fraction=0.5"
DROP540="trainer.max_steps=540"
scale() {
  case "$1" in
    small) echo "data.object_scale=[0.2,0.35]" ;;
    mid) echo "data.object_scale=[0.35,0.5]" ;;
    large) echo "data.object_scale=[0.375,0.6875]" ;;  # the variant's default 24-44 px, written out
    *) echo "unknown size $1 (small | mid | large)" >&2; exit 2 ;;
  esac
}
study() { $PY -m siftguide.study --jobs "$JOBS" "${SUP[@]}" "$@"; }
part=${1:?part: screen | confirm SIZE | report}; shift
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
  report)
    for d in "$OUT"/*/; do
      name=$(basename "$d")
      [ -f "$d/study.json" ] || continue
      $PY -m siftguide.analysis.study_report "$d" | tail -n 3 || { echo "$name: no report yet"; continue; }
      mkdir -p "docs/results/composition/$name"
      cp "$d/report/"{table.md,curves.png,verdict.md,verdict.json,recommended.yaml} "docs/results/composition/$name/"
    done ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
