#!/usr/bin/env bash
# A brain-extraction training run on the lent GPU machine, as one command (Docs/training.md,
# "On a GPU"). That machine has PyTorch, NumPy, SciPy and safetensors but not MONAI, SimpleITK
# or nilearn, reaches no registry, and takes 64 MiB of files along. So, here first:
#
#   bash tools/gpu_train.sh prepare
#
# writes MONAI's wheel to .whl/ and the label maps to runs/gpu/sources-brain-extraction.npz
# (`deepmri train sources`: ~33 MB, read there with NumPy alone), both git-ignored. Then, through
# the device tool, with carry [".whl", "runs/gpu"] and a timeout that leaves room to rerun:
#
#   bash tools/gpu_train.sh run
#
# continues the shipped model on the GPU (`--device cuda`, the images made by WORKERS CPU
# processes) and leaves the run folder (checkpoint.pt, best.pt, history.json) and train.log in
# $OUT. Back here: `deepmri train segment ... --export-only` or deepmri.train.segment.export,
# then the selection rule in Docs/training.md. Settings come from the environment: ITERATIONS,
# MINUTES (wall-clock stop), LR, WARMUP, SEED, WORKERS, BIAS_MAX, MNI152_HEAD_SHARE (0.5, as
# brain-extraction 1.8.0 was trained), DEVICE, PYTHON, INIT (the model folder to continue:
# brain-extraction, the 2 mm network, by default; brain-extraction-fine is the 1.5 mm one) and
# SPACING (the grid in mm; empty: the recipe's 2 mm, or give INIT's own grid, e.g. 1.5).
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCES=runs/gpu/sources-brain-extraction.npz
MONAI_VERSION=1.6.1

case "${1:-}" in
prepare)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "monai==$MONAI_VERSION"
    .venv/bin/deepmri train sources --model brain-extraction --out "$SOURCES" --cache runs/cache
    du -sh .whl "$SOURCES"
    ;;
run)
    PYTHON=${PYTHON:-python3}
    OUT=${OUT:?OUT is the folder the device tool brings back}
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/DeepMRI${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
    INIT=${INIT:-DeepMRI/Resources/Models/brain-extraction}
    "$PYTHON" -m deepmri train segment --model brain-extraction --out "$OUT/run" \
        --sources "$SOURCES" --init-from "$INIT" ${SPACING:+--spacing "$SPACING"} \
        --iterations "${ITERATIONS:-10000}" --minutes "${MINUTES:-7}" --lr "${LR:-2e-4}" \
        --warmup "${WARMUP:-100}" --validation-size 24 --validate-every 1000 \
        --bias-max "${BIAS_MAX:-1.0}" --mni152-head-share "${MNI152_HEAD_SHARE:-0.5}" --seed "${SEED:-40}" --device "${DEVICE:-cuda}" \
        --threads 2 --workers "${WORKERS:-14}" 2>&1 | tee "$OUT/train.log"
    ;;
*)
    echo "usage: bash tools/gpu_train.sh prepare|run" >&2
    exit 2
    ;;
esac
