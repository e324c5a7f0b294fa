#!/bin/bash
# Deformed copies per labelled slice (16 against the default 8) for the trained DRDM (T' 60-72) and MONAI elastic,
# on the validation split (fraction 0.05, seeds 0 1); compare with val_drdm.sh's 8-copy rows.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
medfusion evaluate --task segment --manifest seg128/manifests/segment.json --split validation --fractions 0.05 \
  --seeds 0 1 --channels 8 16 32 64 --train-steps 400 --train-batch 8 --n-boot 1000 --overwrite --copies 16 \
  --output val_copies16 --augment elastic --augment drdm:drdm128_model --elastic-magnitude 2 4 --drdm-t-range 60 72
