#!/bin/bash
# DiffusionCT at the long CPU budget (configs/demo/cpu_long.yaml: 96 patients, 2,000 + 4,000 steps) against every
# baseline on the FRESH23 test split, the equal-budget supervised restorer (5,000 steps x 4 = 20,000 pairs) included.
# Nothing in it is chosen on FRESH23: the model shows the output its own validation split picks, the baselines fit
# on FRESH23's training and validation patients. Run from a working folder (~70 min on one CPU thread):
#   bash /path/to/bench/fresh_cohort/long.sh
set -e
HERE="$(cd "$(dirname "$0")" && pwd)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -f runs/demo_long/metrics.json ] || medfusion demo --output runs/demo_long --budget "$HERE/../../configs/demo/cpu_long.yaml" --overwrite
[ -f sup_long/model/config.yaml ] || DEMO=runs/demo_long SUP=sup_long STEPS=5000 bash "$HERE/train_supervised.sh"
[ -f FRESH23/manifests/standardize.json ] || bash "$HERE/data.sh"
DEMO=runs/demo_long SUP=sup_long OUT=fresh23_long_test bash "$HERE/test.sh"
