// What csrc/cuda/kernels.cu needs besides its own code: CUDA's runtime under nvcc, or the
// CPU emulation of simt_cpu.h under a host compiler (tests and sanitizers without a
// GPU), and the one launch syntax both understand:
//   REGFUSE_LAUNCH(grid, threads, stream, kernel)(args...)
// is kernel<<<grid, threads, 0, stream>>>(args...) under nvcc.
#pragma once

#ifdef __CUDACC__
#include <cuda_runtime.h>
#define REGFUSE_LAUNCH(grid, threads, stream, ...) __VA_ARGS__<<<(grid), (threads), 0, (stream)>>>
#else
#include "simt_cpu.h"
#define REGFUSE_LAUNCH(grid, threads, stream, ...) ::regfuse::simt::launch((grid), (threads), (stream), __VA_ARGS__)
#endif
