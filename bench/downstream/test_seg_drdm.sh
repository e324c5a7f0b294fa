#!/bin/bash
# Few-shot segmentation with a trained DRDM (MODEL, default drdm128_model/ from train_drdm.sh) on the test split, 5 %
# labelled, with none and MONAI elastic trained in the same run (same subsets and initial weights): run once, logged.
# Output: OUT (default test_seg_drdm). DATA: the cohort folder (default seg128; fresh_drdm_long.sh passes a fresh
# cohort). T' = ${T0} ${T1}: the range chosen on the validation split (val_drdm.sh, val_drdm_long.sh).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
T0=${T0:-60} T1=${T1:-72}  # val_drdm.sh chose 60-72 (session 11)
medfusion evaluate --task segment --manifest "${DATA:-seg128}/manifests/segment.json" --split test \
  --augment none --augment elastic --augment "drdm:${MODEL:-drdm128_model}" --elastic-magnitude 2 4 --drdm-t-range "$T0" "$T1" \
  --fractions 0.05 --seeds 0 1 2 --channels 8 16 32 64 --train-steps 400 --train-batch 8 --n-boot 2000 \
  --output "${OUT:-test_seg_drdm}" --test-log "$(dirname "$0")/../results/test_log.jsonl"
