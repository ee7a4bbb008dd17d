// regfuse CPU kernels: the operations of the CUDA launchers (cuda/launchers.h), over
// the same metadata, run on the host; backward takes per-tensor output pointers instead
// of CUDA's flat buffers. No torch types in the interface; the binding owns allocation
// and validation.
#pragma once

#include <cstdint>

#include "../regfuse.h"

namespace regfuse {
namespace cpu {

// Elements per chunk of the table built for CPU tensors: large enough that the per-chunk
// cost (a table lookup and a dtype switch) vanishes, small enough that a 2-core machine
// splits a single big tensor evenly.
constexpr int64_t kChunkSize = 32768;

// out: (n,) per-tensor results, (2, n) for kL1L2, or one scalar for kPenalty (weights:
// (2, n) row-major).
// Both in double when acc_double, else float. p: the order of kLp, ignored by other ops.
void reduce(const int64_t* meta, MetaLayout layout, int op, const void* weights, bool acc_double,
            double p, void* out);

// Element x of tensor i gets scales[i] * sign(x) + scales[n + i] * x, written to (or,
// with accumulate, added to) the tensor of the same shape and dtype at out_ptrs[i]
// (views of the binding's flat buffers, or the .grad tensors themselves).
void backward(const int64_t* meta, MetaLayout layout, const void* scales, bool acc_double,
              const int64_t* out_ptrs, bool accumulate);

// In place x = sign(x) * max(|x| - thresholds[i], 0); NaN stays NaN.
void prox_l1(const int64_t* meta, MetaLayout layout, const void* thresholds, bool acc_double);

// In place x = x * factors[i] (factors: (n,)); tensors whose factor is 1 are not touched.
void scale(const int64_t* meta, MetaLayout layout, const void* factors, bool acc_double);

// Block soft-thresholding over a table of rows, in one pass: row i gets
// x = x * max(0, 1 - thresholds[i] / max(||row_i||_2, tiny)), its norm computed as
// reduce(kL2) computes it and the row scaled while it is still in cache (the two-pass
// route reads every row twice from memory). Rows whose factor is 1 are not touched.
// With soft_threshold_first, thresholds is (2, n) and row i is first soft-thresholded
// by thresholds[n + i] as prox_l1 does it (the sparse group lasso), in the same pass.
void block_shrink(const int64_t* meta, MetaLayout layout, const void* thresholds, bool soft_threshold_first,
                  bool acc_double);

}  // namespace cpu
}  // namespace regfuse
