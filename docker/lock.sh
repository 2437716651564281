#!/usr/bin/env bash
# Regenerate the hashed, fully pinned requirement files the images install:
#   docker/api.lock.txt     from docker/requirements-api.txt (the API image: no torch)
#   docker/worker.lock.txt  from pyproject.toml's core + [serve] + [fp8], resolved against the torch
#                           of the worker's base image (WORKER_TORCH), which is left out of the file
#                           together with the CUDA wheels it brings (the base image has them), and
#                           with the torchao release built against that torch (TORCHAO_FOR_TORCH).
# Needs uv (pip install uv). Run from anywhere; commit both files with the Dockerfile change.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKER_TORCH="${WORKER_TORCH:-$(sed -nE 's|^FROM pytorch/pytorch:([0-9.]+)-.*|\1|p' docker/worker.Dockerfile | head -1)}"
TARGET=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)

uv pip compile docker/requirements-api.txt "${TARGET[@]}" --generate-hashes --quiet \
    --custom-compile-command "docker/lock.sh" -o docker/api.lock.txt

# torchao's C++ kernels are built against one torch release (torchao's compatibility table)
declare -A TORCHAO_FOR_TORCH=([2.9.0]=0.14.1 [2.9.1]=0.15.0)
TORCHAO="${TORCHAO:-${TORCHAO_FOR_TORCH[$WORKER_TORCH]:?no torchao release known for torch $WORKER_TORCH: set TORCHAO}}"
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
printf 'torch==%s\ntorchao==%s\n' "${WORKER_TORCH}" "${TORCHAO}" > "$pin"
# torch and what only the base image needs from it: the CUDA libraries and triton.
base_only=(torch triton $(uv pip compile pyproject.toml --extra serve "${TARGET[@]}" -c "$pin" --no-header --quiet \
    | sed -nE 's/^(nvidia-[a-z0-9-]+)==.*/\1/p'))
uv pip compile pyproject.toml --extra serve --extra fp8 "${TARGET[@]}" -c "$pin" --generate-hashes --quiet \
    "${base_only[@]/#/--no-emit-package=}" --custom-compile-command "docker/lock.sh (torch ${WORKER_TORCH} from the base image)" \
    -o docker/worker.lock.txt
echo "locked docker/api.lock.txt and docker/worker.lock.txt (worker torch ${WORKER_TORCH})"
