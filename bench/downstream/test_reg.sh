#!/bin/bash
# Registration yardstick on the test split (run once; logged to bench/results/test_log.jsonl).
# Session 14 re-ran it with a third seed: SEEDS="0 1 2" OUT=test_reg_3seeds bash test_reg.sh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# shellcheck disable=SC2086  # SEEDS is a list
medfusion evaluate --task register --manifest seg128/manifests/register.json --split test \
  --augment real --augment bspline --augment drdm-random --augment real+drdm-random --seeds ${SEEDS:-0 1} --copies 4 \
  --train-steps 200 --train-batch 8 --channels 16 32 32 32 --n-boot 2000 --output "${OUT:-test_reg}" \
  --test-log "$(dirname "$0")/../results/test_log.jsonl"
