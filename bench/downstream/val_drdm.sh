#!/bin/bash
# Settings of the trained-DRDM arm, chosen on the validation split (fraction 0.05, seeds 0 1): the level range T'
# the recovery starts from (the paper's 40-48 of T = 80, and 60-72: larger deformations), beside MONAI elastic and
# the untrained forward process. Needs drdm128_model/ (train_drdm.sh).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
COMMON="--task segment --manifest seg128/manifests/segment.json --split validation --fractions 0.05 --seeds 0 1 --channels 8 16 32 64 --train-steps 400 --train-batch 8 --n-boot 1000 --overwrite"
medfusion evaluate $COMMON --output val_drdm_a --augment elastic --augment drdm-random --augment drdm:drdm128_model \
  --drdm-t-range 40 48
medfusion evaluate $COMMON --output val_drdm_b --augment drdm:drdm128_model --drdm-t-range 60 72
