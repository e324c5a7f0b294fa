#!/bin/bash
# The reference arms of val_drdm_long.sh's table (session 15), with its settings (validation split, 5 % labelled,
# seeds 0 1): MONAI elastic (val_elastic/), and none with DRDM's forward-process field at T' 40-48 (val_none_random/).
# The two calls run at once, one thread each. Run from the folder that holds seg128/.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
COMMON="--task segment --manifest seg128/manifests/segment.json --split validation --fractions 0.05 --seeds 0 1 --channels 8 16 32 64 --train-steps 400 --train-batch 8 --n-boot 1000 --overwrite"
# shellcheck disable=SC2086  # COMMON is a list of options
medfusion evaluate $COMMON --output val_elastic --augment elastic &
# shellcheck disable=SC2086
medfusion evaluate $COMMON --output val_none_random --augment none --augment drdm-random --drdm-t-range 40 48 &
wait
