// regfuse: the torch-free contract shared by the CPU kernels, the CUDA kernels and the
// binding. Nothing here includes torch or CUDA headers, so kernel files can be
// compile-checked with a bare nvcc / g++.
#pragma once

#include <cstdint>

namespace regfuse {

// What a reduction computes; values shared with regfuse/backends/base.py::Reduction.
enum Reduction : int {
  kL1 = 0,       // per tensor: sum |x|
  kL2 = 1,       // per tensor: sqrt(sum x^2)
  kSq = 2,       // per tensor: sum x^2
  kInf = 3,      // per tensor: max |x| (NaN if any NaN), 0 for an empty tensor
  kPenalty = 4,  // scalar: sum_i w[0][i] * sum|x_i| + w[1][i] * sum x_i^2
  kLp = 5,       // per tensor: (sum |x|^p)^(1/p) for a finite p > 0 passed with the op
  kL0 = 6,       // per tensor: the number of x != 0 (NaN counts)
  kNegInf = 7,   // per tensor: min |x| (NaN if any NaN), +inf for an empty tensor
  kL1L2 = 8,     // per tensor, (2, n): out[i] = sum |x|, out[n + i] = sqrt(sum x^2)
};

// Element types; values shared with regfuse/backends/base.py::DTypeCode.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3, kNumDTypes = 4 };

// Bytes per element of each DType code.
constexpr int64_t kElementSize[kNumDTypes] = {4, 8, 2, 2};

// Bytes of the widest vector access of the GPU kernels (ld/st.global.v4, a 128-bit Triton
// load): what "aligned" means below.
constexpr int64_t kAlignment = 16;

// The multi-tensor metadata: one int64 buffer, built once per list by multi_tensor.h and
// read by every kernel family (CPU, CUDA, Triton). For n tensors cut into C chunks:
//   [0, n)                 data pointer of tensor i
//   [n, 2n)                numel of tensor i
//   [2n, 3n)               dtype code of tensor i
//   [3n, 4n+1)             chunk_offsets: tensor i owns chunks [chunk_offsets[i], chunk_offsets[i+1])
//   [4n+1, 4n+1+C)         chunk_tensor: the tensor of chunk c
//   [4n+1+C, 4n+1+2C)      chunk_start: element offset of chunk c within its tensor
//   [4n+1+2C, 5n+1+2C)     flat_offset: offset of tensor i in the flat buffer of its dtype
// Empty tensors own no chunk. Tensors of one dtype are packed into its flat buffer (the
// fused backward's output) in list order, each slot starting on a kAlignment-byte
// boundary (offsets padded: multi_tensor.h::flat_slot), so that a tensor whose byte size
// is not a multiple of 16 leaves every later slot aligned.
//
// The entries of the table ("tensor i" above) are either the tensors of the list or, for
// the group ops, the rows of each tensor (its slices along dim 0, which a contiguous
// tensor stores one after another; multi_tensor.h::row_entries): per-entry reductions are
// then per-group norms, per-entry scales a per-group gradient or shrink factor. The rows
// of one tensor share its flat slot: consecutive in the flat buffer, padded after the
// last one only, so that the tensor's gradient is one contiguous view.
//
// Alignment is decided per chunk, at run time, from the chunk's addresses: a full chunk
// whose input (and output) addresses are kAlignment-byte aligned takes the 16-byte
// vector path, any other chunk the element-wise path. Chunk starts are multiples of the
// chunk size, itself a multiple of 16 elements, so a chunk is aligned iff its tensor's
// data pointer (and its output slot) is.
struct MetaLayout {
  int64_t num_tensors;
  int64_t num_chunks;
  int64_t chunk_size;
  int64_t ptrs() const { return 0; }
  int64_t numels() const { return num_tensors; }
  int64_t dtypes() const { return 2 * num_tensors; }
  int64_t chunk_offsets() const { return 3 * num_tensors; }
  int64_t chunk_tensor() const { return 4 * num_tensors + 1; }
  int64_t chunk_start() const { return 4 * num_tensors + 1 + num_chunks; }
  int64_t flat_offset() const { return 4 * num_tensors + 1 + 2 * num_chunks; }
  int64_t size() const { return 5 * num_tensors + 1 + 2 * num_chunks; }
};

}  // namespace regfuse
