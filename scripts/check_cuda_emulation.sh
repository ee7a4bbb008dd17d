#!/usr/bin/env bash
# Memory and race checks of the CUDA kernels without a GPU: csrc/cuda/kernels.cu compiled
# for the CPU through csrc/cuda/simt_cpu.h, driven by scripts/cuda_emulation_check.cpp
# (every launcher on awkward lists, against a float64 oracle), built and run
#   1. under AddressSanitizer + UndefinedBehaviorSanitizer, threads as fibers and as OS
#      threads: an out-of-bounds access or undefined behaviour is a report;
#   2. under ThreadSanitizer with one OS thread per CUDA thread: two threads of a block
#      touching one __shared__ (or global) address, one a write, with no barrier between
#      them is a report.
# Any report, or any mismatch with the oracle, fails the script. Needs a g++ or clang++
# with the sanitizers; no torch, no GPU.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
CXX="${CXX:-g++}"
out_dir="$(mktemp -d)"
trap 'rm -rf "$out_dir"' EXIT
sources=(scripts/cuda_emulation_check.cpp csrc/cuda/kernels_emulated.cpp)
flags=(-std=c++17 -O1 -g -fno-omit-frame-pointer -Wall -Wextra -Werror -Wno-unknown-pragmas)

"$CXX" "${flags[@]}" -fsanitize=address,undefined -fno-sanitize-recover=all "${sources[@]}" -o "$out_dir/asan"
"$CXX" "${flags[@]}" -Wno-tsan -fsanitize=thread "${sources[@]}" -o "$out_dir/tsan"

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export TSAN_OPTIONS="halt_on_error=1:report_signal_unsafe=0"
"$out_dir/asan" fibers
echo "check_cuda_emulation: ASan+UBSan, fibers: 0 reports"
"$out_dir/asan" threads
echo "check_cuda_emulation: ASan+UBSan, threads: 0 reports"
"$out_dir/tsan" threads
echo "check_cuda_emulation: TSan, threads: 0 reports"
