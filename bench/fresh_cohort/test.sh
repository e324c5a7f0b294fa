#!/bin/bash
# The one evaluation of the FRESH23 test split (24 patients x 5 protocols), logged to bench/results/test_log.jsonl:
# make demo's DiffusionCT (its sample and its regression's posterior mean) against identity, Gaussian, the
# per-protocol linear filter, the equal-budget supervised restorer and its noise-matched version.
set -e
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
medfusion evaluate --task standardize --manifest FRESH23/manifests/standardize.json --split test \
  --model runs/demo/models/diffusion_ct --model runs/demo/models/diffusion_ct@mean_only=true \
  --baseline identity --baseline gaussian --baseline linear-filter \
  --baseline supervised:sup_equal/model --baseline noise-matched:sup_equal/model \
  --seed 0 --samples 1 --n-boot 2000 --output fresh23_test \
  --test-log "$(dirname "$0")/../results/test_log.jsonl"
