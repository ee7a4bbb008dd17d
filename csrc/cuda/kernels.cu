// regfuse CUDA kernels: the launchers of launchers.h.
//
// Every kernel walks the multi-tensor table of regfuse.h: one block per chunk of
// kChunkSize elements, the block reading its tensor index, chunk start, data pointer,
// numel and dtype from the int64 metadata in global memory, so a launch covers any
// number of tensors of any mix of dtypes. Torch-free: compiled with a bare nvcc.
//
// Reductions are one launch (the ancestor is Apex's multi_tensor_l2norm_kernel, with the
// finish folded in as in CUDA's threadFenceReduction sample):
//   1. each block writes one partial per chunk it owns into the workspace;
//   2. the last block to finish (a device counter, incremented after a fence) combines
//      each tensor's partials (or, for kPenalty, all of them) in a fixed order and resets
//      the counter to zero for the next launch. Which block is last does not matter: the
//      combination order depends on the chunk indices only, and fixed block sizes fix
//      every tree, so the same input gives bitwise the same output.
//
// The same file runs on the CPU through the SIMT emulation of simt_cpu.h (see simt.h).

#include <climits>
#include <cstdint>
#include <type_traits>

#include "../penalties.h"
#include "launchers.h"
#include "simt.h"

namespace regfuse {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kChunkThreads = 256;  // every block: 64 elements a thread; finishing: 8 warps
constexpr int64_t kMaxGrid = INT_MAX;  // gridDim.x limit; kernels loop past it

// ---------------------------------------------------------------------------------------
// Reading the metadata table

// The sections of a MetaLayout buffer, resolved on the host by MetaLayout itself (whose
// accessors are host code) and passed to kernels by value.
struct Table {
  const int64_t* ptrs;
  const int64_t* numels;
  const int64_t* dtypes;
  const int64_t* chunk_offsets;
  const int64_t* chunk_tensor;
  const int64_t* chunk_start;
  const int64_t* flat_offset;
  int64_t num_tensors;
  int64_t num_chunks;
  int64_t chunk_size;
};

Table make_table(const int64_t* meta, const MetaLayout& layout) {
  return {meta + layout.ptrs(),          meta + layout.numels(),       meta + layout.dtypes(),
          meta + layout.chunk_offsets(), meta + layout.chunk_tensor(), meta + layout.chunk_start(),
          meta + layout.flat_offset(),   layout.num_tensors,           layout.num_chunks,
          layout.chunk_size};
}

// Where one chunk lives; read by every thread of its block (a broadcast load).
struct Chunk {
  int64_t tensor;  // index i of the tensor in the list
  int64_t start;   // first element of the chunk within tensor i
  int64_t count;   // elements in the chunk (the last chunk of a tensor may be short)
  int64_t dtype;   // DType code of tensor i
  void* data;      // data pointer of tensor i
};

__device__ __forceinline__ Chunk read_chunk(const Table& table, int64_t c) {
  Chunk chunk;
  chunk.tensor = table.chunk_tensor[c];
  chunk.start = table.chunk_start[c];
  chunk.count = min(table.chunk_size, table.numels[chunk.tensor] - chunk.start);
  chunk.dtype = table.dtypes[chunk.tensor];
  chunk.data = reinterpret_cast<void*>(table.ptrs[chunk.tensor]);
  return chunk;
}

// Calls fn(T{}) with T the storage type of the dtype code.
template <typename Fn>
__device__ __forceinline__ void visit_dtype(int64_t dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32: fn(float{}); break;
    case kFloat64: fn(double{}); break;
    case kFloat16: fn(Half{}); break;
    case kBFloat16: fn(BFloat16{}); break;
    default: break;  // the binding validates dtypes; nothing to do for an unknown code
  }
}

// ---------------------------------------------------------------------------------------
// Vectorized chunk traversal

// 16 bytes of elements: one ld/st.global.v4 per thread and iteration.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T elem[kSize];
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Vector k of an aligned array. The data pointers come from the int64 table, so the
// compiler cannot infer their address space; these make the accesses ld.global.cg /
// st.global.wb (each element is read once: caching in L1 buys nothing, and .cg stays
// coherent for the in-place kernels).
template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* base, int64_t k) {
  const uint4 bits = __ldcg(reinterpret_cast<const uint4*>(base) + k);
  Vec<T> v;
  memcpy(&v, &bits, sizeof(v));
  return v;
}
template <typename T>
__device__ __forceinline__ void store_vec(T* base, int64_t k, const Vec<T>& v) {
  uint4 bits;
  memcpy(&bits, &v, sizeof(bits));
  __stwb(reinterpret_cast<uint4*>(base) + k, bits);
}

// Visits this thread's share of a chunk of `count` elements: body(k) for each 16-byte
// vector k (elements [k * kSize, (k + 1) * kSize)), then body_scalar(e) for each element
// e past the last whole vector; every element goes through body_scalar when !vectorized
// (a misaligned pointer). Threads take consecutive vectors, so warps load coalesced;
// kUnroll vectors are in flight per thread.
template <typename T, int kUnroll = 4, typename VecBody, typename ScalarBody>
__device__ __forceinline__ void for_chunk_elements(int64_t count, bool vectorized,
                                                   VecBody&& body, ScalarBody&& body_scalar) {
  constexpr int kSize = Vec<T>::kSize;
  const int64_t num_vecs = vectorized ? count / kSize : 0;
#pragma unroll kUnroll
  for (int64_t k = threadIdx.x; k < num_vecs; k += blockDim.x) body(k);
  for (int64_t e = num_vecs * kSize + threadIdx.x; e < count; e += blockDim.x) body_scalar(e);
}

// ---------------------------------------------------------------------------------------
// Deterministic warp / block reductions over a reducer's State

template <typename Acc>
__device__ __forceinline__ Acc shfl_down(Acc v, int offset) {
  return __shfl_down_sync(0xFFFFFFFFu, v, offset);
}
template <typename Acc>
__device__ __forceinline__ AbsAndSquare<Acc> shfl_down(AbsAndSquare<Acc> v, int offset) {
  return {shfl_down(v.abs_sum, offset), shfl_down(v.square_sum, offset)};
}

// Lane 0 gets the combination of the warp's 32 States, in a fixed tree order.
template <typename Reducer, typename State>
__device__ __forceinline__ State warp_reduce(State s) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    s = Reducer::combine(s, shfl_down(s, offset));
  return s;
}

// Thread 0 gets the combination of the block's States. Safe to call repeatedly in a loop.
template <typename Reducer, typename State>
__device__ __forceinline__ State block_reduce(State s) {
  __shared__ State warp_results[1024 / kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  s = warp_reduce<Reducer>(s);
  __syncthreads();  // the previous call's readers are done with warp_results
  if (lane == 0) warp_results[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < num_warps ? warp_results[lane] : Reducer::init();
    s = warp_reduce<Reducer>(s);
  }
  return s;
}

// The value a chunk leaves in the workspace, of type Partial: its State, or for kPenalty
// (Partial = Acc from an AbsAndSquare State) its weighted contribution (weights: (2, n)
// row-major).
template <typename Partial, typename State, typename Acc>
__device__ __forceinline__ Partial chunk_partial(State s, const Acc* weights, int64_t tensor,
                                                 int64_t num_tensors) {
  if constexpr (std::is_same<Partial, State>::value) {
    return s;
  } else {
    return AbsAndSquareSum<Acc>::weighted(s, weights[tensor], weights[num_tensors + tensor]);
  }
}

// ---------------------------------------------------------------------------------------
// Reduction kernels

// Vectors in flight per thread in stage 1. PowSum's pow() is arithmetic-bound and, in
// double, needs every register an unrolled loop would hold (unrolled, it spills).
template <typename Reducer>
struct StageOneUnroll {
  static constexpr int value = 4;
};
template <typename Acc>
struct StageOneUnroll<PowSum<Acc>> {
  static constexpr int value = 1;
};

// How a per-tensor result is finished: as combined, its square root (kL2) or its p-th
// root (kLp).
enum class Root { kNone, kSqrt, kPth };

// A tensor's combined State written as its result, finished by kRoot; both sums of an
// AbsAndSquare are kL1L2's two rows, sum|x| and sqrt(sum x^2).
template <Root kRoot, typename Acc>
__device__ __forceinline__ void write_result(Acc s, Acc p, Acc* out, int64_t i, int64_t) {
  if (kRoot == Root::kSqrt) s = sqrt(s);
  if (kRoot == Root::kPth) s = pow_value(s, Acc(1) / p);
  out[i] = s;
}
template <Root kRoot, typename Acc>
__device__ __forceinline__ void write_result(AbsAndSquare<Acc> s, Acc, Acc* out, int64_t i, int64_t n) {
  out[i] = s.abs_sum;
  out[n + i] = sqrt(s.square_sum);
}

// A partial another block wrote in this launch, read from L2 (.cg): never a stale L1 line.
template <typename Acc>
__device__ __forceinline__ Acc load_partial(const Acc* p) {
  return __ldcg(p);
}
template <typename Acc>
__device__ __forceinline__ AbsAndSquare<Acc> load_partial(const AbsAndSquare<Acc>* p) {
  return {__ldcg(&p->abs_sum), __ldcg(&p->square_sum)};
}

// Whether this block is the last of the launch to have written its partials. Thread 0
// wrote them; its fence makes them visible to every block before it counts itself in. The
// last block resets the counter: it is zero again for the next launch on the stream.
__device__ __forceinline__ bool is_last_block(unsigned int* counter) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
    if (last) atomicExch(counter, 0u);
  }
  __syncthreads();
  return last;
}

// Per-tensor finish, by the last block: warp w combines the partials of tensors w, w + 8,
// ... (lane l takes chunks l, l + 32, ... in order, then a fixed shuffle tree).
template <typename Reducer, Root kRoot, typename Acc>
__device__ __forceinline__ void finish_per_tensor(const Table& table, const typename Reducer::State* partials,
                                                  Acc p, Acc* out) {
  const int64_t num_warps = blockDim.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t i = threadIdx.x / kWarpSize; i < table.num_tensors; i += num_warps) {
    const int64_t first = table.chunk_offsets[i];
    const int64_t last = table.chunk_offsets[i + 1];
    // An empty tensor owns no chunk and gets the identity.
    typename Reducer::State s = Reducer::init();
    for (int64_t c = first + lane; c < last; c += kWarpSize) s = Reducer::combine(s, load_partial(partials + c));
    s = warp_reduce<Reducer>(s);
    if (lane == 0) write_result<kRoot>(s, p, out, i, table.num_tensors);
  }
}

// kPenalty finish, by the last block: the sum of every chunk's weighted partial (thread t
// takes chunks t, t + blockDim.x, ... in order, then block_reduce's fixed tree) into out[0].
// An empty tensor owns no chunk, yet its weights count as w * 0, as in the reference: an
// inf or NaN weight makes the penalty NaN (0 * inf), whether its tensor is empty or not.
template <typename Acc>
__device__ __forceinline__ void finish_penalty(const Table& table, const Acc* weights, const Acc* partials,
                                               Acc* out) {
  using Sum = AbsSum<Acc>;  // only its combine (a + b) is used
  const int64_t n = table.num_tensors;
  Acc s = Acc(0);
  for (int64_t c = threadIdx.x; c < table.num_chunks; c += blockDim.x) s = s + load_partial(partials + c);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    if (table.numels[i] == 0) s = s + AbsAndSquareSum<Acc>::weighted({Acc(0), Acc(0)}, weights[i], weights[n + i]);
  }
  s = block_reduce<Sum>(s);
  if (threadIdx.x == 0) out[0] = s;
}

// partials[c] = the Reducer over the elements of chunk c (p: kLp's order), then the last
// block finishes: per tensor (Partial is the Reducer's State) or kPenalty's scalar
// (Partial is a weighted Acc).
template <typename Acc, typename Reducer, typename Partial, Root kRoot>
__global__ void __launch_bounds__(kChunkThreads)
reduce_kernel(Table table, const Acc* weights, Acc p, Partial* partials, unsigned int* counter, Acc* out) {
  for (int64_t c = blockIdx.x; c < table.num_chunks; c += gridDim.x) {
    const Chunk chunk = read_chunk(table, c);
    typename Reducer::State s = Reducer::init();
    visit_dtype(chunk.dtype, [&](auto tag) {
      using T = decltype(tag);
      const T* base = static_cast<const T*>(chunk.data) + chunk.start;
      for_chunk_elements<T, StageOneUnroll<Reducer>::value>(
          chunk.count, aligned16(base),
          [&](int64_t k) {
            const Vec<T> v = load_vec(base, k);
#pragma unroll
            for (int j = 0; j < Vec<T>::kSize; ++j)
              s = Reducer::add(s, static_cast<Acc>(Load<T>::apply(&v.elem[j])), p);
          },
          [&](int64_t e) { s = Reducer::add(s, static_cast<Acc>(Load<T>::apply(base + e)), p); });
    });
    s = block_reduce<Reducer>(s);
    if (threadIdx.x == 0) {
      partials[c] = chunk_partial<Partial>(s, weights, chunk.tensor, table.num_tensors);
    }
  }
  if (!is_last_block(counter)) return;
  if constexpr (std::is_same<Partial, typename Reducer::State>::value) {
    finish_per_tensor<Reducer, kRoot>(table, partials, p, out);
  } else {
    finish_penalty(table, weights, partials, out);
  }
}

// ---------------------------------------------------------------------------------------
// Elementwise kernels: y = op(coeffs_i, x, old) written to the destination of each tensor

// Per-tensor coefficients (a_i, b_i) of every elementwise op; coefficient b is unused by prox.
template <typename Acc>
struct Coeffs {
  Acc a;
  Acc b;
};

// Element x of tensor i becomes soft_threshold(x, thresholds[i]) (thresholds: (n,)).
struct ProxL1Op {
  static constexpr bool kReadsOutput = false;
  template <typename Acc>
  __device__ static Coeffs<Acc> coeffs(const Acc* thresholds, int64_t i, int64_t) {
    return {thresholds[i], Acc(0)};
  }
  template <typename Acc>
  __device__ static bool is_identity(Coeffs<Acc>) { return false; }  // soft_threshold(-0, 0) is +0
  template <typename Acc>
  __device__ static Acc apply(Coeffs<Acc> c, Acc x, Acc) { return soft_threshold(x, c.a); }
};

// Element x of tensor i becomes x * factors[i] (factors: (n,)); a tensor whose factor is
// 1 is left alone (x * 1 is x, bit for bit), so an unclipped gradient costs no traffic.
struct ScaleOp {
  static constexpr bool kReadsOutput = false;
  template <typename Acc>
  __device__ static Coeffs<Acc> coeffs(const Acc* factors, int64_t i, int64_t) {
    return {factors[i], Acc(0)};
  }
  template <typename Acc>
  __device__ static bool is_identity(Coeffs<Acc> c) { return c.a == Acc(1); }
  template <typename Acc>
  __device__ static Acc apply(Coeffs<Acc> c, Acc x, Acc) { return x * c.a; }
};

// Element x of tensor i gets grad_term(x, scales[i], scales[n + i]), added to the old
// destination value when kAccumulate (kept apart so that a -0.0 term stays -0.0).
template <bool kAccumulate>
struct GradTermOp {
  static constexpr bool kReadsOutput = kAccumulate;
  template <typename Acc>
  __device__ static Coeffs<Acc> coeffs(const Acc* scales, int64_t i, int64_t n) {
    return {scales[i], scales[n + i]};
  }
  template <typename Acc>
  __device__ static bool is_identity(Coeffs<Acc>) { return false; }
  template <typename Acc>
  __device__ static Acc apply(Coeffs<Acc> c, Acc x, Acc old) {
    const Acc term = grad_term(x, c.a, c.b);
    return kAccumulate ? old + term : term;
  }
};

// One flat output buffer per dtype code (kernel arguments cannot be raw arrays).
struct FlatOutputs {
  void* by_dtype[kNumDTypes];
};

// Destination of tensor i: data pointer out_ptrs[i], else its slot in the flat buffer.
template <typename T>
__device__ __forceinline__ T* destination(const Table& table, const int64_t* out_ptrs,
                                          const FlatOutputs& flat, const Chunk& chunk) {
  if (out_ptrs != nullptr) return reinterpret_cast<T*>(out_ptrs[chunk.tensor]);
  return static_cast<T*>(flat.by_dtype[chunk.dtype]) + table.flat_offset[chunk.tensor];
}

template <typename Acc, typename Op>
__global__ void __launch_bounds__(kChunkThreads)
elementwise_kernel(Table table, const Acc* coeff_table, const int64_t* out_ptrs, FlatOutputs flat) {
  for (int64_t c = blockIdx.x; c < table.num_chunks; c += gridDim.x) {
    const Chunk chunk = read_chunk(table, c);
    const Coeffs<Acc> coeffs = Op::coeffs(coeff_table, chunk.tensor, table.num_tensors);
    if (Op::is_identity(coeffs)) continue;  // the same for the whole block: no divergence
    visit_dtype(chunk.dtype, [&](auto tag) {
      using T = decltype(tag);
      const T* in = static_cast<const T*>(chunk.data) + chunk.start;
      T* out = destination<T>(table, out_ptrs, flat, chunk) + chunk.start;
      const auto element = [&](const T& x, T* y) {
        const Acc old = Op::kReadsOutput ? static_cast<Acc>(Load<T>::apply(y)) : Acc(0);
        Store<T>::apply(y, Op::apply(coeffs, static_cast<Acc>(Load<T>::apply(&x)), old));
      };
      for_chunk_elements<T>(
          chunk.count, aligned16(in) && aligned16(out),
          [&](int64_t k) {
            const Vec<T> x = load_vec(in, k);
            Vec<T> y;
            if (Op::kReadsOutput) y = load_vec<T>(out, k);
#pragma unroll
            for (int j = 0; j < Vec<T>::kSize; ++j) element(x.elem[j], &y.elem[j]);
            store_vec(out, k, y);
          },
          [&](int64_t e) { element(in[e], out + e); });
    });
  }
}

// ---------------------------------------------------------------------------------------
// Host side

unsigned int grid_for(int64_t blocks) {
  return static_cast<unsigned int>(blocks < kMaxGrid ? blocks : kMaxGrid);
}

const char* last_launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// One launch: partials in the workspace (num_chunks Partials, at most two Acc each), the
// finish by the last block. At least one block, so that a list without any chunk (every
// tensor empty) still gets its identities (kPenalty: out[0] = 0).
template <typename Acc, typename Reducer, typename Partial, Root kRoot = Root::kNone>
void launch_reduce_kernel(const Table& table, const Acc* weights, Acc p, void* workspace,
                          unsigned int* counter, Acc* out, cudaStream_t stream) {
  REGFUSE_LAUNCH(grid_for(table.num_chunks > 0 ? table.num_chunks : 1), kChunkThreads, stream,
                 reduce_kernel<Acc, Reducer, Partial, kRoot>)(table, weights, p, static_cast<Partial*>(workspace),
                                                              counter, out);
}

template <typename Acc, typename Reducer, Root kRoot = Root::kNone>
void launch_per_tensor(const Table& table, Acc p, void* workspace, unsigned int* counter, Acc* out,
                       cudaStream_t stream) {
  launch_reduce_kernel<Acc, Reducer, typename Reducer::State, kRoot>(table, nullptr, p, workspace, counter,
                                                                     out, stream);
}

template <typename Acc>
void launch_reduce(const Table& table, int op, const Acc* weights, Acc p, void* workspace,
                   unsigned int* counter, Acc* out, cudaStream_t stream) {
  void* w = workspace;
  unsigned int* k = counter;
  switch (op) {
    case kL1L2: launch_per_tensor<Acc, AbsAndSquareSum<Acc>>(table, p, w, k, out, stream); break;
    case kL1: launch_per_tensor<Acc, AbsSum<Acc>>(table, p, w, k, out, stream); break;
    case kL2: launch_per_tensor<Acc, SquareSum<Acc>, Root::kSqrt>(table, p, w, k, out, stream); break;
    case kSq: launch_per_tensor<Acc, SquareSum<Acc>>(table, p, w, k, out, stream); break;
    case kInf: launch_per_tensor<Acc, AbsMax<Acc>>(table, p, w, k, out, stream); break;
    case kLp: launch_per_tensor<Acc, PowSum<Acc>, Root::kPth>(table, p, w, k, out, stream); break;
    case kL0: launch_per_tensor<Acc, NonzeroCount<Acc>>(table, p, w, k, out, stream); break;
    case kNegInf: launch_per_tensor<Acc, AbsMin<Acc>>(table, p, w, k, out, stream); break;
    case kPenalty: launch_reduce_kernel<Acc, AbsAndSquareSum<Acc>, Acc>(table, weights, p, w, k, out, stream); break;
    default: break;  // the binding validates op
  }
}

template <typename Op, typename Acc>
void launch_elementwise(const Table& table, const Acc* coeff_table, const int64_t* out_ptrs,
                        const FlatOutputs& flat, cudaStream_t stream) {
  if (table.num_chunks == 0) return;
  REGFUSE_LAUNCH(grid_for(table.num_chunks), kChunkThreads, stream, elementwise_kernel<Acc, Op>)(
      table, coeff_table, out_ptrs, flat);
}

}  // namespace

size_t reduce_workspace_bytes(const MetaLayout& layout, bool acc_double) {
  // Room for two sums per chunk (kL1L2's State), whatever the op: a few bytes per chunk.
  return static_cast<size_t>(layout.num_chunks) * 2 * (acc_double ? sizeof(double) : sizeof(float));
}

const char* reduce(const int64_t* meta, MetaLayout layout, int op, const void* weights,
                   bool acc_double, double p, void* workspace, unsigned int* counter, void* out,
                   void* stream) {
  const Table table = make_table(meta, layout);
  const auto s = static_cast<cudaStream_t>(stream);
  if (acc_double) {
    launch_reduce(table, op, static_cast<const double*>(weights), p, workspace, counter,
                  static_cast<double*>(out), s);
  } else {
    launch_reduce(table, op, static_cast<const float*>(weights), static_cast<float>(p),
                  workspace, counter, static_cast<float*>(out), s);
  }
  return last_launch_error();
}

unsigned long long capture_id(void* stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  if (cudaStreamGetCaptureInfo(static_cast<cudaStream_t>(stream), &status, &id) != cudaSuccess) {
    cudaGetLastError();  // not sticky; a stream that cannot say is treated as not capturing
    return 0;
  }
  return status == cudaStreamCaptureStatusActive ? id : 0;
}

const char* backward(const int64_t* meta, MetaLayout layout, const void* scales, bool acc_double,
                     const int64_t* out_meta, void* const flat_out[kNumDTypes], void* stream) {
  const Table table = make_table(meta, layout);
  const auto s = static_cast<cudaStream_t>(stream);
  FlatOutputs flat{};
  if (flat_out != nullptr) {
    for (int d = 0; d < kNumDTypes; ++d) flat.by_dtype[d] = flat_out[d];
  }
  const int64_t* out_ptrs = out_meta != nullptr ? out_meta + layout.ptrs() : nullptr;
  const auto launch = [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    const auto* coeff_table = static_cast<const Acc*>(scales);
    if (out_ptrs != nullptr) {
      launch_elementwise<GradTermOp<true>>(table, coeff_table, out_ptrs, flat, s);
    } else {
      launch_elementwise<GradTermOp<false>>(table, coeff_table, nullptr, flat, s);
    }
  };
  if (acc_double) {
    launch(double{});
  } else {
    launch(float{});
  }
  return last_launch_error();
}

// In place: each tensor is its own destination. Every thread reads its elements before
// it writes them, at the same addresses, so no element is read after another thread
// wrote it.
template <typename Op>
const char* update_in_place(const int64_t* meta, MetaLayout layout, const void* per_tensor,
                            bool acc_double, void* stream) {
  const Table table = make_table(meta, layout);
  const auto s = static_cast<cudaStream_t>(stream);
  if (acc_double) {
    launch_elementwise<Op>(table, static_cast<const double*>(per_tensor), table.ptrs, FlatOutputs{}, s);
  } else {
    launch_elementwise<Op>(table, static_cast<const float*>(per_tensor), table.ptrs, FlatOutputs{}, s);
  }
  return last_launch_error();
}

const char* prox_l1(const int64_t* meta, MetaLayout layout, const void* thresholds,
                    bool acc_double, void* stream) {
  return update_in_place<ProxL1Op>(meta, layout, thresholds, acc_double, stream);
}

const char* scale(const int64_t* meta, MetaLayout layout, const void* factors, bool acc_double,
                  void* stream) {
  return update_in_place<ScaleOp>(meta, layout, factors, acc_double, stream);
}

}  // namespace cuda
}  // namespace regfuse
