#!/usr/bin/env bash
# On a machine with a network: download the wheels that benchmarks/gpu_check.sh installs on an air-gapped
# GPU node (Python 3.12, manylinux x86_64), into DIR (default ./gpu_wheels, which git ignores):
#
#   bash benchmarks/gpu_wheels.sh [DIR]                     # here, with a network
#   bash benchmarks/gpu_check.sh --quick --wheels DIR OUT   # there: pip install --no-index --find-links DIR
#
# What it fetches, each wheel named (--no-deps), so that nothing the GPU image already has (torch,
# triton: gigabytes) comes along:
#   - the peers, at the `bench` extra's versions in pyproject.toml: trl, cut-cross-entropy, liger-kernel;
#   - what they need that the image lacks (it has torch, triton, transformers, accelerate, numpy, pandas,
#     pyarrow, psutil, pyyaml, jinja2, huggingface-hub, fsspec, xxhash, tqdm: docs/benchmarks.md):
#     datasets (trl imports it; 5.2 wants pyarrow >= 24, fsspec <= 2026.9.0, huggingface-hub >= 1.31),
#     and datasets' dill and multiprocess.
# About 2 MB in all, far under the 64 MiB that travels with the source tree to the GPU machine.
set -euo pipefail

DIR="${1:-gpu_wheels}"
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

# The bench extra's requirements, without their markers (the download is for Linux).
mapfile -t PEERS < <("$PYTHON" -c 'import tomllib
for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]:
    print(r.split(";")[0].strip())')
MISSING=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$DIR" "${PEERS[@]}" "${MISSING[@]}"
echo "gpu_wheels: $(find "$DIR" -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
