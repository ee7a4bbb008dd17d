// The inner loop of the CPU elementwise updates, included by kernels.cpp once per
// instruction set (no include guard on purpose), like reduce_chunk.h: inside namespace
// REGFUSE_CPU_ISA, under whatever `#pragma GCC target` precedes the include, so that the
// compiler vectorizes `op` (inlined) with that instruction set's widest vectors.

namespace REGFUSE_CPU_ISA {

// y[k] = op(x[k]), or y[k] += op(x[k]) with `accumulate`, over `len` elements, each
// computed in Acc and rounded to T once.
template <typename Acc, typename T, typename Op>
void update_chunk(const T* x, T* y, int64_t len, bool accumulate, const Op& op) {
  if (accumulate) {
    for (int64_t k = 0; k < len; ++k) y[k] = to_storage<T>(static_cast<Acc>(y[k]) + op(static_cast<Acc>(x[k])));
  } else if (static_cast<const void*>(y) == static_cast<const void*>(x)) {
    // In place through one pointer: with two, the compiler's overlap check fails for
    // y == x and it falls back to a scalar loop.
    for (int64_t k = 0; k < len; ++k) y[k] = to_storage<T>(op(static_cast<Acc>(y[k])));
  } else {
    for (int64_t k = 0; k < len; ++k) y[k] = to_storage<T>(op(static_cast<Acc>(x[k])));
  }
}

}  // namespace REGFUSE_CPU_ISA
