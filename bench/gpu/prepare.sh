#!/usr/bin/env bash
# Download (here, on the CPU machine that reaches PyPI) the wheels that the device image lacks, into .gpu_wheels/
# (git-ignored; carried to the GPU machine with run(..., carry=[".gpu_wheels"])). See bench/gpu/README.md.
#
# The device image (python3 = /opt/torch/.venv/bin/python3, Python 3.12, x86_64) already holds torch, lightning,
# numpy, scipy, scikit-image, safetensors, einops, rich, matplotlib, PyYAML, pytest (+ pytest-timeout), packaging,
# typing-extensions. It lacks:
#   monai, nibabel, pydicom          imported by medfusion, the bench scripts and the tests (module level)
#   jsonargparse, docstring-parser,  only for `medfusion fit/validate/...` (LightningCLI with signatures); small,
#   typeshed-client                  carried so that a config can be trained there too
# Left out on purpose: SimpleITK (~50 MB wheel; imported lazily in medfusion/io/displacement.py and inside test
# functions only: nothing run_all.sh runs needs it), nilearn (restoration --task sr only), pydicom-data, pylibjpeg*,
# python-gdcm (compressed DICOM only), diffusers (tests that compare samplers; skipped when missing).
# Versions: the ones installed in .venv (so the GPU run uses exactly what was tested here).
#
#     bash bench/gpu/prepare.sh            # -> .gpu_wheels/*.whl, prints the total size
#     bash bench/gpu/prepare.sh BENCH_DIR  # also -> .gpu_carry/dct: data, stage 1, U-Net of a finished CPU run of
#                                          #    bench/diffusion_ct.py --out BENCH_DIR (step f then trains only
#                                          #    stage 2 on the card); carry it too: carry=[".gpu_wheels", ".gpu_carry"]
#     DEMO=runs/demo SEG128=WORK/seg128 bash bench/gpu/prepare.sh
#                                          # the open issues' steps g-j: make demo's model + data -> .gpu_carry/demo
#                                          #    (~33 MB), bench/downstream/data.sh's cohort -> .gpu_carry/seg128 (~13 MB)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DEST=.gpu_wheels
PKGS=(monai nibabel pydicom jsonargparse docstring-parser typeshed-client)

pins=()
for p in "${PKGS[@]}"; do
    v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")
    pins+=("$p==$v")
done
rm -rf "$DEST"
mkdir -p "$DEST"
echo "downloading: ${pins[*]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    "${pins[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

# every wheel must install on CPython 3.12 x86_64 (pure python or cp312/abi3 manylinux)
bad=0
for w in "$DEST"/*.whl; do
    tags=${w##*/}
    tags=${tags%.whl}
    IFS=- read -r -a parts <<<"$tags"
    n=${#parts[@]}
    py=${parts[n - 3]} abi=${parts[n - 2]} plat=${parts[n - 1]}
    case "$py/$abi/$plat" in
        *py3*/none/any | *cp312*/cp312/*x86_64* | *cp3*/abi3/*x86_64*) echo "  ok  ${w##*/}" ;;
        *) echo "  BAD tag (not Python 3.12 x86_64): ${w##*/}"; bad=1 ;;
    esac
done
[ "$bad" = 0 ] || { echo "prepare.sh: incompatible wheel(s) above" >&2; exit 1; }
if [ $# -ge 1 ]; then
    src=$1
    for f in data stage1 unet.safetensors results.json; do
        [ -e "$src/$f" ] || { echo "prepare.sh: $src/$f missing (not a finished bench/diffusion_ct.py --out folder)" >&2; exit 1; }
    done
    rm -rf .gpu_carry/dct
    mkdir -p .gpu_carry/dct
    cp -r "$src/data" "$src/stage1" "$src/unet.safetensors" "$src/results.json" .gpu_carry/dct/
    echo "carried bench models: $(du -sh .gpu_carry | cut -f1) in .gpu_carry/dct (from $src)"
fi
# the open issues' steps g-j (run_all.sh): make demo's model and data, the downstream cohort (seg128)
if [ -n "${DEMO:-}" ]; then
    for f in models/diffusion_ct/config.yaml data/manifests/standardize.json; do
        [ -e "$DEMO/$f" ] || { echo "prepare.sh: $DEMO/$f missing (DEMO= a finished make demo folder)" >&2; exit 1; }
    done
    rm -rf .gpu_carry/demo
    mkdir -p .gpu_carry/demo/models
    cp -r "$DEMO/models/diffusion_ct" .gpu_carry/demo/models/
    cp -r "$DEMO/data" .gpu_carry/demo/
    echo "carried make demo's model and data: $(du -sh .gpu_carry/demo | cut -f1)"
fi
if [ -n "${SEG128:-}" ]; then
    [ -e "$SEG128/manifests/segment.json" ] || { echo "prepare.sh: $SEG128 is not bench/downstream/data.sh's cohort" >&2; exit 1; }
    rm -rf .gpu_carry/seg128
    mkdir -p .gpu_carry
    cp -r "$SEG128" .gpu_carry/seg128
    echo "carried the downstream cohort: $(du -sh .gpu_carry/seg128 | cut -f1)"
fi
count=$(ls "$DEST"/*.whl | wc -l)
[ "$count" = "${#PKGS[@]}" ] || { echo "prepare.sh: expected ${#PKGS[@]} wheels, got $count" >&2; exit 1; }
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $count wheels, $((total / 1024)) KiB ($(awk -v b="$total" 'BEGIN{printf "%.1f", b/1048576}') MiB) in $DEST/"
# the whole travelling tree must stay under 64 MiB: warn early
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carry=0
[ -d .gpu_carry ] && carry=$(du -sb .gpu_carry | cut -f1)
echo "working tree that travels (tracked + untracked-not-ignored): $((tree / 1048576)) MiB; with wheels and .gpu_carry: $(((tree + total + carry) / 1048576)) MiB (limit 64)"
