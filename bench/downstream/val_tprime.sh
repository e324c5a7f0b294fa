#!/bin/bash
# Session 14: the size of DRDM's forward-process field per labelled fraction, on the validation split (seeds 0 1):
# T' (the level the field is drawn at; larger = larger deformations) at 40-48 (the paper's, used so far), 20-28 and
# 10-16, at 5 % and 100 % labelled, beside no augmentation. Results: bench/results/downstream.md, last section.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
COMMON="--task segment --manifest seg128/manifests/segment.json --split validation --fractions 0.05 1.0 --seeds 0 1 --channels 8 16 32 64 --train-steps 400 --train-batch 8 --n-boot 1000 --overwrite"
medfusion evaluate $COMMON --output val_tprime_40 --augment none --augment drdm-random --drdm-t-range 40 48
medfusion evaluate $COMMON --output val_tprime_20 --augment drdm-random --drdm-t-range 20 28
medfusion evaluate $COMMON --output val_tprime_10 --augment drdm-random --drdm-t-range 10 16
