#!/bin/bash
# The supervised restorer at a DiffusionCT model's budget, on that model's training patients, exported to $SUP/model.
# Default: make demo's budget (650 x 2 + 420 x 4 = 2,980 pairs of 64^2 crops = 745 steps x batch 4) on runs/demo/data.
# The long CPU budget (configs/demo/cpu_long.yaml: 2,000 x 2 + 4,000 x 4 = 20,000 pairs):
#   DEMO=runs/demo_long SUP=sup_long STEPS=5000 bash bench/fresh_cohort/train_supervised.sh
set -e
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEMO=${DEMO:-runs/demo} SUP=${SUP:-sup_equal} STEPS=${STEPS:-745}
medfusion fit --config "$(dirname "$0")/../../configs/supervised/builtin2d.yaml" \
  --data.init_args.manifest "$DEMO/data/manifests/standardize.json" --data.init_args.batch_size 4 \
  --trainer.max_steps "$STEPS" --trainer.default_root_dir "$SUP" --trainer.enable_progress_bar false \
  --trainer.callbacks.init_args.dirpath "$SUP/checkpoints"
medfusion export --ckpt "$SUP/checkpoints/last.ckpt" --output "$SUP/model" --overwrite
