#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (H100/H200, no cargo, no registry) over a binary
# built here and carried there:
#
#   here:   tools/cuda/setup.sh && tools/cuda/build.sh 90    # dist/carry/fluxfit-sm90.xz
#   there:  tools/device-check.sh                            # device tool: carry dist/carry
#
# Prints one Markdown table (also written to $OUT/device-check.md when OUT is set): the device,
# pageable vs pinned upload GB/s, the tiny model's GPU images against the CPU's, and on a
# FLUX.1-dev-shaped checkpoint (23.8 GB of random bf16 values, written to /tmp first) seconds
# per step at 512² and 1024² for resident, streamed 1×2 and 1×1 and the planner's partial
# residency for 16 GB, with measured vs predicted peaks and how much copy time was hidden.
# About 5 minutes on an H200; pass --skip-full for the first three parts alone (under a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${FLUXFIT_BIN:-dist/cuda-sm90/fluxfit}"
if [[ ! -x "$bin" && -f dist/carry/fluxfit-sm90.xz ]]; then
    bin=/tmp/fluxfit-sm90
    xz -dc dist/carry/fluxfit-sm90.xz >"$bin.tmp" && chmod +x "$bin.tmp" && mv "$bin.tmp" "$bin"
fi
[[ -x "$bin" ]] || { echo "no binary: build it here with tools/cuda/build.sh 90 and carry dist/carry" >&2; exit 2; }

# CUDA 13's cuBLAS, cuRAND and NVRTC: a system install, or the PyPI wheels beside PyTorch.
libs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64; do [[ -d "$d" ]] && libs+=("$d"); done
if py="$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null)"; then
    [[ -d "$py/cu13/lib" ]] && libs+=("$py/cu13/lib")
    for d in "$py"/*/lib; do [[ -d "$d" ]] && libs+=("$d"); done
fi
export LD_LIBRARY_PATH="$(IFS=:; echo "${libs[*]:-}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd "$bin" | grep -q 'not found'; then
    echo "missing libraries:" >&2; ldd "$bin" | grep 'not found' >&2; exit 2
fi

nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader || true
mkdir -p "${OUT:-/tmp}"
report="${OUT:-/tmp}/device-check.md"
set -o pipefail
"$bin" device-check "$@" | tee "$report.partial"
mv "$report.partial" "$report"
echo "table written to $report" >&2
