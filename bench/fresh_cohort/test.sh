#!/bin/bash
# The one evaluation of the FRESH23 test split (24 patients x 5 protocols) for one DiffusionCT model, logged to
# bench/results/test_log.jsonl: its sample and its regression's posterior mean against identity, Gaussian, the
# per-protocol linear filter, the equal-budget supervised restorer and its noise-matched version.
# Default: make demo's model (runs/demo) and sup_equal -> fresh23_test. The long CPU budget:
#   DEMO=runs/demo_long SUP=sup_long OUT=fresh23_long_test bash bench/fresh_cohort/test.sh
set -e
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEMO=${DEMO:-runs/demo} SUP=${SUP:-sup_equal} OUT=${OUT:-fresh23_test}
medfusion evaluate --task standardize --manifest FRESH23/manifests/standardize.json --split test \
  --model "$DEMO/models/diffusion_ct@mean_only=false" --model "$DEMO/models/diffusion_ct@mean_only=true" \
  --baseline identity --baseline gaussian --baseline linear-filter \
  --baseline "supervised:$SUP/model" --baseline "noise-matched:$SUP/model" \
  --seed 0 --samples 1 --n-boot 2000 --output "$OUT" \
  --test-log "$(dirname "$0")/../results/test_log.jsonl"
