#!/bin/bash
# DiffusionCT in translate mode (unpaired SDEdit, Meng et al. 2022, on the latent of Selim et al.'s autoencoder)
# through `medfusion evaluate` on a fresh cohort (issue 18). Run from a folder that holds `runs/demo` (make demo):
# 1. The shipped configs/diffusion_ct/sim2d_stage2_translate.yaml on make demo's frozen stage 1, trained by
#    `medfusion fit` on the standard scans of make demo's training patients (no pairs), STEPS (default 3,000, the
#    config's) x 8 crops of 64^2, last checkpoint, no validation during fit.
# 2. FRESH$SEED: 48 new patients (seed 43, never used before), 12 training / 12 validation / 24 test
#    (bench/fresh_cohort/data.sh).
# 3. strength (0.1, 0.2, 0.3, 0.5) x decoding (latent: the paper's D(z_hat); residual: D(z_hat) + x - D(E(x)))
#    chosen on the validation split by mean PSNR over the body.
# 4. The test split once, logged: translate (the chosen setting) and make demo's conditional model (its shipped
#    options) against the raw input, the Gaussian and the linear filter (fitted on training + validation).
# ~35 min on one CPU thread.
set -e
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE="$(cd "$(dirname "$0")" && pwd)"
SEED=${SEED:-43} STEPS=${STEPS:-3000} DEMO=${DEMO:-runs/demo}
M=FRESH$SEED/manifests/standardize.json
[ -f "$M" ] || SEED=$SEED bash "$HERE/data.sh"
T=translate$SEED
if [ ! -f "$T/model/config.yaml" ]; then
  medfusion fit --config "$HERE/../../configs/diffusion_ct/sim2d_stage2_translate.yaml" \
    --model.init_args.autoencoder "$DEMO/models/stage1" --data.init_args.manifest "$DEMO/data/manifests/image.json" \
    --trainer.max_steps "$STEPS" --trainer.limit_val_batches 0 --trainer.enable_progress_bar false \
    --trainer.default_root_dir "$T" --trainer.logger false --trainer.callbacks.init_args.dirpath "$T/ckpt"
  medfusion export --ckpt "$T/ckpt/last.ckpt" --output "$T/model" --overwrite
fi
settings=()
for s in 0.1 0.2 0.3 0.5; do for d in latent residual; do settings+=(--model "$T/model@strength=$s,decode=$d"); done; done
[ -f ${T}_val/summary.json ] || medfusion evaluate --task standardize --manifest "$M" --split validation \
  "${settings[@]}" --seed 0 --n-boot 1000 --output ${T}_val
CHOSEN=$(T=$T python - <<'PY'
import json
import os
methods = json.load(open(f"{os.environ['T']}_val/summary.json"))["methods"]
scores = {k: v["metrics"]["psnr_body"]["mean"] for k, v in methods.items() if "strength=" in k}
print(max(scores, key=scores.get).split("@", 1)[1])
PY
)
echo "translate setting chosen on validation: $CHOSEN"
medfusion evaluate --task standardize --manifest "$M" --split test --model "$T/model@$CHOSEN" \
  --model "$DEMO/models/diffusion_ct@mean_only=false" --baseline identity --baseline gaussian --baseline linear-filter \
  --seed 0 --n-boot 2000 --output ${T}_test --test-log "$HERE/../results/test_log.jsonl"
