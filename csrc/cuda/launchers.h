// regfuse CUDA launchers: the only entry points of csrc/cuda/kernels.cu.
//
// Torch-free on purpose (flash-attention's habit): the binding (csrc/bindings.cpp) owns
// allocation, validation and the current stream; these functions take raw device
// pointers, int64 sizes and a cudaStream_t passed as void*. Every launcher returns the
// CUDA error string of its launches, or nullptr on success, so the binding can raise.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../regfuse.h"

namespace regfuse {
namespace cuda {

// Elements per chunk of the multi-tensor table built for CUDA tensors.
constexpr int64_t kChunkSize = 16384;

// Bytes of device scratch `reduce` needs for a list with this layout.
size_t reduce_workspace_bytes(const MetaLayout& layout, bool acc_double);

// Reductions (enum Reduction in regfuse.h) over every tensor of the list.
//   meta:      device int64 buffer laid out as MetaLayout `layout` (chunk_size == kChunkSize)
//   weights:   kPenalty only, (2, n) row-major in the accumulation dtype; else nullptr
//   p:         the order of kLp (a finite p > 0); ignored by the other ops
//   out:       (n,) per-tensor results, (2, n) for kL1L2, or one scalar for kPenalty,
//              accumulation dtype
//   workspace: reduce_workspace_bytes(layout, acc_double) bytes of device scratch
//   counter:   one device unsigned int that is 0, used by no other launch running at the
//              same time (one per stream and graph); the launch leaves it 0 again
// One kernel launch. The accumulation dtype is double when acc_double, else float. Partial
// sums are combined in a fixed order: the same input gives bitwise the same output.
const char* reduce(const int64_t* meta, MetaLayout layout, int op, const void* weights,
                   bool acc_double, double p, void* workspace, unsigned int* counter, void* out,
                   void* stream);

// The id of the CUDA graph capture under way on `stream` (cudaStreamGetCaptureInfo), 0
// when it is not capturing: a captured graph gets reduction counters of its own.
unsigned long long capture_id(void* stream);

// Element x of tensor i gets  scales[i] * sign(x) + scales[n + i] * x  (scales: (2, n)
// row-major, accumulation dtype), computed in the accumulation dtype and rounded once.
//   out_meta != nullptr: the result is added in place to the tensor whose data pointer is
//     out_meta[i] (a MetaLayout buffer of the gradients; same shapes and dtypes).
//   out_meta == nullptr: the result is written to flat_out[dtype_i] + flat_offset[i]
//     (one flat output buffer per dtype code, nullptr for dtypes absent from the list).
const char* backward(const int64_t* meta, MetaLayout layout, const void* scales, bool acc_double,
                     const int64_t* out_meta, void* const flat_out[kNumDTypes], void* stream);

// In place x = sign(x) * max(|x| - thresholds[i], 0); NaN stays NaN.
const char* prox_l1(const int64_t* meta, MetaLayout layout, const void* thresholds,
                    bool acc_double, void* stream);

// In place x = x * factors[i] (factors: (n,), accumulation dtype), rounded once; a tensor
// whose factor is exactly 1 is not read or written.
const char* scale(const int64_t* meta, MetaLayout layout, const void* factors, bool acc_double,
                  void* stream);

#ifndef __CUDACC__
// The emulation's settings (simt_cpu.h's Config), where these kernels are built for the
// CPU: threads as OS threads instead of fibers, the order of the blocks (0 grid order,
// 1 reversed, 2 shuffled with `seed`), a grid replacing every launch's (0: none).
void configure_emulation(bool threads, int block_order, uint64_t seed, unsigned int grid);
// Kernel launches since the process started.
uint64_t emulated_launches();
#endif

}  // namespace cuda
}  // namespace regfuse
