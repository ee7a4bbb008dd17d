// regfuse CPU kernels: one parallel region over every chunk of every tensor of the list.
//
// Each chunk is read once. Sums are kept in explicit SIMD vectors (reduce_chunk.h, built
// for AVX2 and for the baseline and picked at run time) and folded into double every
// kBlock elements: a
// float32 list keeps float32 speed yet ends with a relative error far below 1e-6 (a
// plain float32 running sum over 4M elements is off by ~1e-4). Per-chunk partials are
// combined in chunk order by one thread: the result does not depend on the thread count.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../penalties.h"

namespace regfuse {
namespace cpu {
namespace {

constexpr int64_t kBlock = 4096;
// Below this many elements per task, a parallel region costs more than it saves (waking
// the pool's threads between the serial work of a training step takes tens of us).
constexpr int64_t kMinElementsPerTask = 262144;

template <typename F>
void dispatch_dtype(int64_t code, F&& f) {
  switch (code) {
    case kFloat32: return f(float{});
    case kFloat64: return f(double{});
    case kFloat16: return f(c10::Half{});
    case kBFloat16: return f(c10::BFloat16{});
  }
}

template <typename F>
void dispatch_acc(bool acc_double, F&& f) {
  if (acc_double) return f(double{});
  return f(float{});
}

// Calls f(chunk, tensor, start, length) for every chunk, in parallel.
template <typename F>
void for_each_chunk(const int64_t* meta, const MetaLayout& layout, const F& f) {
  const int64_t* numels = meta + layout.numels();
  const int64_t* chunk_tensor = meta + layout.chunk_tensor();
  const int64_t* chunk_start = meta + layout.chunk_start();
  int64_t total = 0;
  for (int64_t i = 0; i < layout.num_tensors; ++i) total += numels[i];
  if (layout.num_chunks == 0) return;
  const int64_t grain = std::max<int64_t>(
      1, (layout.num_chunks * kMinElementsPerTask + total - 1) / std::max<int64_t>(total, 1));
  at::parallel_for(0, layout.num_chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t i = chunk_tensor[c];
      const int64_t start = chunk_start[c];
      f(c, i, start, std::min(layout.chunk_size, numels[i] - start));
    }
  });
}

// Calls f(i) for every entry (for none when no entry holds an element), in parallel over
// runs of consecutive entries with about equal numbers of elements: the entries of a row
// table range from one element to whole tensors, so equal entry counts would not balance
// the threads.
template <typename F>
void for_each_entry(const int64_t* meta, const MetaLayout& layout, const F& f) {
  const int64_t n = layout.num_tensors;
  const int64_t* numels = meta + layout.numels();
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += numels[i];
  if (total == 0) return;  // only empty entries: nothing to read or write
  const int64_t parts = std::clamp<int64_t>(total / kMinElementsPerTask, 1, 4 * at::get_num_threads());
  std::vector<int64_t> bounds{0};
  int64_t seen = 0;
  for (int64_t i = 0; i < n; ++i) {
    seen += numels[i];
    // Entry i closes part k once the parts before it hold k / parts of the elements.
    if (seen * parts >= total * static_cast<int64_t>(bounds.size()) && i + 1 < n) bounds.push_back(i + 1);
  }
  bounds.push_back(n);
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part)
      for (int64_t i = bounds[part]; i < bounds[part + 1]; ++i) f(i);
  });
}

// What one chunk contributes: `first` is sum|x|, sum x^2, sum|x|^p, the count of
// nonzeros, max|x| or min|x| by op; `second` is sum x^2 for kPenalty and kL1L2 (whose
// `first` is sum|x|) and the NaN count for kInf / kNegInf.
struct Partial {
  double first = 0;
  double second = 0;
};

// The value of `first` over no element: 0 for sums and for max|x| (|x| >= 0), +inf for min|x|.
template <int kOp>
constexpr double first_identity() {
  return kOp == kNegInf ? std::numeric_limits<double>::infinity() : 0.0;
}

template <int kOp>
inline Partial initial_partial() {
  return Partial{first_identity<kOp>(), 0.0};
}

template <int kOp>
inline void fold(Partial& p, double first, double second) {
  if constexpr (kOp == kInf) {
    p.first = std::max(p.first, first);
  } else if constexpr (kOp == kNegInf) {
    p.first = std::min(p.first, first);
  } else {
    p.first += first;
  }
  p.second += second;
}

// `v` rounded to the storage type T, as static_cast<T> rounds it. For bfloat16 the same
// bits as c10::BFloat16's conversion (nearest even, NaN -> 0x7FC0) without its branch,
// so that a loop storing bfloat16 vectorizes.
template <typename T, typename Acc>
inline T to_storage(Acc v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const float f = static_cast<float>(v);
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

// The reduction and update loops, compiled for AVX2 and for the baseline x86-64 / other
// targets; reduce_chunk and map_elements pick one at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#define REGFUSE_HAVE_AVX2_PATH 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define REGFUSE_CPU_ISA avx2
#define REGFUSE_VECTOR_BYTES 32
#include "reduce_chunk.h"
#include "update_chunk.h"
#undef REGFUSE_CPU_ISA
#undef REGFUSE_VECTOR_BYTES
#pragma GCC pop_options
#endif

#define REGFUSE_CPU_ISA baseline
#define REGFUSE_VECTOR_BYTES 16
#include "reduce_chunk.h"
#include "update_chunk.h"
#undef REGFUSE_CPU_ISA
#undef REGFUSE_VECTOR_BYTES

bool cpu_has_avx2() {
#ifdef REGFUSE_HAVE_AVX2_PATH
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  return has_avx2;
#else
  return false;
#endif
}

template <int kOp, typename Lane, typename T>
Partial reduce_chunk(const T* x, int64_t n, Lane p) {
#ifdef REGFUSE_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return avx2::reduce_chunk<kOp, Lane>(x, n, p);
#endif
  return baseline::reduce_chunk<kOp, Lane>(x, n, p);
}

template <int kOp, typename Acc>
std::vector<Partial> chunk_partials(const int64_t* meta, const MetaLayout& layout, Acc p) {
  std::vector<Partial> partials(layout.num_chunks);
  const int64_t* ptrs = meta + layout.ptrs();
  const int64_t* dtypes = meta + layout.dtypes();
  for_each_chunk(meta, layout, [&](int64_t c, int64_t i, int64_t start, int64_t len) {
    dispatch_dtype(dtypes[i], [&](auto tag) {
      using T = decltype(tag);
      partials[c] = reduce_chunk<kOp, Acc>(reinterpret_cast<const T*>(ptrs[i]) + start, len, p);
    });
  });
  return partials;
}

// Combines each tensor's partials in chunk order and writes the per-tensor results (or,
// for kPenalty, their weighted sum; for kL1L2, both norms: out[i] and out[n + i]) as Acc.
template <int kOp, typename Acc>
void finish(const int64_t* meta, const MetaLayout& layout, const std::vector<Partial>& partials,
            const Acc* weights, double p, Acc* out) {
  const int64_t n = layout.num_tensors;
  const int64_t* chunk_offsets = meta + layout.chunk_offsets();
  double penalty = 0;
  for (int64_t i = 0; i < n; ++i) {
    Partial total = initial_partial<kOp>();
    for (int64_t c = chunk_offsets[i]; c < chunk_offsets[i + 1]; ++c)
      fold<kOp>(total, partials[c].first, partials[c].second);
    if constexpr (kOp == kPenalty) {
      // Weights are stored as Acc; the product is rounded like the reference's Acc math.
      penalty += static_cast<double>(weights[i] * static_cast<Acc>(total.first) +
                                     weights[n + i] * static_cast<Acc>(total.second));
    } else if constexpr (kOp == kInf || kOp == kNegInf) {
      out[i] = total.second > 0 ? std::numeric_limits<Acc>::quiet_NaN() : static_cast<Acc>(total.first);
    } else if constexpr (kOp == kL2) {
      out[i] = static_cast<Acc>(std::sqrt(total.first));
    } else if constexpr (kOp == kLp) {
      out[i] = static_cast<Acc>(std::pow(total.first, 1.0 / p));
    } else if constexpr (kOp == kL1L2) {
      out[i] = static_cast<Acc>(total.first);
      out[n + i] = static_cast<Acc>(std::sqrt(total.second));
    } else {
      out[i] = static_cast<Acc>(total.first);
    }
  }
  if constexpr (kOp == kPenalty) out[0] = static_cast<Acc>(penalty);
}

template <int kOp>
void reduce_op(const int64_t* meta, const MetaLayout& layout, const void* weights, bool acc_double,
               double p, void* out) {
  dispatch_acc(acc_double, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    const std::vector<Partial> partials = chunk_partials<kOp, Acc>(meta, layout, static_cast<Acc>(p));
    finish<kOp>(meta, layout, partials, static_cast<const Acc*>(weights), p, static_cast<Acc*>(out));
  });
}

// Applies the element function `op_for(i)` of tensor i (Acc -> Acc, its per-tensor
// scalars copied into it, so that the loop does not reload them after every store) to
// every element of every tensor, writing the rounded result to `dest(i)` (same dtype as
// x), either replacing it or adding to it. Tensors for which `skip(i)` holds are not
// touched.
template <typename Acc, typename OpFor, typename Dest, typename Skip>
void map_elements(const int64_t* meta, const MetaLayout& layout, bool accumulate, const OpFor& op_for,
                  const Dest& dest, const Skip& skip) {
  const int64_t* ptrs = meta + layout.ptrs();
  const int64_t* dtypes = meta + layout.dtypes();
  for_each_chunk(meta, layout, [&](int64_t, int64_t i, int64_t start, int64_t len) {
    if (skip(i)) return;
    const auto op = op_for(i);
    dispatch_dtype(dtypes[i], [&](auto tag) {
      using T = decltype(tag);
      const T* x = reinterpret_cast<const T*>(ptrs[i]) + start;
      T* y = static_cast<T*>(dest(i)) + start;
#ifdef REGFUSE_HAVE_AVX2_PATH
      if (cpu_has_avx2()) return avx2::update_chunk<Acc>(x, y, len, accumulate, op);
#endif
      baseline::update_chunk<Acc>(x, y, len, accumulate, op);
    });
  });
}

constexpr auto kTouchAll = [](int64_t) { return false; };

}  // namespace

void reduce(const int64_t* meta, MetaLayout layout, int op, const void* weights, bool acc_double,
            double p, void* out) {
  switch (op) {
    case kL1: return reduce_op<kL1>(meta, layout, weights, acc_double, p, out);
    case kL2: return reduce_op<kL2>(meta, layout, weights, acc_double, p, out);
    case kSq: return reduce_op<kSq>(meta, layout, weights, acc_double, p, out);
    case kInf: return reduce_op<kInf>(meta, layout, weights, acc_double, p, out);
    case kPenalty: return reduce_op<kPenalty>(meta, layout, weights, acc_double, p, out);
    case kLp: return reduce_op<kLp>(meta, layout, weights, acc_double, p, out);
    case kL0: return reduce_op<kL0>(meta, layout, weights, acc_double, p, out);
    case kNegInf: return reduce_op<kNegInf>(meta, layout, weights, acc_double, p, out);
    case kL1L2: return reduce_op<kL1L2>(meta, layout, weights, acc_double, p, out);
  }
}

void backward(const int64_t* meta, MetaLayout layout, const void* scales, bool acc_double,
              const int64_t* out_ptrs, bool accumulate) {
  const int64_t n = layout.num_tensors;
  dispatch_acc(acc_double, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    const Acc* a = static_cast<const Acc*>(scales);
    const Acc* b = a + n;
    auto grad = [&](int64_t i) { return [ai = a[i], bi = b[i]](Acc x) { return grad_term(x, ai, bi); }; };
    auto dest = [&](int64_t i) { return reinterpret_cast<void*>(out_ptrs[i]); };
    map_elements<Acc>(meta, layout, accumulate, grad, dest, kTouchAll);
  });
}

void prox_l1(const int64_t* meta, MetaLayout layout, const void* thresholds, bool acc_double) {
  const int64_t* ptrs = meta + layout.ptrs();
  dispatch_acc(acc_double, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    const Acc* t = static_cast<const Acc*>(thresholds);
    auto shrink = [&](int64_t i) { return [ti = t[i]](Acc x) { return soft_threshold(x, ti); }; };
    auto dest = [&](int64_t i) { return reinterpret_cast<void*>(ptrs[i]); };
    map_elements<Acc>(meta, layout, false, shrink, dest, kTouchAll);
  });
}

void scale(const int64_t* meta, MetaLayout layout, const void* factors, bool acc_double) {
  const int64_t* ptrs = meta + layout.ptrs();
  dispatch_acc(acc_double, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    const Acc* f = static_cast<const Acc*>(factors);
    auto times = [&](int64_t i) { return [fi = f[i]](Acc x) { return x * fi; }; };
    auto dest = [&](int64_t i) { return reinterpret_cast<void*>(ptrs[i]); };
    // x * 1 is x, bit for bit: an unclipped gradient is read by nobody and written by nobody.
    auto unchanged = [&](int64_t i) { return f[i] == Acc(1); };
    map_elements<Acc>(meta, layout, false, times, dest, unchanged);
  });
}

void block_shrink(const int64_t* meta, MetaLayout layout, const void* thresholds, bool soft_threshold_first,
                  bool acc_double) {
  const int64_t* ptrs = meta + layout.ptrs();
  const int64_t* numels = meta + layout.numels();
  const int64_t* dtypes = meta + layout.dtypes();
  const int64_t* chunk_offsets = meta + layout.chunk_offsets();
  const int64_t* chunk_start = meta + layout.chunk_start();
  dispatch_acc(acc_double, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    const Acc* t = static_cast<const Acc*>(thresholds);
    const Acc* l1 = t + layout.num_tensors;
    constexpr Acc kTiny = std::numeric_limits<Acc>::min();
    for_each_entry(meta, layout, [&](int64_t i) {
      dispatch_dtype(dtypes[i], [&](auto tag) {
        using T = decltype(tag);
        T* x = reinterpret_cast<T*>(ptrs[i]);
        const int64_t n = numels[i];  // a local: the stores below must not make it reload
        if (soft_threshold_first) {  // prox_l1's update of the row, stored (rounded) first
          const Acc li = l1[i];
          for (int64_t k = 0; k < n; ++k) x[k] = to_storage<T>(soft_threshold(static_cast<Acc>(x[k]), li));
        }
        // The row's norm from the same chunk partials, folded in the same order, as
        // reduce(kL2) over this table: bit for bit the norm of the two-pass route.
        Partial total = initial_partial<kL2>();
        for (int64_t c = chunk_offsets[i]; c < chunk_offsets[i + 1]; ++c) {
          const int64_t start = chunk_start[c];
          const Partial part = reduce_chunk<kL2, Acc>(x + start, std::min(layout.chunk_size, n - start), Acc(0));
          fold<kL2>(total, part.first, part.second);
        }
        const Acc norm = static_cast<Acc>(std::sqrt(total.first));
        // 1 - t / max(norm, tiny), clamped at 0; a NaN norm passes through both (NaN
        // compares false), so a group holding a NaN becomes NaN.
        const Acc shrink = Acc(1) - t[i] / (norm < kTiny ? kTiny : norm);
        const Acc factor = shrink < Acc(0) ? Acc(0) : shrink;
        if (factor == Acc(1)) return;  // x * 1 is x
        // The row was just read: it is scaled while it is still in cache.
        for (int64_t k = 0; k < n; ++k) x[k] = to_storage<T>(static_cast<Acc>(x[k]) * factor);
      });
    });
  });
}

}  // namespace cpu
}  // namespace regfuse
