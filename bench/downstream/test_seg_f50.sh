#!/bin/bash
# Few-shot segmentation at 50 % labelled (30 of the 60 training patients) on the test split, every arm in one run:
# none, MONAI elastic (2, 4) and the trained DRDM (drdm128_model/, T' 60-72 as chosen by val_drdm.sh at 5 %; one
# T' range per run, so the forward-process field at 40-48 is not in it). The settings of test_seg.sh otherwise.
# Run once, logged.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
medfusion evaluate --task segment --manifest seg128/manifests/segment.json --split test \
  --augment none --augment elastic --augment drdm:drdm128_model --elastic-magnitude 2 4 \
  --drdm-t-range 60 72 --fractions 0.5 --seeds 0 1 2 --channels 8 16 32 64 --train-steps 400 --train-batch 8 \
  --n-boot 2000 --output test_seg_f50 --test-log "$(dirname "$0")/../results/test_log.jsonl"
