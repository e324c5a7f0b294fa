#!/usr/bin/env bash
# Every GPU measurement of medfusion in one device call (see bench/gpu/README.md). Runs from any folder; cds to
# the repo root. Each step has its own `timeout` guard (capped by what is left of BUDGET_S), writes ONE results
# file under $OUT as soon as it is measured, and a line in $OUT/summary.txt; a failed step does not stop the rest.
#
#   run(command="bash bench/gpu/run_all.sh", carry=[".gpu_wheels"], timeout_s=580)     # on the GPU machine
#   MEDFUSION_GPU_DRYRUN=1 OUT=/tmp/gpu_out bash bench/gpu/run_all.sh                   # here: CPU, tiny sizes
#
# Environment:
#   OUT                    results folder (the run tool sets it; default /tmp/gpu_out)
#   MEDFUSION_GPU_DRYRUN=1 CPU dry run with toy sizes (checks that every step runs end to end and writes its file)
#   BUDGET_S               wall seconds for all steps (default 540 on GPU, 420 in a dry run)
#   STEPS                  which steps, in order (default "i j g h": the open issues' steps, below):
#                          a train_step, b pytest -m gpu, c standardize timing (untrained model),
#                          d DRDM train + evaluate (bench/drdm.py), e restoration lowdose, f DiffusionCT bench;
#                          with .gpu_carry/demo and .gpu_carry/seg128 (prepare.sh, DEMO= SEG128=):
#                          g sampler sweep on make demo's model against DDPM-1000 (issue 22),
#                          h DRDM trained for what is left of the budget, model back as a tar (issue 19),
#                          i standardize timing of make demo's trained model (issues 18, 20),
#                          j loader headroom with 0 / 2 / 6 workers on the device host (issue 20)
#   DRDM_TRAIN_MIN         DRDM training time guard in minutes (default 2.0)
#   DCT_BATCH DCT_STEPS DCT_MIN DCT_WORKERS DCT_POOL   step f with a carried stage 1 (bench/gpu/README.md)
#   PY                     python (default python3 on GPU, .venv/bin/python in a dry run)
# Files in $OUT (the run tool returns at most 8: choose STEPS accordingly): summary.txt, log.txt, and per step
# a train_step.md, b pytest_gpu.txt, c standardize_timing.md, d drdm_gpu.md, e restoration_gpu.md,
# f diffusion_ct_gpu.md, g sampler_sweep_gpu.md, h drdm_long.md + drdm_long_model.tar.gz,
# i standardize_trained.md, j loader_headroom_gpu.md.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
DRY=${MEDFUSION_GPU_DRYRUN:-0}
START=$(date +%s)
if [ "$DRY" = 1 ]; then
    PY=${PY:-$ROOT/.venv/bin/python}
    BUDGET=${BUDGET_S:-420}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES=""
else
    PY=${PY:-python3}
    BUDGET=${BUDGET_S:-540}
fi
STEPS=${STEPS:-i j g h}
RESERVE=8 # seconds kept for the final summary
SUMMARY=$OUT/summary.txt
LOG=$OUT/log.txt
WORK=${TMPDIR:-/tmp}/medfusion_gpu_work
DEPS=$WORK/pydeps
rm -rf "$WORK"
mkdir -p "$WORK"
: >"$SUMMARY"
: >"$LOG"
export MPLBACKEND=Agg PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(($(date +%s) - START)); }

say "medfusion GPU run $(date -u +%FT%TZ); dry run: $DRY; budget ${BUDGET}s; steps: $STEPS; git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi >/dev/null 2>&1 && [ "$DRY" != 1 ]; then
    nvidia-smi 2>&1 | tee -a "$LOG"
    say "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv,noheader 2>&1)"
else
    say "gpu: none (nvidia-smi not run)"
fi

# ---- carried wheels -> throwaway target (offline: --no-index --no-deps) ----
shopt -s nullglob
wheels=("$ROOT"/.gpu_wheels/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    if [ -z "${MEDFUSION_GPU_NO_PIP:-}" ] && "$PY" -m pip install --quiet --disable-pip-version-check --no-index \
        --no-deps --target "$DEPS" "${wheels[@]}" >>"$LOG" 2>&1; then
        say "wheels: pip installed ${#wheels[@]} into $DEPS"
    elif "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
        "$DEPS" "${wheels[@]}" >>"$LOG" 2>&1; then # all carried wheels are pure python: unpacking = installing
        say "wheels: pip unavailable or failed; unpacked ${#wheels[@]} into $DEPS"
    else
        say "wheels: install FAILED (see log.txt)"
    fi
else
    say "wheels: none in .gpu_wheels/ (run bench/gpu/prepare.sh here and carry .gpu_wheels)"
fi
SIM=""
if [ "$DRY" = 1 ]; then
    # simulate the device image: packages it lacks and we do not carry cannot be imported
    SIM=$WORK/simimage
    mkdir -p "$SIM"
    cat >"$SIM/sitecustomize.py" <<'PYEOF'
import sys

_ABSENT = {"SimpleITK", "nilearn", "diffusers", "pylibjpeg", "openjpeg", "rle", "gdcm", "pydicom_data",
           "dcm2niix", "jpeg_ls", "importlinter", "grimp"}


class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the device image)", name=name)
        return None


sys.meta_path.insert(0, _Absent())
PYEOF
fi
export PYTHONPATH="${SIM:+$SIM:}$DEPS:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! timeout -k 5 120 "$PY" - >>"$SUMMARY" 2>>"$LOG" <<'PYEOF'; then
import importlib, sys
import torch
mods = {}
for m in ("numpy", "lightning", "monai", "nibabel", "pydicom", "scipy", "skimage", "safetensors", "einops", "yaml"):
    mod = importlib.import_module(m)
    mods[m] = f"{getattr(mod, '__version__', '?')}" + (" (carried)" if "pydeps" in (mod.__file__ or "") else "")
import medfusion.models.diffusion_ct, medfusion.models.drdm, medfusion.models.rddm, medfusion.apps.demo  # noqa
cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (cuda {torch.version.cuda}); "
      + "; ".join(f"{k} {v}" for k, v in mods.items()))
print("device: " + (f"{torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, "
                    f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs" if cuda else "CPU"))
PYEOF
    say "imports: FAILED (see the end of log.txt); stopping"
    tail -30 "$LOG"
    exit 2
fi
if [ "$DRY" != 1 ] && ! timeout -k 5 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "CUDA not available: stopping (nothing would be a GPU figure)"
    exit 2
fi
say "setup done at $(elapsed)s"

# ---- one step: name, guard seconds, results file, command... ----
step() {
    local name=$1 guard=$2 file=$3
    shift 3
    local left=$((BUDGET - $(elapsed) - RESERVE))
    if [ "$left" -lt 15 ]; then
        say "$name: SKIPPED (budget spent) -> $(basename "$file")"
        printf '%s: skipped, the %ss budget was spent before it started\n' "$name" "$BUDGET" >"$file.tmp" && mv "$file.tmp" "$file"
        return 0
    fi
    [ "$guard" -gt "$left" ] && guard=$left
    echo "===== $name (guard ${guard}s, at $(elapsed)s) =====" | tee -a "$LOG"
    local t0 mark rc status
    t0=$(date +%s)
    mark=$(wc -l <"$LOG")
    timeout -k 10 "$guard" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAILED rc=$rc" ;;
    esac
    if [ ! -s "$file" ]; then # the step wrote nothing: keep its last log lines as its result
        { echo "$name: $status after $(($(date +%s) - t0))s (guard ${guard}s); last log lines:"; echo; tail -n +"$((mark + 1))" "$LOG" | tail -60; } >"$file"
    fi
    say "$name: $status $(($(date +%s) - t0))s (guard ${guard}s) -> $(basename "$file")"
    return 0
}

# ---- the steps (priority order) ----
step_a() { # issue 4 goal: ours vs MONAI default, 2D 256² b8 and 3D 64³ b4
    if [ "$DRY" = 1 ]; then
        step "a train_step" 120 "$OUT/train_step.md" "$PY" bench/train_step.py --small --warmup 1 --steps 2 --out "$OUT/train_step.md" --overwrite
    else
        step "a train_step" 150 "$OUT/train_step.md" "$PY" bench/train_step.py --warmup 3 --steps 10 --out "$OUT/train_step.md" --overwrite
    fi
}
step_b() { # tests marked gpu (the whole tree is collected: also checks every test module imports on the image)
    step "b pytest -m gpu" 120 "$OUT/pytest_gpu.txt" \
        bash -c "\"$PY\" -m pytest -m gpu -q -rs -p no:cacheprovider tests > \"$OUT/pytest_gpu.txt.part\" 2>&1; rc=\$?; cat \"$OUT/pytest_gpu.txt.part\"; mv \"$OUT/pytest_gpu.txt.part\" \"$OUT/pytest_gpu.txt\"; exit \$rc"
}
step_c() { # DiffusionCT standardize: per 512² slice and per 512² x 300 volume
    if [ "$DRY" = 1 ]; then
        step "c standardize timing" 90 "$OUT/standardize_timing.md" "$PY" bench/gpu/standardize_timing.py --small --out "$OUT/standardize_timing.md"
    else
        step "c standardize timing" 120 "$OUT/standardize_timing.md" "$PY" bench/gpu/standardize_timing.py --out "$OUT/standardize_timing.md"
    fi
}
step_d() { # DRDM: train at 128² under a time guard, then evaluate the last checkpoint
    local size batch minutes steps dev save=$WORK/drdm_train file=$OUT/drdm_gpu.md
    if [ "$DRY" = 1 ]; then
        size=32 batch=4 minutes=0.5 steps=30 dev=cpu
    else
        size=128 batch=16 minutes=${DRDM_TRAIN_MIN:-2.0} steps=1000000 dev=cuda
    fi
    # the training guard must outlast bench/drdm.py's own time stop (+60 s to save), and what is left must still
    # hold the evaluation (~90 s): shorten --train-minutes to fit (session 7: an 85 s guard killed a 2-min run)
    local left=$((BUDGET - $(elapsed) - RESERVE - 90))
    minutes=$(awk -v m="$minutes" -v l="$left" 'BEGIN{x = (l - 60) / 60; if (x < m) m = x; if (m < 0.25) m = 0.25; printf "%.2f", m}')
    local guard=$(awk -v m="$minutes" 'BEGIN{printf "%d", m * 60 + 60}')
    step "d1 DRDM train" "$guard" "$WORK/drdm_train.txt" bash -c \
        "\"$PY\" bench/drdm.py --train-steps $steps --train-minutes $minutes --size $size --batch $batch --device $dev --save \"$save\" | tee \"$WORK/drdm_train.txt.part\"; rc=\${PIPESTATUS[0]}; mv \"$WORK/drdm_train.txt.part\" \"$WORK/drdm_train.txt\"; exit \$rc"
    local ckpts=("$save"/step_*.pt) # nullglob: empty when training wrote nothing; names are zero-padded
    local ckpt=""
    [ ${#ckpts[@]} -gt 0 ] && ckpt=${ckpts[${#ckpts[@]} - 1]}
    {
        echo "# DRDM trained on the GPU ($([ "$DRY" = 1 ] && echo 'DRY RUN, CPU, toy sizes' || echo "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"))"
        echo
        echo "Training: \`python3 bench/drdm.py --train-steps $steps --train-minutes $minutes --size $size --batch $batch --device $dev --save $save\`"
        echo "(built-in 2D phantom slices ${size}², Adam lr 5e-4, batch $batch; stops at the time guard)."
        echo
        echo '```'
        grep -E "^(step |\{'steps')" "$WORK/drdm_train.txt" 2>/dev/null | tail -25
        echo '```'
        echo
    } >"$file.head"
    if [ -n "$ckpt" ]; then
        echo "Evaluation: \`python3 bench/drdm.py --evaluate $ckpt --size $size --device $dev\`" >>"$file.head"
        echo >>"$file.head"
        rm -f "$WORK/drdm_eval.md"
        step "d2 DRDM evaluate" 150 "$WORK/drdm_eval.md" "$PY" bench/drdm.py --evaluate "$ckpt" --size "$size" --device "$dev" --out "$WORK/drdm_eval.md"
        cat "$file.head" "$WORK/drdm_eval.md" >"$file.tmp"
    else
        say "d2 DRDM evaluate: SKIPPED (no checkpoint)"
        { cat "$file.head"; echo "No checkpoint was written: training failed or was skipped (see summary.txt, log.txt)."; } >"$file.tmp"
    fi
    mv "$file.tmp" "$file"
    rm -f "$file.head"
}
step_e() { # restoration head-to-head, low-dose task, on the GPU; step budgets x2 when the time allows
    local left=$((BUDGET - $(elapsed) - RESERVE)) k=1
    if [ "$DRY" = 1 ]; then
        step "e restoration lowdose" 200 "$OUT/restoration_gpu.md" "$PY" bench/restoration.py --task lowdose \
            --patients 6 --size 32 --crop 16 --batch 2 --rddm-steps 4 --unet-steps 4 --s1-steps 4 --s2-steps 6 \
            --device cpu --out "$WORK/restore" --results "$OUT/restoration_gpu.md"
        return
    fi
    [ "$left" -ge 600 ] && k=2 # H200: RDDM trains at ~12 steps/s, the x1 budgets take ~5 min (session 7)
    say "e restoration: step budgets x$k (1200/1200/800/800 x $k), $left s left"
    step "e restoration lowdose" 400 "$OUT/restoration_gpu.md" "$PY" bench/restoration.py --task lowdose \
        --rddm-steps $((1200 * k)) --unet-steps $((1200 * k)) --s1-steps $((800 * k)) --s2-steps $((800 * k)) \
        --device cuda --out "$WORK/restore" --results "$OUT/restoration_gpu.md"
}

step_f() { # DiffusionCT 12-patient table: shortcut stage 1, stage 2 with the regression U-Net on the image grid (session 5; regression_lr 1e-3 from session 6)
    local dct_model=(--latent-channels 16 --ae-skip-from 2 --ae-shortcuts --modes conditional
        --regression --regression-channels 32 64 128 --regression-lr 1e-3 --pixel-shuffle 2 --dm-channels 32 64 128 --dm-attention 0 0 1
        --results "$OUT/diffusion_ct_gpu.md")
    if [ "$DRY" = 1 ]; then
        step "f DiffusionCT bench" 300 "$OUT/diffusion_ct_gpu.md" "$PY" bench/diffusion_ct.py --out "$WORK/dct" \
            --size 32 --crop 32 --ae-steps 3 --dm-steps 3 --unet-steps 3 \
            "${dct_model[@]}" --skip-ddpm1000
        return
    fi
    if [ -d "$ROOT/.gpu_carry/dct/stage1" ]; then
        # a CPU bench's data + stage 1 + supervised U-Net travelled in .gpu_carry/dct (session 7): only stage 2 is
        # trained here, with 4x the batch and more steps than the CPU run; the sampler sweep includes DDPM 1000
        mkdir -p "$WORK/dct"
        cp -r "$ROOT/.gpu_carry/dct/." "$WORK/dct/"
        rm -rf "$WORK/dct/stage2_conditional"
        # DCT_POOL=320: train stage 2 and the U-Net on the pool (bench --train-pool; generated here, ~2.5 min on one core)
        local guard=330
        [ -n "${DCT_POOL:-}" ] && rm -f "$WORK/dct/unet.safetensors" && guard=510
        step "f DiffusionCT bench (carried stage 1)" "$guard" "$OUT/diffusion_ct_gpu.md" "$PY" bench/diffusion_ct.py --out "$WORK/dct" \
            --reuse --size 128 --crop 64 --ae-channels 32 64 64 --dm-batch "${DCT_BATCH:-32}" --dm-steps "${DCT_STEPS:-6000}" --workers "${DCT_WORKERS:-6}" ${DCT_POOL:+--train-pool "$DCT_POOL"} \
            --minutes "${DCT_MIN:-3.5}" "${dct_model[@]}"
        return
    fi
    # steps far beyond what the guard allows: each model stops at --minutes (the table states the steps reached)
    step "f DiffusionCT bench" 330 "$OUT/diffusion_ct_gpu.md" "$PY" bench/diffusion_ct.py --out "$WORK/dct" \
        --minutes 1.1 --ae-steps 30000 --dm-steps 100000 --unet-steps 30000 \
        "${dct_model[@]}" --skip-ddpm1000
}

CARRY=$ROOT/.gpu_carry
need_carry() { # STEP-NAME FOLDER: say why a step cannot run without its carried folder
    [ -d "$CARRY/$2" ] && return 0
    say "$1: SKIPPED (.gpu_carry/$2 missing: run bench/gpu/prepare.sh with DEMO= / SEG128= here first)"
    return 1
}
step_g() { # issue 22: every sampler on make demo's trained DiffusionCT, DDPM-1000 the reference (validation split)
    need_carry "g sampler sweep" demo || return 0
    local extra=()
    [ "$DRY" = 1 ] && extra=(--only "dpmpp_2m_num_steps5$" --samples 1 --ems-batches 1 --ems-grid 4)
    step "g sampler sweep" 240 "$OUT/sampler_sweep_gpu.md" "$PY" bench/sampler_sweep.py \
        --model "$CARRY/demo/models/diffusion_ct" --manifest "$CARRY/demo/data/manifests/standardize.json" \
        --split validation --out "$WORK/sweep" --results "$OUT/sampler_sweep_gpu.md" "${extra[@]}"
}
step_h() { # issue 19: DRDM (configs/drdm/builtin2d.yaml) on the downstream cohort for what is left, exported
    need_carry "h DRDM long" seg128 || return 0
    local left=$((BUDGET - $(elapsed) - RESERVE - 45)) batch=16 dev=gpu file=$OUT/drdm_long.md
    [ "$DRY" = 1 ] && batch=2 dev=cpu && left=$((left < 40 ? left : 40))
    [ "$left" -lt 30 ] && { say "h DRDM long: SKIPPED (only ${left}s left)"; return 0; }
    local hms
    hms=$(printf '00:00:%02d:%02d' $((left / 60)) $((left % 60)))
    step "h DRDM long" $((left + 40)) "$WORK/drdm_long_fit.txt" bash -c "cd \"$WORK\" && \"$PY\" -m medfusion.cli fit \
        --config \"$ROOT/configs/drdm/builtin2d.yaml\" --data.init_args.manifest \"$CARRY/seg128/manifests/segment.json\" \
        --data.init_args.batch_size $batch --data.init_args.cache memory --data.init_args.num_workers 4 \
        --trainer.accelerator $dev --trainer.max_steps 100000 --trainer.max_time $hms \
        --trainer.check_val_every_n_epoch 100000 --trainer.default_root_dir drdm_long --trainer.enable_progress_bar false \
        > drdm_long_fit.txt 2>&1"
    local ckpt
    ckpt=$(find "$WORK/drdm_long" -name last.ckpt | head -1)
    if [ -n "$ckpt" ] && "$PY" -m medfusion.cli export --ckpt "$ckpt" --output "$WORK/drdm_long_model" --overwrite >>"$LOG" 2>&1; then
        tar -czf "$OUT/drdm_long_model.tar.gz" -C "$WORK" drdm_long_model
        local steps
        steps=$("$PY" -c "import torch, sys; print(torch.load(sys.argv[1], map_location='cpu', weights_only=True)['global_step'])" "$ckpt" 2>>"$LOG")
        { echo "# DRDM trained on the device for the budget left ($left s, batch $batch, $dev): $steps steps"
          echo; echo "configs/drdm/builtin2d.yaml on .gpu_carry/seg128 (bench/downstream/data.sh's cohort); model in"
          echo "drdm_long_model.tar.gz: unpack it next to seg128 and run bench/downstream/val_drdm.sh with it (issue 19)."
          echo; echo '```'; grep -v "^\s*$" "$WORK/drdm_long_fit.txt" | tail -15; echo '```'; } >"$file"
        say "h DRDM long: $steps steps -> drdm_long_model.tar.gz"
    else
        { echo "h DRDM long: no checkpoint / export failed"; tail -40 "$WORK/drdm_long_fit.txt" 2>/dev/null; } >"$file"
        say "h DRDM long: FAILED (no checkpoint or export)"
    fi
}
step_i() { # issues 18 and 20: the README model's time per 512² slice and per 512² x 300 volume
    need_carry "i trained timing" demo || return 0
    local extra=()
    [ "$DRY" = 1 ] && extra=(--size 64 --depth 4 --batch-sizes 2 --repeats 1)
    step "i trained timing" 120 "$OUT/standardize_trained.md" "$PY" bench/gpu/standardize_timing.py \
        --model "$CARRY/demo/models/diffusion_ct" --out "$OUT/standardize_trained.md" "${extra[@]}"
}
step_j() { # issue 20: the training loader's samples/s with 0 / 2 / 6 workers on the device host's cores
    need_carry "j loader headroom" demo || return 0
    local workers=(0 2 6) batches=20
    [ "$DRY" = 1 ] && workers=(0) batches=2
    step "j loader headroom" 150 "$OUT/loader_headroom_gpu.md" "$PY" bench/loader_headroom.py \
        --data "$CARRY/demo/data" --batches $batches --workers "${workers[@]}" --results "$OUT/loader_headroom_gpu.md"
}

for s in $STEPS; do
    case $s in
        a | b | c | d | e | f | g | h | i | j) "step_$s" ;;
        *) say "unknown step '$s' (valid: a to j)" ;;
    esac
done
rm -f "$OUT"/*.part "$OUT"/*.tmp
say "done at $(elapsed)s; files: $(cd "$OUT" && ls | tr '\n' ' ')"

# the run tool shows the last 12,000 characters: end with the headline figures
echo
echo "=================== headline ==================="
for f in train_step.md standardize_timing.md standardize_trained.md loader_headroom_gpu.md sampler_sweep_gpu.md diffusion_ct_gpu.md; do
    [ -s "$OUT/$f" ] && { echo "--- $f"; grep -E "^\||faster|^Device" "$OUT/$f" | head -30; }
done
[ -s "$OUT/pytest_gpu.txt" ] && { echo "--- pytest_gpu.txt"; tail -5 "$OUT/pytest_gpu.txt"; }
[ -s "$OUT/drdm_gpu.md" ] && { echo "--- drdm_gpu.md"; grep -E "^\{'steps'|^\| (random|DRDM)" "$OUT/drdm_gpu.md" | head -12; }
[ -s "$OUT/restoration_gpu.md" ] && { echo "--- restoration_gpu.md"; grep -E "^\| " "$OUT/restoration_gpu.md" | head -20; }
[ -s "$OUT/drdm_long.md" ] && { echo "--- drdm_long.md"; head -3 "$OUT/drdm_long.md"; }
echo "--- summary.txt"
cat "$SUMMARY"
