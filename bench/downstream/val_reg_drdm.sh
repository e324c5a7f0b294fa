#!/bin/bash
# T' of trained-DRDM pairs chosen on registration itself (session 15), on the validation split: VoxelMorph trained
# on synthetic pairs only, the settings of test_reg.sh (seeds 0 1, 4 pairs per image, 200 steps), one arm per
# exported model in MODELS, the recovery started from T' in [T0, T1]; with REFERENCE=1 the B-spline and
# forward-process arms (at the same T') are trained beside them. Output: OUT/. Run from the folder that holds seg128/.
set -e
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
: "${MODELS:?set MODELS to the exported DRDM folders}" "${T0:?}" "${T1:?}" "${OUT:?}"
ARMS=()
[ -n "$REFERENCE" ] && ARMS+=(--augment bspline --augment drdm-random)
for m in $MODELS; do ARMS+=(--augment "drdm:$m"); done
medfusion evaluate --task register --manifest seg128/manifests/register.json --split validation --seeds 0 1 \
  --copies 4 --train-steps 200 --train-batch 8 --channels 16 32 32 32 --n-boot 1000 --overwrite \
  --drdm-t-range "$T0" "$T1" "${ARMS[@]}" --output "$OUT"
