// The inner loop of the CPU reductions, included by kernels.cpp once per instruction set
// (no include guard on purpose): inside namespace REGFUSE_CPU_ISA, with vectors of
// REGFUSE_VECTOR_BYTES bytes, under whatever `#pragma GCC target` precedes the include.
// Only the caller's Partial, first_identity, initial_partial, fold and kBlock are used
// from outside.

namespace REGFUSE_CPU_ISA {

// Lane-wise helpers for a scalar or a GCC vector, written with bit operations on vectors:
// a vector `?:` is split into scalar code on targets without a blend instruction.
template <typename V>
struct Bits {  // the same-width integer (vector) type of V
  using Lane = std::remove_reference_t<decltype(std::declval<V>()[0])>;
  using Int = std::conditional_t<sizeof(Lane) == 4, int32_t, int64_t>;
  typedef Int Type __attribute__((vector_size(sizeof(V))));
};

template <typename V>
inline V abs_of(V v) {
  if constexpr (std::is_floating_point_v<V>) {
    return std::abs(v);
  } else {
    using I = typename Bits<V>::Type;
    return (V)((I)v & ~(I)(-V{}));  // -0.0 is the sign bit alone: clear it in every lane
  }
}

// Lanes of `a` where `mask` is set, else lanes of `b`.
template <typename V, typename M>
inline V select(M mask, V a, V b) {
  if constexpr (std::is_floating_point_v<V>) {
    return mask ? a : b;
  } else {
    using I = typename Bits<V>::Type;
    return (V)(((I)a & mask) | ((I)b & ~mask));
  }
}

// One step for a scalar or for every lane of a vector V at once; `p` is kLp's order.
template <int kOp, typename V, typename Lane>
inline void accumulate(V& first, V& second, V v, Lane p) {
  if constexpr (kOp == kL1) {
    first += abs_of(v);
  } else if constexpr (kOp == kL2 || kOp == kSq) {
    first += v * v;
  } else if constexpr (kOp == kInf || kOp == kNegInf) {
    const V a = abs_of(v);
    if constexpr (kOp == kInf) {
      first = select(a > first, a, first);
    } else {
      first = select(a < first, a, first);
    }
    second += select(v != v, V{} + 1, V{});  // NaN count: max() / min() alone would drop a NaN
  } else if constexpr (kOp == kL0) {
    first += select(v != V{}, V{} + 1, V{});  // NaN != 0: counted, as torch counts it
  } else if constexpr (kOp == kLp) {
    if constexpr (std::is_floating_point_v<V>) {
      first += std::pow(std::abs(v), p);
    } else {  // no vector pow without a vector math library: one lane at a time
      for (size_t j = 0; j < sizeof(V) / sizeof(Lane); ++j) first[j] += std::pow(std::abs(v[j]), p);
    }
  } else {  // kPenalty, kL1L2
    first += abs_of(v);
    second += v * v;
  }
}

// kVectorBytes of Lanes as one GCC vector (explicit SIMD without intrinsics: the
// instruction set is the one this file is compiled for), kUnroll of them accumulated
// independently so that the adds' latency is hidden.
constexpr int kVectorBytes = REGFUSE_VECTOR_BYTES;
constexpr int kUnroll = 4;

template <typename Lane, typename T, typename V>
inline V load_lanes(const T* x) {
  V v;
  if constexpr (std::is_same_v<T, Lane>) {
    std::memcpy(&v, x, sizeof(V));
  } else {
    for (size_t j = 0; j < sizeof(V) / sizeof(Lane); ++j) v[j] = static_cast<Lane>(x[j]);
  }
  return v;
}

// Lane is the accumulation type: float keeps float32 lists at float32 speed, double
// (any float64 in the list) gives every tensor of the list float64 sums.
template <int kOp, typename Lane, typename T>
Partial reduce_chunk(const T* x, int64_t n, Lane p) {
  typedef Lane V __attribute__((vector_size(kVectorBytes)));
  constexpr int64_t kWidth = kVectorBytes / sizeof(Lane);
  constexpr int64_t kStep = kWidth * kUnroll;
  static_assert(kBlock % kStep == 0, "a block is a whole number of steps");
  const Lane identity = static_cast<Lane>(first_identity<kOp>());
  Partial partial = initial_partial<kOp>();
  for (int64_t block = 0; block < n; block += kBlock) {
    const T* xb = x + block;
    const int64_t len = std::min(kBlock, n - block);
    V first[kUnroll], second[kUnroll] = {};
    for (int u = 0; u < kUnroll; ++u) first[u] = V{} + identity;
    int64_t k = 0;
    for (; k + kStep <= len; k += kStep) {
      for (int u = 0; u < kUnroll; ++u)
        accumulate<kOp>(first[u], second[u], load_lanes<Lane, T, V>(xb + k + u * kWidth), p);
    }
    // Folding costs a serial double add per lane: a short entry (a row of a row table,
    // a tiny tensor) would spend more time on it than on its elements. Vectors the loop
    // never touched hold the identity and are not folded; for the summing ops the
    // unrolled vectors are added first (each lane then sums at most kBlock / kWidth
    // elements in Lane precision before it reaches double).
    if (k > 0) {
      if constexpr (kOp == kInf || kOp == kNegInf) {
        for (int u = 0; u < kUnroll; ++u)
          for (int64_t j = 0; j < kWidth; ++j) fold<kOp>(partial, first[u][j], second[u][j]);
      } else {
        for (int u = 1; u < kUnroll; ++u) {
          first[0] += first[u];
          second[0] += second[u];
        }
        for (int64_t j = 0; j < kWidth; ++j) fold<kOp>(partial, first[0][j], second[0][j]);
      }
    }
    Lane first_tail = identity, second_tail = 0;
    for (; k < len; ++k) accumulate<kOp>(first_tail, second_tail, static_cast<Lane>(xb[k]), p);
    fold<kOp>(partial, first_tail, second_tail);
  }
  return partial;
}

}  // namespace REGFUSE_CPU_ISA
