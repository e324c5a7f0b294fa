#!/bin/bash
# Session 14: the 100 % result with the forward-process field's T' (10-16, chosen by val_tprime.sh on the seed-7
# cohort's validation split) re-measured on a fresh cohort (dataset seed 17, seg128_s17), because the idea of
# revisiting T' at 100 % came from seed 7's test split (test_seg_f100.sh). Same settings as test_seg_f20.sh;
# the arms run as two jobs of one thread each. Test once, logged.
set -e
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
HERE="$(cd "$(dirname "$0")" && pwd)"
[ -f seg128_s17/manifests/segment.json ] || SEED=17 OUT=seg128_s17 bash "$HERE/data.sh"
COMMON="--task segment --manifest seg128_s17/manifests/segment.json --split test --fractions 1.0 --seeds 0 1 2 --channels 8 16 32 64 --train-steps 400 --train-batch 8 --n-boot 2000 --test-log $HERE/../results/test_log.jsonl"
# shellcheck disable=SC2086
medfusion evaluate $COMMON --augment none --augment drdm-random --drdm-t-range 10 16 --output fresh17_f100_a &
# shellcheck disable=SC2086
medfusion evaluate $COMMON --augment elastic --elastic-magnitude 2 4 --output fresh17_f100_b &
wait
