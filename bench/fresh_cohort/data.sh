#!/bin/bash
# A fresh cohort (patient seed SEED, default 23; each seed is used for one cohort and never by an earlier choice):
# 48 patients, 12 training / 12 validation / 24 test. Seeds used: 23 (FRESH23), 43 (FRESH43: translate.sh).
set -e
SEED=${SEED:-23}
medfusion make-data --output FRESH$SEED --patients 48 --size 128 --seed "$SEED" --split 0.25,0.25,0.5 --no-progress
