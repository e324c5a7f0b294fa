#!/bin/bash
# Validation of longer-trained DRDM models (train_drdm.sh with EVERY=, session 15): few-shot segmentation at 5 %
# labelled, seeds 0 1, the 15 validation patients, one arm per exported model in MODELS (folders), the recovery
# started from T' in [T0, T1]; the settings of val_drdm.sh otherwise (reference arms: val_drdm_reference.sh).
# Output: OUT/ (report.md, summary.json, cases.csv). Run from the folder that holds seg128/.
set -e
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
: "${MODELS:?set MODELS to the exported DRDM folders}" "${T0:?}" "${T1:?}" "${OUT:?}"
ARMS=()
for m in $MODELS; do ARMS+=(--augment "drdm:$m"); done
medfusion evaluate --task segment --manifest seg128/manifests/segment.json --split validation --fractions 0.05 \
  --seeds 0 1 --channels 8 16 32 64 --train-steps 400 --train-batch 8 --n-boot 1000 --overwrite \
  --drdm-t-range "$T0" "$T1" ${STEPS_RECOVERY:+--drdm-steps "$STEPS_RECOVERY"} "${ARMS[@]}" --output "$OUT"
