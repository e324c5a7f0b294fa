#!/bin/bash
# The mixing ratio of the pooled arm (real pairs + DRDM forward-process pairs) for the register evaluation, on the
# validation split (seeds 0 and 1; the settings of test_reg.sh otherwise): 1 synthetic pair per real pair against 4
# (test_reg.sh's), with real pairs alone beside them. Run from the working folder that holds seg128 (data.sh).
# The two calls run at once, one thread each (~10 min on the 2-core VM).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
COMMON="--task register --manifest seg128/manifests/register.json --split validation --seeds 0 1 --train-steps 200 --train-batch 8 --channels 16 32 32 32 --n-boot 1000 --overwrite"
medfusion evaluate $COMMON --output val_reg_mix1 --augment real --augment real+drdm-random --copies 1 &
medfusion evaluate $COMMON --output val_reg_mix4 --augment real+drdm-random --copies 4 &
wait
