// Every CUDA launcher (csrc/cuda/launchers.h) on awkward lists, through the CPU emulation
// of csrc/cuda/simt_cpu.h, against a float64 oracle: the program that
// scripts/check_cuda_emulation.sh builds under AddressSanitizer + UndefinedBehaviorSanitizer
// and under ThreadSanitizer. Torch-free, so the sanitizers see only regfuse's code.
//
//   cuda_emulation_check [threads|fibers]
//
// The cases of scripts/sanitizer_smoke.py at the level the kernels see them: every op
// (the nine reductions, the gradient into flat buffers and added in place, prox_l1,
// scale), over the tensors and over their rows (the group ops' tables); odd sizes,
// tails shorter than a vector, >= 3 chunks, mixed dtypes with and without a float64
// member, empty and 0-d tensors, pointers one element off a 16-byte boundary (what a
// non-contiguous or offset tensor becomes once made contiguous), 300 tiny tensors (40
// with threads). Each
// tensor is its own exactly sized heap block, so a read or write one element past it is
// an AddressSanitizer report. Exit status 1 on any mismatch.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../csrc/cuda/launchers.h"
#include "../csrc/multi_tensor.h"
#include "../csrc/penalties.h"

using namespace regfuse;

namespace {

int failures = 0;
int checks = 0;

struct Tensor {
  int64_t numel;
  int dtype;
  bool misaligned;  // one element past a 16-byte aligned block start
  unsigned char* block;
  void* data;
};

Tensor make(int64_t numel, int dtype, bool misaligned, std::mt19937& gen) {
  const int64_t size = kElementSize[dtype];
  const int64_t offset = misaligned ? size : 0;
  auto* block = static_cast<unsigned char*>(std::malloc(static_cast<size_t>(numel * size + offset)));
  Tensor t{numel, dtype, misaligned, block, block + offset};
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int64_t e = 0; e < numel; ++e) {
    const float v = (e % 11 == 5) ? 0.f : normal(gen);
    switch (dtype) {
      case kFloat32: static_cast<float*>(t.data)[e] = v; break;
      case kFloat64: static_cast<double*>(t.data)[e] = v; break;
      case kFloat16: Store<Half>::apply(static_cast<Half*>(t.data) + e, v); break;
      default: Store<BFloat16>::apply(static_cast<BFloat16*>(t.data) + e, v); break;
    }
  }
  return t;
}

// A block of exactly numel elements (the sanitizer sees one element too many).
Tensor exact(int64_t numel, int dtype, bool misaligned) {
  const int64_t size = kElementSize[dtype];
  const int64_t offset = misaligned ? size : 0;
  auto* block = static_cast<unsigned char*>(std::malloc(static_cast<size_t>(numel * size + offset)));
  std::memset(block, 0, static_cast<size_t>(numel * size + offset));
  return Tensor{numel, dtype, misaligned, block, block + offset};
}

double get(const Tensor& t, int64_t e) {
  switch (t.dtype) {
    case kFloat32: return static_cast<const float*>(t.data)[e];
    case kFloat64: return static_cast<const double*>(t.data)[e];
    case kFloat16: return Load<Half>::apply(static_cast<const Half*>(t.data) + e);
    default: return Load<BFloat16>::apply(static_cast<const BFloat16*>(t.data) + e);
  }
}

double relative_tolerance(int dtype) {
  switch (dtype) {
    case kFloat64: return 1e-9;
    case kFloat32: return 1e-4;
    case kFloat16: return 2e-3;
    default: return 1.6e-2;
  }
}

void expect(const std::string& what, double got, double want, double rtol) {
  ++checks;
  const bool same_nan = std::isnan(got) && std::isnan(want);
  const bool close = got == want || std::fabs(got - want) <= 1e-6 + rtol * std::fabs(want);
  if (!same_nan && !close) {
    if (++failures <= 20) std::printf("MISMATCH %s: got %.17g, want %.17g\n", what.c_str(), got, want);
  }
}

// The entries of a table: the tensors, or the rows (dim 0) of each, `rows[i]` of them.
struct Table {
  std::vector<int64_t> meta;
  MetaLayout layout;
  Entries entries;
};

Table table_of(const std::vector<Tensor>& ts, const std::vector<int64_t>* rows, int64_t chunk_size) {
  std::vector<int64_t> ptrs, numels, dtypes;
  for (const Tensor& t : ts) {
    ptrs.push_back(reinterpret_cast<int64_t>(t.data));
    numels.push_back(t.numel);
    dtypes.push_back(t.dtype);
  }
  Table table;
  if (rows != nullptr) {
    std::vector<int64_t> row_numels;
    for (size_t i = 0; i < ts.size(); ++i) row_numels.push_back((*rows)[i] ? ts[i].numel / (*rows)[i] : 0);
    table.entries = row_entries(ptrs, *rows, row_numels, dtypes);
  } else {
    table.entries = Entries{ptrs, numels, dtypes, {}};
  }
  table.meta = build_metadata(table.entries, chunk_size, &table.layout);
  return table;
}

// Entry j as (tensor, first element, numel).
struct Span {
  const Tensor* tensor;
  int64_t start, numel;
};

std::vector<Span> spans_of(const std::vector<Tensor>& ts, const std::vector<int64_t>* rows) {
  std::vector<Span> spans;
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t r = rows ? (*rows)[i] : 1;
    const int64_t len = r ? ts[i].numel / r : 0;
    for (int64_t k = 0; k < r; ++k) spans.push_back({&ts[i], k * len, len});
  }
  return spans;
}

template <typename Acc>
void check_list(const std::string& name, const std::vector<Tensor>& ts, const std::vector<int64_t>* rows) {
  const bool acc_double = std::is_same<Acc, double>::value;
  const double rtol = acc_double ? 1e-9 : 1e-4;
  Table table = table_of(ts, rows, cuda::kChunkSize);
  const std::vector<Span> spans = spans_of(ts, rows);
  const int64_t n = table.layout.num_tensors;
  const std::string label = name + (rows ? " rows" : "") + (acc_double ? " f64acc" : " f32acc");
  std::vector<unsigned char> workspace(cuda::reduce_workspace_bytes(table.layout, acc_double) + 1);
  unsigned int counter = 0;

  // Reductions: op, p, oracle of one entry.
  struct Op {
    int op;
    double p;
  };
  const Op ops[] = {{kL1, 0}, {kL2, 0}, {kSq, 0}, {kInf, 0}, {kLp, 3}, {kLp, 0.5}, {kL0, 0}, {kNegInf, 0}, {kL1L2, 0}};
  for (const Op& op : ops) {
    std::vector<Acc> out(op.op == kL1L2 ? 2 * n : n);
    const char* error = cuda::reduce(table.meta.data(), table.layout, op.op, nullptr, acc_double, op.p,
                                     workspace.data(), &counter, out.data(), nullptr);
    if (error != nullptr) std::printf("ERROR %s: %s\n", label.c_str(), error), ++failures;
    for (int64_t j = 0; j < n; ++j) {
      double l1 = 0, sq = 0, mx = 0, mn = INFINITY, lp = 0, l0 = 0;
      for (int64_t e = 0; e < spans[j].numel; ++e) {
        const double x = std::fabs(get(*spans[j].tensor, spans[j].start + e));
        l1 += x, sq += x * x, mx = std::max(mx, x), mn = std::min(mn, x), lp += std::pow(x, op.p), l0 += x != 0;
      }
      const std::string what = label + " op " + std::to_string(op.op) + " entry " + std::to_string(j);
      switch (op.op) {
        case kL1: expect(what, out[j], l1, rtol); break;
        case kL2: expect(what, out[j], std::sqrt(sq), rtol); break;
        case kSq: expect(what, out[j], sq, rtol); break;
        case kInf: expect(what, out[j], mx, rtol); break;
        case kLp: expect(what, out[j], std::pow(lp, 1 / op.p), 10 * rtol); break;
        case kL0: expect(what, out[j], l0, 0); break;
        case kNegInf: expect(what, out[j], mn, rtol); break;
        default: expect(what, out[j], l1, rtol), expect(what + " l2", out[n + j], std::sqrt(sq), rtol); break;
      }
    }
    if (counter != 0) std::printf("ERROR %s: the counter was left at %u\n", label.c_str(), counter), ++failures;
  }
  if (rows != nullptr) return;  // the rest runs over the tensors, as regfuse does

  // The penalty, with per-tensor weights.
  std::vector<Acc> weights(2 * n);
  double penalty = 0;
  for (int64_t j = 0; j < n; ++j) {
    weights[j] = Acc(0.5 + j % 3);
    weights[n + j] = Acc(0.25 * (j % 2));
    double l1 = 0, sq = 0;
    for (int64_t e = 0; e < spans[j].numel; ++e) {
      const double x = get(*spans[j].tensor, spans[j].start + e);
      l1 += std::fabs(x), sq += x * x;
    }
    penalty += weights[j] * l1 + weights[n + j] * sq;
  }
  Acc total = 0;
  cuda::reduce(table.meta.data(), table.layout, kPenalty, weights.data(), acc_double, 0, workspace.data(),
               &counter, &total, nullptr);
  expect(label + " penalty", total, penalty, rtol);

  // Gradients into flat buffers (one per dtype, exactly sized), then added in place into
  // exactly sized, misaligned gradients.
  int64_t flat_size[kNumDTypes];
  flat_sizes(table.meta.data(), table.layout, flat_size);
  std::vector<Tensor> flat;
  void* flat_out[kNumDTypes] = {nullptr, nullptr, nullptr, nullptr};
  for (int d = 0; d < kNumDTypes; ++d) {
    flat.push_back(exact(flat_size[d], d, false));
    if (flat_size[d] > 0) flat_out[d] = flat.back().data;
  }
  std::vector<Tensor> grads;
  for (const Tensor& t : ts) grads.push_back(exact(t.numel, t.dtype, true));
  Table grad_table = table_of(grads, nullptr, cuda::kChunkSize);
  cuda::backward(table.meta.data(), table.layout, weights.data(), acc_double, nullptr, flat_out, nullptr);
  cuda::backward(table.meta.data(), table.layout, weights.data(), acc_double, grad_table.meta.data(), nullptr,
                 nullptr);
  const int64_t* flat_offset = table.meta.data() + table.layout.flat_offset();
  for (int64_t j = 0; j < n; ++j) {
    const Tensor& t = ts[j];
    const Tensor view{t.numel, t.dtype, false, nullptr,
                      static_cast<unsigned char*>(flat[t.dtype].data) + flat_offset[j] * kElementSize[t.dtype]};
    for (int64_t e = 0; e < t.numel; ++e) {
      const double x = get(t, e);
      const double want = weights[j] * ((0 < x) - (x < 0)) + weights[n + j] * x;
      const std::string what = label + " grad " + std::to_string(j) + "[" + std::to_string(e) + "]";
      expect(what, get(view, e), want, relative_tolerance(t.dtype));
      expect(what + " added", get(grads[j], e), want, relative_tolerance(t.dtype));
    }
  }

  // In place: soft-thresholding, then scaling (a factor of 1 leaves a tensor alone).
  std::vector<Acc> thresholds(n), factors(n);
  for (int64_t j = 0; j < n; ++j) thresholds[j] = Acc(0.3), factors[j] = j % 2 ? Acc(1) : Acc(0.5);
  std::vector<std::vector<double>> want(n);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t e = 0; e < ts[j].numel; ++e) {
      const double x = get(ts[j], e);
      want[j].push_back(((0 < x) - (x < 0)) * std::max(std::fabs(x) - 0.3, 0.0) * double(factors[j]));
    }
  }
  cuda::prox_l1(table.meta.data(), table.layout, thresholds.data(), acc_double, nullptr);
  cuda::scale(table.meta.data(), table.layout, factors.data(), acc_double, nullptr);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t e = 0; e < ts[j].numel; ++e)
      expect(label + " prox+scale " + std::to_string(j), get(ts[j], e), want[j][e], relative_tolerance(ts[j].dtype));
  }
  for (Tensor& t : flat) std::free(t.block);
  for (Tensor& t : grads) std::free(t.block);
}

void run_case(const std::string& name, const std::vector<std::vector<int64_t>>& shapes_and_dtypes, bool with_rows) {
  // Each item: {rows, row_numel, dtype, misaligned}.
  for (int acc = 0; acc < 2; ++acc) {
    std::mt19937 gen(7);
    std::vector<Tensor> ts;
    std::vector<int64_t> rows;
    bool any_double = false;
    for (const auto& s : shapes_and_dtypes) {
      ts.push_back(make(s[0] * s[1], static_cast<int>(s[2]), s[3] != 0, gen));
      rows.push_back(s[0]);
      any_double = any_double || s[2] == kFloat64;
    }
    if (any_double == (acc == 0)) {
      for (Tensor& t : ts) std::free(t.block);
      continue;  // the accumulation dtype follows the list: float64 iff a member is
    }
    if (any_double) {
      check_list<double>(name, ts, nullptr);
      if (with_rows) check_list<double>(name, ts, &rows);
    } else {
      check_list<float>(name, ts, nullptr);
      if (with_rows) check_list<float>(name, ts, &rows);
    }
    for (Tensor& t : ts) std::free(t.block);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool threads = argc > 1 && std::string(argv[1]) == "threads";
  cuda::configure_emulation(threads, 0, 0, 0);
  // {rows, row numel, dtype, misaligned}; a 0-d tensor is one row of one element.
  run_case("mixed_half", {{1, 37, kFloat32, 0}, {3, 4097, kFloat16, 0}, {1, 65537, kBFloat16, 0}, {1, 1, kFloat32, 0},
                          {0, 0, kFloat32, 0}, {65, 65, kFloat32, 0}, {1, 4100, kFloat32, 1}},
           true);
  // Real threads cost a lot per block: the race check runs the larger lists once, here
  // with a small grid (each block then loops over several chunks).
  if (threads) cuda::configure_emulation(threads, 0, 0, 2);
  run_case("with_float64", {{1, 4099, kFloat64, 0}, {1, 129, kFloat32, 1}, {0, 3, kFloat16, 0},
                            {1, (1 << 17) + 3, kFloat32, 0}, {5, 7, kBFloat16, 1}},
           !threads);
  run_case("three_chunks_misaligned", {{1, 3 * 16384 + 5, kFloat16, 1}, {1, 2 * 16384 + 1, kBFloat16, 1}}, false);
  cuda::configure_emulation(threads, 0, 0, 0);
  run_case("all_empty", {{0, 0, kFloat32, 0}, {3, 0, kFloat64, 0}}, true);
  std::vector<std::vector<int64_t>> tiny;
  const int num_tiny = threads ? 40 : 300;  // one OS thread per CUDA thread costs a lot per block
  for (int i = 0; i < num_tiny; ++i) tiny.push_back({1, 1 + i % 7, i % 2 ? kFloat16 : kFloat32, i % 3 == 0});
  run_case("many_tiny", tiny, false);
  // The grid and block order must not change a thing: rerun one case with a grid of 3
  // blocks in a shuffled order.
  cuda::configure_emulation(threads, 2, 5, 3);
  run_case("with_float64 grid 3 shuffled", {{1, 4099, kFloat64, 0}, {1, (1 << 17) + 3, kFloat32, 1}}, true);
  std::printf("cuda_emulation_check (%s): %d checks, %d mismatches\n", threads ? "threads" : "fibers", checks,
              failures);
  return failures == 0 ? 0 : 1;
}
