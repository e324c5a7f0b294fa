#!/bin/bash
# Few-shot segmentation yardstick on the test split (run once; logged to bench/results/test_log.jsonl).
# elastic magnitude (2, 4): the earlier 64^2 bench's setting, kept because on validation (val_seg.sh: fraction 0.05,
# seed 0) it scored Dice 0.563 against (4, 8)'s 0.535. Then: python bench/downstream/resummarize.py test_seg --output test_seg_summary
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
medfusion evaluate --task segment --manifest seg128/manifests/segment.json --split test \
  --augment none --augment elastic --augment drdm-random --elastic-magnitude 2 4 --fractions 0.05 --seeds 0 1 2 \
  --channels 8 16 32 64 --train-steps 400 --train-batch 8 --n-boot 2000 --output test_seg \
  --test-log "$(dirname "$0")/../results/test_log.jsonl"
