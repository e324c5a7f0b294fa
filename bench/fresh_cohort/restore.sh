#!/bin/bash
# CT restoration on a fresh cohort (issue 18: the RDDM / DiffIR tables re-measured with `medfusion evaluate`).
# TASK=lowdose (default): low_dose -> standard, same kernel (the `restore` manifest).
# TASK=kernel: every non-standard protocol (sharp, smooth, low_dose, thick, sharp_low_dose) -> standard (the
#    `standardize` manifest, DiffusionCT's task); the least-squares linear filter per protocol joins the baselines.
# TASK=sr: brain MR 4x super-resolution (bench/fresh_cohort/sr_data.py: 72 MNI152-based patients, 9 axial slices each,
#    intensities [0, 1]): every model and the DataModule map [0, 1] to [-1, 1]; PSNR/SSIM on [0, 1], noise SD and
#    texture in white matter; the linear filter (a least-squares deblurring filter) joins the baselines, the
#    noise-matched one does not (the high-resolution scans carry no noise to match).
# 1. FRESH$SEED (sr: FRESH_SR$SEED): 72 new patients (patient seed SEED, default 37, never used before),
#    24 training / 24 validation / 24 test. (Seed 31 was the first low-dose run, with the EMA before its warm-up:
#    bench/results/restoration_fresh.md says why that run is withdrawn.)
# 2. Training with the shipped configs, the same budget for every learned model: 1,200 optimiser steps x batch 8 of
#    64^2 crops (DiffIR: 600 stage-1 + 600 stage-2 steps, the first 200 of stage 2 training the prior alone),
#    memory cache, last checkpoint, no validation during fit.
# 3. RDDM's sampling steps (2, 5, 10) chosen on the validation split by mean PSNR over the body.
# 4. The test split once, logged: RDDM (chosen steps), DiffIR, the supervised U-Net, its noise-matched version,
#    the val-tuned Gaussian, identity.
# ~50 min (lowdose) on one CPU thread. Run from a working folder: cd WORK && bash .../restore.sh
set -e
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE="$(cd "$(dirname "$0")" && pwd)"
SEED=${SEED:-37}
TASK=${TASK:-lowdose}
CFG="$HERE/../../configs"
D=FRESH$SEED WINDOW=() METRICS=()
case "$TASK" in
  lowdose) MTASK=restore; P=restore$SEED; PROTOCOLS=(--protocols low_dose,standard)
           EXTRA=(--baseline noise-matched:$P/supervised/model) ;;
  kernel) MTASK=standardize; P=kernel$SEED; PROTOCOLS=()
          EXTRA=(--baseline noise-matched:$P/supervised/model --baseline linear-filter) ;;
  sr) MTASK=restore; P=sr$SEED; D=FRESH_SR$SEED; EXTRA=(--baseline linear-filter)
      WINDOW=(--model.init_args.hu_window "[0.0, 1.0]" --data.init_args.hu_window "[0.0, 1.0]")
      METRICS=(--window 0,1 --soft-window 0,1 --roi-label 3) ;;
  *) echo "TASK must be lowdose, kernel or sr, got $TASK" >&2; exit 2 ;;
esac
M=$D/manifests/$MTASK.json
if [ "$TASK" = sr ]; then
  [ -f "$M" ] || python "$HERE/sr_data.py" --output "$D" --patients 72 --seed "$SEED" --split 0.34,0.33,0.33
else
  [ -f "$M" ] || medfusion make-data --output "$D" --patients 72 --size 128 "${PROTOCOLS[@]}" \
    --seed "$SEED" --split 0.34,0.33,0.33 --no-progress
fi
fit() {  # NAME CONFIG STEPS [extra fit arguments]; exports $P/NAME/model
  local name=$1 config=$2 steps=$3; shift 3
  [ -f "$P/$name/model/config.yaml" ] && return
  medfusion fit --config "$config" --data.init_args.manifest "$M" --data.init_args.task $MTASK \
    --data.init_args.roi_size "[64, 64]" --data.init_args.batch_size 8 --data.init_args.cache memory \
    --trainer.max_steps "$steps" --trainer.limit_val_batches 0 --trainer.enable_progress_bar false \
    --trainer.default_root_dir "$P/$name" --trainer.logger false "${WINDOW[@]}" "$@"
  medfusion export --ckpt "$(find "$P/$name" -name last.ckpt | head -1)" --output "$P/$name/model" \
    --overwrite
}
fit supervised "$CFG/supervised/builtin2d.yaml" 1200 --trainer.callbacks.init_args.dirpath $P/supervised/ckpt
fit rddm "$CFG/rddm/lowdose2d.yaml" 1200
fit diffir1 "$CFG/diffir/stage1_lowdose2d.yaml" 600
fit diffir "$CFG/diffir/stage2_lowdose2d.yaml" 600 \
  --model.init_args.stage1 "$(find $P/diffir1 -name last.ckpt | head -1)" --model.init_args.encoder_steps 200
R=$P/rddm/model
[ -f ${P}_val/summary.json ] || medfusion evaluate --task $MTASK --manifest "$M" --split validation \
  --model "$R@num_steps=2" --model "$R@num_steps=5" --model "$R@num_steps=10" --seed 0 --n-boot 1000 \
  --output ${P}_val "${METRICS[@]}"
STEPS=$(P=$P python - <<'PY'
import json
import os
methods = json.load(open(f"{os.environ['P']}_val/summary.json"))["methods"]
scores = {k: v["metrics"]["psnr_body"]["mean"] for k, v in methods.items() if "num_steps=" in k}
print(max(scores, key=scores.get).split("num_steps=")[1])
PY
)
echo "RDDM sampling steps chosen on validation: $STEPS"
medfusion evaluate --task $MTASK --manifest "$M" --split test --model "$R@num_steps=$STEPS" \
  --model $P/diffir/model --baseline identity --baseline gaussian --baseline supervised:$P/supervised/model \
  "${EXTRA[@]}" --seed 0 --n-boot 2000 --output ${P}_test \
  --test-log "$HERE/../results/test_log.jsonl" "${METRICS[@]}"
