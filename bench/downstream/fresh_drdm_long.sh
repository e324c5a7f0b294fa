#!/bin/bash
# Session 17: the longer-trained DRDM (train_drdm.sh STEPS=3600 EVERY=1200, model and T' chosen on the seed-7
# cohort's validation split by val_drdm_long.sh and val_reg_drdm.sh) scored once on the test split of a fresh cohort
# (dataset seed 19, seg128_s19, never used before): the decision to train longer came after seed 7's test split had
# scored the 1,200-step model, so that split is not reused for this result. Few-shot segmentation at 5 % (none,
# MONAI elastic, the trained DRDM; seeds 0 1 2), the untrained forward-process field at the same T' as a reference
# (none + drdm-random: same subsets and initial weights, so its none arm repeats the first run's), and registration
# on synthetic pairs only (B-spline, the trained DRDM; seeds 0 1 2): one-thread jobs, all logged. Run from the folder
# that holds MODEL.
#   MODEL   exported DRDM folder            SEG_T   T' range for segmentation   REG_T   T' range for registration
set -e
HERE="$(cd "$(dirname "$0")" && pwd)"
# chosen in session 17: lr 4e-4, 3,600 steps; T' 40-48 for both tasks (bench/results/downstream.md)
MODEL=${MODEL:-drdm_lr4e4_model_step3600} SEG_T=${SEG_T:-40 48} REG_T=${REG_T:-40 48}
[ -f seg128_s19/manifests/segment.json ] || SEED=19 OUT=seg128_s19 bash "$HERE/data.sh"
read -r S0 S1 <<< "$SEG_T"
read -r R0 R1 <<< "$REG_T"
DATA=seg128_s19 MODEL="$MODEL" T0=$S0 T1=$S1 OUT=fresh19_seg_drdm bash "$HERE/test_seg_drdm.sh" > fresh19_seg_drdm.log 2>&1 &
DATA=seg128_s19 MODEL="$MODEL" T0=$R0 T1=$R1 SEEDS="0 1 2" OUT=fresh19_reg_drdm bash "$HERE/test_reg_drdm.sh" \
  > fresh19_reg_drdm.log 2>&1 &
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 medfusion evaluate --task segment --manifest seg128_s19/manifests/segment.json \
  --split test --augment none --augment drdm-random --drdm-t-range "$S0" "$S1" --fractions 0.05 --seeds 0 1 2 \
  --channels 8 16 32 64 --train-steps 400 --train-batch 8 --n-boot 2000 --output fresh19_seg_random \
  --test-log "$HERE/../results/test_log.jsonl" > fresh19_seg_random.log 2>&1 &
wait
