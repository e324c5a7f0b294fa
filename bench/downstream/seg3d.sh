#!/bin/bash
# The 3D few-shot segmentation yardstick (issue 19): built-in 3D phantoms at 64^3, 2 labelled volumes (10 % of 20).
# 1. the cohort (40 patients, standard protocol, dataset seed 11, 20 / 8 / 12);
# 2. the MONAI elastic magnitude chosen on the validation split (seed 0): (200, 400) or (400, 800), factors on
#    smoothed noise (~2 and ~4 voxels; the DRDM forward-process field is ~3.4 voxels at T' = 40-48);
# 3. the test split once, logged: none, elastic (the chosen magnitude), drdm-random, 3 seeds.
# No trained 3D DRDM arm: DRDM training in 3D is GPU work (see bench/results/downstream.md).
# ~75 min on one CPU thread. Run from a working folder: cd WORK && bash .../seg3d.sh
set -e
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
HERE="$(cd "$(dirname "$0")" && pwd)"
[ -f seg3d64/manifests/segment.json ] || medfusion make-data --output seg3d64 --patients 40 --dim 3 --size 64 \
  --depth 64 --protocols standard --seed 11 --split 0.5,0.2,0.3 --no-progress
COMMON="--task segment --manifest seg3d64/manifests/segment.json --fractions 0.1 --channels 8 16 32 64
  --roi-size 48 48 48 --train-batch 2 --train-steps 400 --n-boot 2000"
for M in "200 400" "400 800"; do
  OUT="val_seg3d_${M// /_}"
  [ -f "$OUT/summary.json" ] || medfusion evaluate $COMMON --split validation --seeds 0 --augment elastic \
    --elastic-magnitude $M --output "$OUT"
done
CHOSEN=$(python - <<'PY'
import json
scores = {m: json.load(open(f"val_seg3d_{m.replace(' ', '_')}/summary.json"))["results"][0]["dice"]["mean"]
          for m in ("200 400", "400 800")}
print(max(scores, key=scores.get))
PY
)
echo "elastic magnitude chosen on validation: $CHOSEN"
medfusion evaluate $COMMON --split test --seeds 0 1 2 --augment none --augment elastic --augment drdm-random \
  --elastic-magnitude $CHOSEN --output test_seg3d --test-log "$HERE/../results/test_log.jsonl"
