#!/bin/bash
# Trains DRDM (configs/drdm/builtin2d.yaml: the paper's recovery net, T = 80) on the downstream cohort's training
# split (seg128, data.sh) for a CPU budget of STEPS steps x batch 4 (default 1200, ~35 min with 2 threads on the
# idle 2-core box), then exports it to ${OUT}_model/ (default drdm128_model/) for `--augment drdm:drdm128_model`.
# Further arguments go to `medfusion fit` (e.g. --model.init_args.lr 4e-4). EVERY=N also keeps a checkpoint every N
# steps and exports each to ${OUT}_model_stepN/ (a learning curve: session 15 trained STEPS=3600 EVERY=1200
# OUT=drdm_long). Run from the folder that holds seg128/. Rerunning it resumes from the last checkpoint (--ckpt_path
# last); session 11's model was stopped once at step 390 and resumed (Lightning resumes a max_steps run one batch
# off: tests/apps/test_kill_resume.py).
set -e
STEPS=${STEPS:-1200}
OUT=${OUT:-drdm128}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
EXTRA=()
CKPT_DIR="$OUT/checkpoints/drdm/builtin2d"
if [ -n "$EVERY" ]; then
  CKPT_DIR="$OUT/steps"
  EXTRA=(--trainer.callbacks+=ModelCheckpoint --trainer.callbacks.dirpath "$CKPT_DIR"
    --trainer.callbacks.every_n_train_steps "$EVERY" --trainer.callbacks.save_top_k -1
    --trainer.callbacks.save_last true --trainer.callbacks.filename "step{step}"
    --trainer.callbacks.auto_insert_metric_name false)
fi
medfusion fit --config "$(dirname "$0")/../../configs/drdm/builtin2d.yaml" \
  --data.init_args.manifest seg128/manifests/segment.json \
  --trainer.max_steps "$STEPS" --trainer.check_val_every_n_epoch 25 --trainer.default_root_dir "$OUT" \
  --trainer.enable_progress_bar false --ckpt_path last "${EXTRA[@]}" "$@"
medfusion export --ckpt "$CKPT_DIR/last.ckpt" --output "${OUT}_model" --overwrite
if [ -n "$EVERY" ]; then
  for ckpt in "$CKPT_DIR"/step*.ckpt; do
    name=$(basename "$ckpt" .ckpt)
    medfusion export --ckpt "$ckpt" --output "${OUT}_model_${name}" --overwrite
  done
fi
