#!/bin/bash
# Registration trained on pairs synthesised by a trained DRDM (MODEL, default drdm128_model/) against random B-spline
# pairs, the settings of test_reg.sh (T' as chosen on validation), on the test split: run once, logged. SEEDS
# (default 0 1), OUT (default test_reg_drdm), DATA (the cohort folder, default seg128).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# shellcheck disable=SC2086  # SEEDS is a list
T0=${T0:-60} T1=${T1:-72}  # val_drdm.sh chose 60-72 (session 11)
medfusion evaluate --task register --manifest "${DATA:-seg128}/manifests/register.json" --split test \
  --augment bspline --augment "drdm:${MODEL:-drdm128_model}" --drdm-t-range "$T0" "$T1" --seeds ${SEEDS:-0 1} --copies 4 \
  --train-steps 200 --train-batch 8 --channels 16 32 32 32 --n-boot 2000 --output "${OUT:-test_reg_drdm}" \
  --test-log "$(dirname "$0")/../results/test_log.jsonl"
