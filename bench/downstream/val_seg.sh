#!/bin/bash
# Choice of the elastic magnitude for the segment evaluation, on the validation split (fraction 0.05, seed 0).

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
M=medfusion
COMMON="--task segment --manifest seg128/manifests/segment.json --split validation --fractions 0.05 --seeds 0 --channels 8 16 32 64 --train-steps 400 --train-batch 8 --n-boot 1000 --overwrite"
$M evaluate $COMMON --output val_seg_a --augment none --augment elastic --elastic-magnitude 2 4
$M evaluate $COMMON --output val_seg_b --augment elastic --elastic-magnitude 4 8
