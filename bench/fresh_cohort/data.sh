#!/bin/bash
# The fresh cohort (patient seed 23, never used by an earlier choice): 48 patients, 24 of them test.
set -e
medfusion make-data --output FRESH23 --patients 48 --size 128 --seed 23 --split 0.25,0.25,0.5 --no-progress
