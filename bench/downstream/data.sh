#!/bin/bash
# The downstream cohort: 100 built-in 2D patients at 128^2, standard protocol only, dataset seed 7.
set -e
medfusion make-data --output seg128 --patients 100 --dim 2 --size 128 --protocols standard --seed 7 --split 0.6,0.15,0.25 --no-progress
