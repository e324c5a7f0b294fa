#!/bin/bash
# The demo's regression learning rate (configs/demo/cpu.yaml stage2.regression_lr), chosen on the demo's validation
# split (issue 18): `medfusion demo` is run once per candidate with everything else as shipped, and the validation
# PSNR over the body of the output the demo shows (the regression's posterior mean) is read from each
# metrics.json ("shown" -> "validation_psnr_body"). The demo's own test figures of these runs are not read.
# Run from a working folder: bash /path/to/bench/demo_regression_lr.sh  (~5 min per candidate on one CPU thread)
set -e
HERE="$(cd "$(dirname "$0")" && pwd)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
LRS=${LRS:-"1.0e-03 3.0e-03 1.0e-02"}
for lr in $LRS; do
  out="demo_lr_${lr}"
  if [ ! -f "$out/metrics.json" ]; then
    sed "s/^  regression_lr: .*/  regression_lr: ${lr}/" "$HERE/../configs/demo/cpu.yaml" > "budget_lr_${lr}.yaml"
    grep -q "regression_lr: ${lr}$" "budget_lr_${lr}.yaml"
    medfusion demo --output "$out" --budget "budget_lr_${lr}.yaml" --overwrite > "$out.log" 2>&1
  fi
done
python3 - $LRS <<'PY'
import json, sys
print("| regression_lr | validation PSNR body dB: raw input | DDPM sample | posterior mean (shown) |")
print("|---|---|---|---|")
for lr in sys.argv[1:]:
    v = json.load(open(f"demo_lr_{lr}/metrics.json"))["shown"]["validation_psnr_body"]
    print(f"| {lr} | {v['identity']:.2f} | {v['diffusion_ct']:.2f} | {v['diffusion_ct_mean']:.2f} |")
PY
