#!/bin/bash
# The downstream cohort: 100 built-in 2D patients at 128^2, standard protocol only, dataset seed SEED (default 7)
# in OUT (default seg128). Seed 17: the fresh cohort of fresh_f100.sh.
set -e
medfusion make-data --output "${OUT:-seg128}" --patients 100 --dim 2 --size 128 --protocols standard --seed "${SEED:-7}" \
  --split 0.6,0.15,0.25 --no-progress
