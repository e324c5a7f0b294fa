#!/bin/bash
# The second registration set (issue 19): MNI152 brain phantoms (nilearn's template, seeded warps), 2D central axial
# slices at 96 x 112, 60 patients (30 / 12 / 18), pairs of different patients within a split. VoxelMorph trained on
# real pairs, B-spline pairs, DRDM forward-process pairs and real + DRDM pairs, the budget and settings of
# test_reg.sh (nothing chosen on this set), 3 seeds; the test split once, logged. ~15 min on one CPU thread.
set -e
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
HERE="$(cd "$(dirname "$0")" && pwd)"
[ -f brain2d/manifests/register.json ] || python "$HERE/brain_data.py" --output brain2d --patients 60 --seed 5
medfusion evaluate --task register --manifest brain2d/manifests/register.json --split test --hu-window 0 1 \
  --augment real --augment bspline --augment drdm-random --augment real+drdm-random --seeds 0 1 2 --copies 4 \
  --train-steps 200 --train-batch 8 --channels 16 32 32 32 --n-boot 2000 --output test_reg_brain \
  --test-log "$HERE/../results/test_log.jsonl"
