#!/bin/bash
# Trains DRDM (configs/drdm/builtin2d.yaml: the paper's recovery net, T = 80) on the downstream cohort's training
# split (seg128, data.sh) for a CPU budget of STEPS steps x batch 4 (default 2000), one thread, then exports it to
# drdm128_model/ for `--augment drdm:drdm128_model`. Run from the folder that holds seg128/.
set -e
STEPS=${STEPS:-2000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
medfusion fit --config "$(dirname "$0")/../../configs/drdm/builtin2d.yaml" \
  --data.init_args.manifest seg128/manifests/segment.json \
  --trainer.max_steps "$STEPS" --trainer.check_val_every_n_epoch 25 --trainer.default_root_dir drdm128 \
  --trainer.enable_progress_bar false --ckpt_path last
medfusion export --ckpt drdm128/checkpoints/drdm/builtin2d/last.ckpt --output drdm128_model --overwrite
