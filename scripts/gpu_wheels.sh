#!/usr/bin/env bash
# Build the wheel bundle that scripts/gpu_check.sh installs on a GPU machine that reaches no
# package registry (the device machine of this workplace: python3 there already has torch, Triton,
# numpy, safetensors, tokenizers, huggingface_hub, einops, pyyaml, psutil, tensorboard).
#
#   bash scripts/gpu_wheels.sh [DIR]      # default DIR: runs/gpu_wheels (git-ignored via runs/)
#
# Run it here (with PyPI), then carry DIR to the GPU machine. Versions come from
# requirements/lock.txt (mamba-ssm from the Makefile's pin). What it holds and why:
#   megatron-core                   the model; not on the GPU image
#   mamba-ssm                       a pure-Python wheel built here without its CUDA extension
#                                   (MAMBA_SKIP_CUDA_BUILD): only its Triton kernels are used
#   transformers                    the pinned version (the image's is older) for the HF checks
#   nvidia-modelopt + pydantic, pydantic_core, annotated-types, typing-inspection,
#   typing_extensions, PuLP, omegaconf
#                                   the ModelOpt importance backend (it also needs Transformer
#                                   Engine, which has no wheel for the image: see gpu_check.sh)
# Size: ~38 MB (PuLP alone is 16 MB); the device tool carries at most 64 MiB with the tree.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$ROOT/runs/gpu_wheels}
PY=${PYTHON:-$ROOT/.venv/bin/python}
LOCK=$ROOT/requirements/lock.txt
pin() { grep -i -m1 "^$1==" "$LOCK" || { echo "gpu_wheels: $1 is not pinned in $LOCK" >&2; exit 1; }; }
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
pins=()
for name in megatron-core nvidia-modelopt transformers pydantic pydantic_core annotated-types \
    typing-inspection typing_extensions PuLP omegaconf; do
  pins+=("$(pin "$name")")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${platforms[@]}" -d "$DIR" "${pins[@]}"
mamba=$(grep -o 'mamba-ssm==[^ ]*' "$ROOT/Makefile" | head -1)
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "$PY" -m pip wheel -q --disable-pip-version-check \
  --no-deps --no-build-isolation -w "$DIR" "$mamba"
ls -l "$DIR"
du -sh "$DIR"
