// regfuse per-element maths: the gradient and soft-threshold formulas are shared by the CPU
// kernels (g++) and the CUDA kernels (nvcc); the reducers and the 16-bit storage types
// serve the CUDA kernels (the CPU kernels use c10's conversions).
//
// Plain C++17 on the host; the device-only parts (fp16/bf16 intrinsics) sit under
// __CUDA_ARCH__, so `g++ -std=c++17` compiles this file without CUDA or torch.
// Every formula follows torch's semantics bit for bit where the tests compare against
// the reference backend: sign(NaN) == 0 and sign(-0.0) == +0 (torch.sign), NaN
// propagates through max and clamp (torch.linalg.vector_norm, torch.clamp_min).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define REGFUSE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define REGFUSE_HOST_DEVICE inline
#endif

namespace regfuse {

// ---------------------------------------------------------------------------------------
// Scalar helpers (Acc is float or double: the accumulation dtype)

REGFUSE_HOST_DEVICE float abs_value(float x) { return fabsf(x); }
REGFUSE_HOST_DEVICE double abs_value(double x) { return fabs(x); }

REGFUSE_HOST_DEVICE float pow_value(float x, float p) { return powf(x, p); }
REGFUSE_HOST_DEVICE double pow_value(double x, double p) { return pow(x, p); }

template <typename Acc>
REGFUSE_HOST_DEVICE Acc infinity() {
  return static_cast<Acc>(HUGE_VAL);
}

// max that returns NaN when either operand is NaN, as torch.maximum / vector_norm(inf).
template <typename Acc>
REGFUSE_HOST_DEVICE Acc nan_max(Acc a, Acc b) {
  return (a > b || a != a) ? a : b;
}

// min that returns NaN when either operand is NaN, as torch.minimum / vector_norm(-inf).
template <typename Acc>
REGFUSE_HOST_DEVICE Acc nan_min(Acc a, Acc b) {
  return (a < b || a != a) ? a : b;
}

// torch.sign: -1, 0 or 1; 0 for NaN and for both zeros.
template <typename Acc>
REGFUSE_HOST_DEVICE Acc sign_of(Acc x) {
  return static_cast<Acc>((Acc(0) < x) - (x < Acc(0)));
}

// a * b + c * d with every operation rounded on its own, as torch evaluates it: nvcc
// would otherwise contract it into an fma and differ from the CPU result in the last bit.
REGFUSE_HOST_DEVICE float sum_of_products(float a, float b, float c, float d) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(__fmul_rn(a, b), __fmul_rn(c, d));
#else
  return a * b + c * d;
#endif
}
REGFUSE_HOST_DEVICE double sum_of_products(double a, double b, double c, double d) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(__dmul_rn(a, b), __dmul_rn(c, d));
#else
  return a * b + c * d;
#endif
}

// The gradient term of every fused backward: a * sign(x) + b * x.
template <typename Acc>
REGFUSE_HOST_DEVICE Acc grad_term(Acc x, Acc a, Acc b) {
  return sum_of_products(a, sign_of(x), b, x);
}

// Soft-thresholding sign(x) * max(|x| - t, 0), written as torch evaluates it so that
// NaN stays NaN and the zeros it leaves carry the sign torch gives them.
template <typename Acc>
REGFUSE_HOST_DEVICE Acc soft_threshold(Acc x, Acc t) {
  const Acc shrunk = abs_value(x) - t;
  const Acc clamped = (shrunk > Acc(0) || shrunk != shrunk) ? shrunk : Acc(0);
  return sign_of(x) * clamped;
}

// ---------------------------------------------------------------------------------------
// Reducers: how a chunk folds its elements into a State, and how States combine.
// combine() is associative up to rounding; callers fix the combination order. add()
// takes the norm order p, which only PowSum uses.

template <typename Acc>
struct AbsSum {  // kL1
  using State = Acc;
  REGFUSE_HOST_DEVICE static State init() { return Acc(0); }
  REGFUSE_HOST_DEVICE static State add(State s, Acc x, Acc) { return s + abs_value(x); }
  REGFUSE_HOST_DEVICE static State combine(State a, State b) { return a + b; }
};

template <typename Acc>
struct SquareSum {  // kL2 (before the sqrt) and kSq
  using State = Acc;
  REGFUSE_HOST_DEVICE static State init() { return Acc(0); }
  REGFUSE_HOST_DEVICE static State add(State s, Acc x, Acc) { return s + x * x; }
  REGFUSE_HOST_DEVICE static State combine(State a, State b) { return a + b; }
};

template <typename Acc>
struct PowSum {  // kLp (before the p-th root)
  using State = Acc;
  REGFUSE_HOST_DEVICE static State init() { return Acc(0); }
  REGFUSE_HOST_DEVICE static State add(State s, Acc x, Acc p) { return s + pow_value(abs_value(x), p); }
  REGFUSE_HOST_DEVICE static State combine(State a, State b) { return a + b; }
};

template <typename Acc>
struct NonzeroCount {  // kL0; NaN != 0 counts, as in torch
  using State = Acc;
  REGFUSE_HOST_DEVICE static State init() { return Acc(0); }
  REGFUSE_HOST_DEVICE static State add(State s, Acc x, Acc) { return s + (x != Acc(0) ? Acc(1) : Acc(0)); }
  REGFUSE_HOST_DEVICE static State combine(State a, State b) { return a + b; }
};

template <typename Acc>
struct AbsMax {  // kInf; 0 (the identity, as |x| >= 0) for an empty tensor
  using State = Acc;
  REGFUSE_HOST_DEVICE static State init() { return Acc(0); }
  REGFUSE_HOST_DEVICE static State add(State s, Acc x, Acc) { return nan_max(s, abs_value(x)); }
  REGFUSE_HOST_DEVICE static State combine(State a, State b) { return nan_max(a, b); }
};

template <typename Acc>
struct AbsMin {  // kNegInf; +inf (the identity of min) for an empty tensor
  using State = Acc;
  REGFUSE_HOST_DEVICE static State init() { return infinity<Acc>(); }
  REGFUSE_HOST_DEVICE static State add(State s, Acc x, Acc) { return nan_min(s, abs_value(x)); }
  REGFUSE_HOST_DEVICE static State combine(State a, State b) { return nan_min(a, b); }
};

template <typename Acc>
struct AbsAndSquare {  // both sums of kPenalty, from one read of each element
  Acc abs_sum;
  Acc square_sum;
};

template <typename Acc>
struct AbsAndSquareSum {  // kPenalty
  using State = AbsAndSquare<Acc>;
  REGFUSE_HOST_DEVICE static State init() { return {Acc(0), Acc(0)}; }
  REGFUSE_HOST_DEVICE static State add(State s, Acc x, Acc) {
    return {s.abs_sum + abs_value(x), s.square_sum + x * x};
  }
  REGFUSE_HOST_DEVICE static State combine(State a, State b) {
    return {a.abs_sum + b.abs_sum, a.square_sum + b.square_sum};
  }
  // The penalty contribution w_abs * sum|x| + w_square * sum x^2 of a State.
  REGFUSE_HOST_DEVICE static Acc weighted(State s, Acc w_abs, Acc w_square) {
    return w_abs * s.abs_sum + w_square * s.square_sum;
  }
};

// ---------------------------------------------------------------------------------------
// Element storage and conversion. Half and BFloat16 are 16-bit storage types with the
// layout of at::Half / at::BFloat16 / __half / __nv_bfloat16, so a kernel can cast any
// tensor's data pointer to them. Load<T> widens to float or double; Store<T> rounds
// once, to nearest even (double reaches 16-bit types through float, as torch's casts do).

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

namespace detail {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE binary16 -> binary32, exact (subnormals and Inf included); a NaN keeps its payload
// and comes out quiet, as the hardware conversions (F16C, PTX cvt) do.
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) {
    const uint32_t quiet = mantissa != 0 ? 0x00400000u : 0u;
    return bits_float(sign | 0x7F800000u | quiet | (mantissa << 13));
  }
  if (exponent != 0) return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_float(sign);
  // Subnormal half: shift the leading 1 into the implicit bit of a normal float.
  uint32_t shift = 0;
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    ++shift;
  }
  return bits_float(sign | ((113u - shift) << 23) | ((mantissa & 0x3FFu) << 13));
}

// binary32 -> binary16, round to nearest even; overflow gives Inf, NaN gives the quiet
// NaN 0x7E00 with the sign kept.
inline uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t magnitude = u & 0x7FFFFFFFu;
  uint16_t result;
  if (magnitude >= 0x47800000u) {  // |f| >= 65536: Inf, or NaN kept quiet
    result = magnitude > 0x7F800000u ? 0x7E00u : 0x7C00u;
  } else if (magnitude < 0x38800000u) {  // |f| < 2^-14: subnormal half or zero
    // Adding 0.5f lines the 10 half mantissa bits up with the bottom of the float
    // mantissa, so the float addition itself rounds to nearest even.
    const float aligned = bits_float(magnitude) + 0.5f;
    result = static_cast<uint16_t>(float_bits(aligned) - 0x3F000000u);
  } else {  // normal half; a carry out of the mantissa correctly bumps the exponent
    const uint32_t mantissa_odd = (magnitude >> 13) & 1u;
    magnitude += 0xC8000FFFu + mantissa_odd;  // rebias exponent by -112, add the rounding bias
    result = static_cast<uint16_t>(magnitude >> 13);
  }
  return static_cast<uint16_t>(result | sign);
}

// binary32 -> bfloat16 as c10::BFloat16's scalar conversion: nearest even, NaN -> 0x7FC0.
inline uint16_t float_to_bfloat16_bits(float f) {
  if (f != f) return 0x7FC0u;
  const uint32_t u = float_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace detail

// Load<T>::apply(p) widens *p to float (16/32-bit types) or double (float64).
template <typename T>
struct Load;
// Store<T>::apply(p, v) writes v rounded to T.
template <typename T>
struct Store;

template <>
struct Load<float> {
  REGFUSE_HOST_DEVICE static float apply(const float* p) { return *p; }
};
template <>
struct Load<double> {
  REGFUSE_HOST_DEVICE static double apply(const double* p) { return *p; }
};
template <>
struct Load<Half> {
  REGFUSE_HOST_DEVICE static float apply(const Half* p) {
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(p->bits));
#else
    return detail::half_bits_to_float(p->bits);
#endif
  }
};
template <>
struct Load<BFloat16> {
  REGFUSE_HOST_DEVICE static float apply(const BFloat16* p) {
#ifdef __CUDA_ARCH__
    return __bfloat162float(__ushort_as_bfloat16(p->bits));
#else
    return detail::bits_float(static_cast<uint32_t>(p->bits) << 16);
#endif
  }
};

template <>
struct Store<float> {
  template <typename Acc>
  REGFUSE_HOST_DEVICE static void apply(float* p, Acc v) { *p = static_cast<float>(v); }
};
template <>
struct Store<double> {
  template <typename Acc>
  REGFUSE_HOST_DEVICE static void apply(double* p, Acc v) { *p = static_cast<double>(v); }
};
template <>
struct Store<Half> {
  template <typename Acc>
  REGFUSE_HOST_DEVICE static void apply(Half* p, Acc v) {
    const float f = static_cast<float>(v);
#ifdef __CUDA_ARCH__
    // The NaN of the host conversion (and of torch's CPU casts), so results agree bit for bit.
    const uint16_t nan_bits = static_cast<uint16_t>(((__float_as_uint(f) >> 16) & 0x8000u) | 0x7E00u);
    p->bits = f != f ? nan_bits : __half_as_ushort(__float2half_rn(f));
#else
    p->bits = detail::float_to_half_bits(f);
#endif
  }
};
template <>
struct Store<BFloat16> {
  template <typename Acc>
  REGFUSE_HOST_DEVICE static void apply(BFloat16* p, Acc v) {
    const float f = static_cast<float>(v);
#ifdef __CUDA_ARCH__
    // c10::BFloat16's NaN, so CPU and CUDA results agree bit for bit.
    p->bits = f != f ? uint16_t{0x7FC0} : __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
    p->bits = detail::float_to_bfloat16_bits(f);
#endif
  }
};

}  // namespace regfuse
