#!/usr/bin/env bash
# Compile-check the torch-free CUDA kernels with a bare nvcc for sm_80 and sm_90, warnings
# as errors (register spills included), and csrc/penalties.h as plain host C++17, since
# the CPU kernels include it too. Needs nvcc, not a GPU. Exits non-zero on the first
# error or warning.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
NVCC="${NVCC:-nvcc}"
CXX="${CXX:-g++}"
out_dir="$(mktemp -d)"
trap 'rm -rf "$out_dir"' EXIT

command -v "$NVCC" >/dev/null || { echo "check_cuda: nvcc not found (set NVCC)" >&2; exit 1; }

for arch in 80 90; do
  "$NVCC" -std=c++17 -O3 \
    -gencode "arch=compute_${arch},code=sm_${arch}" \
    -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror -Xptxas --warn-on-spills,--warning-as-error \
    -c csrc/cuda/kernels.cu -o "$out_dir/kernels_sm${arch}.o"
  echo "check_cuda: csrc/cuda/kernels.cu sm_${arch} OK"
done

"$CXX" -std=c++17 -Wall -Wextra -Wpedantic -Werror -fsyntax-only -x c++ \
  -include csrc/penalties.h /dev/null
echo "check_cuda: csrc/penalties.h host C++17 ($CXX) OK"

# The binding's CUDA dispatch (REGFUSE_WITH_CUDA) only builds where torch has CUDA; check
# its syntax here against the installed torch's headers, which it needs no CUDA ones from.
PYTHON="${PYTHON:-python3}"
if torch_includes="$("$PYTHON" -c 'import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join("-isystem " + p for p in include_paths() + [sysconfig.get_paths()["include"]]))' 2>/dev/null)"; then
  # shellcheck disable=SC2086  # one word per include flag
  "$CXX" -std=c++20 -fsyntax-only -Wall -Wextra -Werror -Wno-unused-parameter -DREGFUSE_WITH_CUDA \
    -DTORCH_EXTENSION_NAME=_C $torch_includes csrc/bindings.cpp
  echo "check_cuda: csrc/bindings.cpp with REGFUSE_WITH_CUDA ($CXX) OK"
else
  echo "check_cuda: torch not importable by $PYTHON; binding check skipped"
fi
