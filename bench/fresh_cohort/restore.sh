#!/bin/bash
# Low-dose CT restoration (issue 18: the RDDM / DiffIR table re-measured with `medfusion evaluate` on a fresh cohort).
# 1. FRESH$SEED: 72 new 2D patients (patient seed SEED, default 37, never used before), low_dose and standard
#    protocols, 24 training / 24 validation / 24 test. (Seed 31 was the first run, with the EMA before its warm-up:
#    bench/results/restoration_fresh.md says why that run is withdrawn.)
# 2. Training with the shipped configs, the same budget for every learned model: 1,200 optimiser steps x batch 8 of
#    64^2 crops (DiffIR: 600 stage-1 + 600 stage-2 steps, the first 200 of stage 2 training the prior alone),
#    memory cache, last checkpoint, no validation during fit.
# 3. RDDM's sampling steps (2, 5, 10) chosen on the validation split by mean PSNR over the body.
# 4. The test split once, logged: RDDM (chosen steps), DiffIR, the supervised U-Net, its noise-matched version,
#    the val-tuned Gaussian, identity.
# ~50 min on one CPU thread. Run from a working folder: cd WORK && bash .../restore.sh
set -e
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE="$(cd "$(dirname "$0")" && pwd)"
SEED=${SEED:-37}
CFG="$HERE/../../configs"
M=FRESH$SEED/manifests/restore.json
[ -f "$M" ] || medfusion make-data --output FRESH$SEED --patients 72 --size 128 --protocols low_dose,standard \
  --seed "$SEED" --split 0.34,0.33,0.33 --no-progress
fit() {  # NAME CONFIG STEPS [extra fit arguments]; exports restore$SEED/NAME/model
  local name=$1 config=$2 steps=$3; shift 3
  [ -f "restore$SEED/$name/model/config.yaml" ] && return
  medfusion fit --config "$config" --data.init_args.manifest "$M" --data.init_args.task restore \
    --data.init_args.roi_size "[64, 64]" --data.init_args.batch_size 8 --data.init_args.cache memory \
    --trainer.max_steps "$steps" --trainer.limit_val_batches 0 --trainer.enable_progress_bar false \
    --trainer.default_root_dir "restore$SEED/$name" --trainer.logger false "$@"
  medfusion export --ckpt "$(find "restore$SEED/$name" -name last.ckpt | head -1)" --output "restore$SEED/$name/model" \
    --overwrite
}
fit supervised "$CFG/supervised/builtin2d.yaml" 1200 --trainer.callbacks.init_args.dirpath restore$SEED/supervised/ckpt
fit rddm "$CFG/rddm/lowdose2d.yaml" 1200
fit diffir1 "$CFG/diffir/stage1_lowdose2d.yaml" 600
fit diffir "$CFG/diffir/stage2_lowdose2d.yaml" 600 \
  --model.init_args.stage1 "$(find restore$SEED/diffir1 -name last.ckpt | head -1)" --model.init_args.encoder_steps 200
R=restore$SEED/rddm/model
[ -f restore${SEED}_val/summary.json ] || medfusion evaluate --task restore --manifest "$M" --split validation \
  --model "$R@num_steps=2" --model "$R@num_steps=5" --model "$R@num_steps=10" --seed 0 --n-boot 1000 \
  --output restore${SEED}_val
STEPS=$(SEED=$SEED python - <<'PY'
import json
import os
methods = json.load(open(f"restore{os.environ['SEED']}_val/summary.json"))["methods"]
scores = {k: v["metrics"]["psnr_body"]["mean"] for k, v in methods.items() if "num_steps=" in k}
print(max(scores, key=scores.get).split("num_steps=")[1])
PY
)
echo "RDDM sampling steps chosen on validation: $STEPS"
medfusion evaluate --task restore --manifest "$M" --split test --model "$R@num_steps=$STEPS" \
  --model restore$SEED/diffir/model --baseline identity --baseline gaussian --baseline supervised:restore$SEED/supervised/model \
  --baseline noise-matched:restore$SEED/supervised/model --seed 0 --n-boot 2000 --output restore${SEED}_test \
  --test-log "$HERE/../results/test_log.jsonl"
