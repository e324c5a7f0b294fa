#!/bin/bash
# Few-shot segmentation yardstick on the test split, 20 % labelled (run once; logged). Same settings as test_seg.sh.
# elastic magnitude (2, 4): fixed before any run (the earlier 64^2 bench's setting); val_seg.sh compares (4, 8).
# Another fraction, same arms and settings: FRACTION=1.0 OUT=test_seg_f100 bash test_seg_f20.sh (session 14);
# TRANGE sets the forward-process field's T' (default 40 48; val_tprime.sh chooses it per fraction on validation).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# shellcheck disable=SC2086  # TRANGE is two numbers
medfusion evaluate --task segment --manifest seg128/manifests/segment.json --split test \
  --augment none --augment elastic --augment drdm-random --elastic-magnitude 2 4 --drdm-t-range ${TRANGE:-40 48} --fractions "${FRACTION:-0.2}" \
  --seeds 0 1 2 --channels 8 16 32 64 --train-steps 400 --train-batch 8 --n-boot 2000 --output "${OUT:-test_seg_f20}" \
  --test-log "$(dirname "$0")/../results/test_log.jsonl"
