#!/usr/bin/env bash
# Builds fluxfit with CUDA, using the toolchain tools/cuda/setup.sh installs.
#
#     tools/cuda/build.sh --check [CAP]              # cargo clippy --features cuda (-D warnings), kernels compiled
#     tools/cuda/build.sh --check --no-kernels [CAP] # the same without compiling candle's kernels
#                                                    # (what CI runs: see nvcc-no-kernels)
#     tools/cuda/build.sh 90 [86 89 …]               # stripped release binaries, one per capability
#
# A binary lands in dist/cuda-smCAP/fluxfit (90: H100/H200, 89: RTX 40xx/L4, 86: RTX 30xx,
# 80: A100), and compressed in dist/carry/fluxfit-smCAP.xz for tools/device-check.sh. Each capability has its own target folder, because candle's kernels are compiled
# for one capability at build time. The binary links libcuda.so.1 (the driver's) and CUDA 13's
# cuBLAS, cuRAND and NVRTC dynamically: on the machine that runs it, either a CUDA 13 install
# or the same PyPI wheels (LD_LIBRARY_PATH) provides them.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(tools/cuda/setup.sh)"

if [[ "${1:-}" == "--check" ]]; then
    shift
    if [[ "${1:-}" == "--no-kernels" ]]; then
        shift
        REAL_NVCC="$(command -v nvcc)"
        export REAL_NVCC NVCC="$PWD/tools/cuda/nvcc-no-kernels"
    fi
    # The usual target folder: the dependencies a CPU build checked are reused. candle's kernel
    # build reruns whenever NVCC or CUDA_COMPUTE_CAP changes, so empty kernels from
    # --no-kernels never reach a real build.
    export CUDA_COMPUTE_CAP="${1:-${CUDA_COMPUTE_CAP:-90}}"
    echo "== cargo clippy --features cuda (compute capability $CUDA_COMPUTE_CAP${NVCC:+, kernels not compiled})" >&2
    exec cargo clippy -p fluxfit-cli --features cuda --all-targets -- -D warnings
fi

caps=("$@")
[[ ${#caps[@]} -gt 0 ]] || caps=(90)
for cap in "${caps[@]}"; do
    [[ "$cap" =~ ^[0-9]+$ ]] || { echo "compute capability \`$cap\`: expected a number such as 90 or 86" >&2; exit 2; }
    echo "== release build for sm_$cap" >&2
    CUDA_COMPUTE_CAP="$cap" CARGO_TARGET_DIR="target/cuda-sm$cap" \
        cargo build --release -p fluxfit-cli --features cuda
    out="dist/cuda-sm$cap"
    mkdir -p "$out"
    strip -o "$out/fluxfit.tmp" "target/cuda-sm$cap/release/fluxfit"
    mv "$out/fluxfit.tmp" "$out/fluxfit"
    # What travels to a GPU machine (the device tool carries at most 64 MiB; the binary, most
    # of it candle's PTX text, is about 79 MB raw and 13 MB as xz).
    mkdir -p dist/carry
    xz -9 -T0 -c "$out/fluxfit" >"dist/carry/fluxfit-sm$cap.xz.tmp"
    mv "dist/carry/fluxfit-sm$cap.xz.tmp" "dist/carry/fluxfit-sm$cap.xz"
    ls -la "$out/fluxfit" "dist/carry/fluxfit-sm$cap.xz" >&2
done
