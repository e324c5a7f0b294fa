#!/bin/bash
# The samplers chosen on the demo's validation split (bench/sampler_sweep.py --split validation), scored once on the
# FRESH23 test split with make demo's model, logged to bench/results/test_log.jsonl; today's default (DPM-Solver++
# 10 steps) beside them. CHOICE: a regular expression on setting names (sampler_sweep.py --only), e.g.
#   STATS_MODEL=sweep_val/model_with_stats CHOICE='samplerplms_num_steps5$|samplerdpmpp_2m_num_steps10$' bash bench/fresh_cohort/sampler_test.sh
# Run from the folder that holds runs/demo and FRESH23 (bench/fresh_cohort/data.sh). DDPM-1000 is not run on the
# test split (on a CPU it costs hours); the test compares the chosen settings with the default and the raw input.
set -e
HERE="$(cd "$(dirname "$0")" && pwd)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -f FRESH23/manifests/standardize.json ] || bash "$HERE/data.sh"
python "$HERE/../sampler_sweep.py" --model runs/demo/models/diffusion_ct \
  --manifest FRESH23/manifests/standardize.json --split test --samples ${SAMPLES:-1} --out fresh23_samplers \
  --stats-model "${STATS_MODEL:?set STATS_MODEL: OUT/model_with_stats of the validation sweep}" --only "${CHOICE:?set CHOICE}" --results fresh23_samplers/table.md \
  --test-log "$HERE/../results/test_log.jsonl"
