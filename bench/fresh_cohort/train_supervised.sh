#!/bin/bash
# The supervised restorer at make demo's budget (2,980 pairs of 64^2 crops = 745 steps x batch 4), on the demo's
# training patients (runs/demo/data), exported to sup_equal/model.
set -e
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
medfusion fit --config "$(dirname "$0")/../../configs/supervised/builtin2d.yaml" \
  --data.init_args.manifest runs/demo/data/manifests/standardize.json --data.init_args.batch_size 4 \
  --trainer.max_steps 745 --trainer.default_root_dir sup_equal --trainer.enable_progress_bar false \
  --trainer.callbacks.init_args.dirpath sup_equal/checkpoints
medfusion export --ckpt sup_equal/checkpoints/last.ckpt --output sup_equal/model --overwrite
