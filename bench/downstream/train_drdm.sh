#!/bin/bash
# Trains DRDM (configs/drdm/builtin2d.yaml: the paper's recovery net, T = 80) on the downstream cohort's training
# split (seg128, data.sh) for a CPU budget of STEPS steps x batch 4 (default 1200, ~35 min with 2 threads on the
# idle 2-core box), then exports it to drdm128_model/ for `--augment drdm:drdm128_model`. Run from the folder that
# holds seg128/. Rerunning it resumes from the last checkpoint (--ckpt_path last); session 11's model was stopped once
# at step 390 and resumed (Lightning resumes a max_steps run one batch off: tests/apps/test_kill_resume.py).
set -e
STEPS=${STEPS:-1200}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
medfusion fit --config "$(dirname "$0")/../../configs/drdm/builtin2d.yaml" \
  --data.init_args.manifest seg128/manifests/segment.json \
  --trainer.max_steps "$STEPS" --trainer.check_val_every_n_epoch 25 --trainer.default_root_dir drdm128 \
  --trainer.enable_progress_bar false --ckpt_path last
medfusion export --ckpt drdm128/checkpoints/drdm/builtin2d/last.ckpt --output drdm128_model --overwrite
