// The only file that includes torch: list inspection, the metadata cache, allocation,
// the device guard and the dispatch to the CPU kernels or the CUDA launchers. The CUDA
// stream comes from Python (torch.cuda.current_stream().cuda_stream), so this file needs
// no CUDA headers and builds against a CPU-only torch.
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cstdlib>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cpu/kernels.h"
#include "multi_tensor.h"
#include "regfuse.h"
#ifdef REGFUSE_WITH_CUDA
#include "cuda/launchers.h"
#endif

namespace regfuse {
namespace {

int64_t dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: return -1;
  }
}

// One native pass over the Python list: (acc_double, requires_grad, contiguous), or None
// when anything is wrong, in which case the Python specification
// (regfuse.validation.inspect_py) runs to raise the precise error.
py::object inspect(py::handle list) {
  if (!PyList_Check(list.ptr())) return py::none();
  const Py_ssize_t n = PyList_GET_SIZE(list.ptr());
  bool acc_double = false, requires_grad = false, contiguous = true;
  c10::optional<at::Device> device;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(list.ptr(), i);
    if (!THPVariable_Check(item)) return py::none();
    const at::Tensor& t = THPVariable_Unpack(item);
    const int64_t code = dtype_code(t.scalar_type());
    if (code < 0 || t.layout() != at::kStrided) return py::none();
    if (!device) {
      device = t.device();
    } else if (t.device() != *device) {
      return py::none();
    }
    acc_double = acc_double || code == kFloat64;
    requires_grad = requires_grad || t.requires_grad();
    contiguous = contiguous && t.is_contiguous();
  }
  return py::make_tuple(acc_double, requires_grad, contiguous);
}

// True when every tensor of the list has a dense, contiguous .grad of its own shape,
// dtype and device: the common case of add_penalty_grad_, checked without a Python loop.
// False sends the caller to the Python checks, which say precisely what is wrong.
bool grads_ready(py::handle list) {
  if (!PyList_Check(list.ptr())) return false;
  const Py_ssize_t n = PyList_GET_SIZE(list.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(list.ptr(), i);
    if (!THPVariable_Check(item)) return false;
    const at::Tensor& t = THPVariable_Unpack(item);
    const at::Tensor& g = t.grad();
    if (!g.defined() || g.layout() != at::kStrided || !g.is_contiguous() ||
        g.scalar_type() != t.scalar_type() || g.device() != t.device() || g.sizes() != t.sizes()) {
      return false;
    }
  }
  return true;
}

// The first pair (i, j) of tensors whose memory ranges overlap, or None. An in-place op
// over a list that names the same memory twice would race with itself. Ranges span from
// the lowest to the highest element address, so interleaved views count as overlapping.
py::object first_overlap(const std::vector<at::Tensor>& tensors) {
  struct Range {
    uintptr_t begin, end;
    size_t index;
  };
  std::vector<Range> ranges;
  ranges.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    int64_t last = 0;  // offset of the last element, in elements
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * std::abs(t.stride(d));
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    ranges.push_back({begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size()), i});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (size_t k = 1; k < ranges.size(); ++k) {
    if (ranges[k].begin < ranges[k - 1].end) {
      const size_t i = std::min(ranges[k - 1].index, ranges[k].index);
      const size_t j = std::max(ranges[k - 1].index, ranges[k].index);
      return py::make_tuple(i, j);
    }
  }
  return py::none();
}

// ---- metadata cache ------------------------------------------------------------------
// Keyed by everything the table is computed from (chunk size, device, data pointers,
// sizes, dtypes), so a hit is always the right table; a training loop that passes the
// same parameters every step pays one host build and one host-to-device copy in all.

struct Metadata {
  at::Tensor table;  // int64, on the tensors' device
  MetaLayout layout;
  int64_t flat_size[kNumDTypes];
};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& key) const {
    size_t h = key.size();
    for (int64_t v : key) h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    return h;
  }
};

class MetadataCache {
 public:
  Metadata get(const std::vector<at::Tensor>& tensors, int64_t chunk_size) {
    const int64_t n = static_cast<int64_t>(tensors.size());
    const at::Device device = tensors[0].device();
    std::vector<int64_t> key;
    key.reserve(3 * n + 3);
    key.push_back(chunk_size);
    key.push_back(static_cast<int64_t>(device.type()));
    key.push_back(device.index());
    for (const at::Tensor& t : tensors) key.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
    for (const at::Tensor& t : tensors) key.push_back(t.numel());
    for (const at::Tensor& t : tensors) key.push_back(dtype_code(t.scalar_type()));

    std::lock_guard<std::mutex> lock(mutex_);
    auto found = index_.find(key);
    if (found != index_.end()) {
      entries_.splice(entries_.begin(), entries_, found->second);
      return found->second->second;
    }
    const std::vector<int64_t> ptrs(key.begin() + 3, key.begin() + 3 + n);
    const std::vector<int64_t> numels(key.begin() + 3 + n, key.begin() + 3 + 2 * n);
    const std::vector<int64_t> dtypes(key.begin() + 3 + 2 * n, key.end());
    Metadata meta;
    std::vector<int64_t> host = build_metadata(ptrs, numels, dtypes, chunk_size, &meta.layout);
    flat_sizes(host.data(), meta.layout, meta.flat_size);
    meta.table = torch::tensor(host, torch::dtype(torch::kInt64)).to(device);
    entries_.emplace_front(std::move(key), meta);
    index_[entries_.front().first] = entries_.begin();
    if (entries_.size() > kCapacity) {
      index_.erase(entries_.back().first);
      entries_.pop_back();
    }
    return meta;
  }

 private:
  static constexpr size_t kCapacity = 64;
  using Entry = std::pair<std::vector<int64_t>, Metadata>;
  std::mutex mutex_;
  std::list<Entry> entries_;
  std::unordered_map<std::vector<int64_t>, std::list<Entry>::iterator, KeyHash> index_;
};

MetadataCache& metadata_cache() {
  static MetadataCache cache;
  return cache;
}

bool on_cuda(const std::vector<at::Tensor>& tensors) { return tensors[0].device().is_cuda(); }

int64_t chunk_size_for(const std::vector<at::Tensor>& tensors) {
#ifdef REGFUSE_WITH_CUDA
  if (on_cuda(tensors)) return cuda::kChunkSize;
#endif
  return cpu::kChunkSize;
}

Metadata metadata_for(const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK(!tensors.empty(), "regfuse: empty tensor list");
  if (on_cuda(tensors)) {
#ifndef REGFUSE_WITH_CUDA
    TORCH_CHECK(false, "regfuse: this build of the extension has no CUDA kernels");
#endif
  } else {
    TORCH_CHECK(tensors[0].device().is_cpu(), "regfuse: unsupported device ", tensors[0].device());
  }
  return metadata_cache().get(tensors, chunk_size_for(tensors));
}

#ifdef REGFUSE_WITH_CUDA
void check_cuda_status(const char* error) { TORCH_CHECK(error == nullptr, "regfuse CUDA kernel: ", error); }

void* stream_ptr(int64_t stream) { return reinterpret_cast<void*>(stream); }
#endif

at::Tensor acc_vector(const at::Tensor& t, bool acc_double) {
  TORCH_CHECK(t.scalar_type() == (acc_double ? at::kDouble : at::kFloat),
              "regfuse: per-tensor scalars must be in the accumulation dtype");
  return t.contiguous();
}

// ---- ops -------------------------------------------------------------------------------

at::Tensor reduce(const std::vector<at::Tensor>& tensors, int64_t op,
                  const c10::optional<at::Tensor>& weights, bool acc_double, int64_t stream) {
  const Metadata meta = metadata_for(tensors);
  c10::DeviceGuard guard(tensors[0].device());
  const auto options = tensors[0].options().dtype(acc_double ? at::kDouble : at::kFloat);
  at::Tensor out = op == kPenalty ? at::empty({}, options)
                                  : at::empty({static_cast<int64_t>(tensors.size())}, options);
  const at::Tensor w = weights ? acc_vector(*weights, acc_double) : at::Tensor();
  const void* w_ptr = w.defined() ? w.data_ptr() : nullptr;
  const int64_t* table = meta.table.data_ptr<int64_t>();
  if (on_cuda(tensors)) {
#ifdef REGFUSE_WITH_CUDA
    at::Tensor workspace = at::empty(
        {static_cast<int64_t>(cuda::reduce_workspace_bytes(meta.layout, acc_double))},
        tensors[0].options().dtype(at::kByte));
    check_cuda_status(cuda::reduce(table, meta.layout, static_cast<int>(op), w_ptr, acc_double,
                                   workspace.data_ptr(), out.data_ptr(), stream_ptr(stream)));
#endif
  } else {
    py::gil_scoped_release no_gil;
    cpu::reduce(table, meta.layout, static_cast<int>(op), w_ptr, acc_double, out.data_ptr());
  }
  return out;
}

// CPU gradient buffers are recycled: glibc serves a 100 MB block with fresh pages from
// mmap on every call, and faulting them in costs several times the kernel that fills
// them. A buffer is handed out again only once nothing but this pool references its
// storage (autograd has added the views into .grad and dropped them); a view that became
// a .grad, or that the caller kept, keeps its buffer out of the pool for good.
class GradBufferPool {
 public:
  at::Tensor acquire(int64_t numel, const at::TensorOptions& options) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (at::Tensor& buffer : buffers_) {
      if (buffer.numel() == numel && buffer.scalar_type() == options.dtype() &&
          buffer.storage().use_count() == 1) {
        return buffer.alias();  // holds the storage: no other caller can claim it now
      }
    }
    at::Tensor buffer = at::empty({numel}, options);
    buffers_.push_back(buffer);
    if (buffers_.size() > kCapacity) buffers_.erase(buffers_.begin());
    return buffer.alias();
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    buffers_.clear();
  }

 private:
  static constexpr size_t kCapacity = 8;
  std::mutex mutex_;
  std::vector<at::Tensor> buffers_;
};

GradBufferPool& cpu_grad_pool() {
  static GradBufferPool pool;
  return pool;
}

// Gradient outputs shaped like `tensors`: views of one flat buffer per dtype (in list
// order, as the CUDA kernels' flat_offset expects), with each view's data pointer.
struct GradOutputs {
  std::vector<at::Tensor> grads;
  std::vector<int64_t> ptrs;
  void* base[kNumDTypes] = {nullptr, nullptr, nullptr, nullptr};
};

GradOutputs allocate_grads(const std::vector<at::Tensor>& tensors, const Metadata& meta) {
  static const at::ScalarType kTypes[kNumDTypes] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
  const bool pooled = tensors[0].device().is_cpu();
  at::Tensor flat[kNumDTypes];
  GradOutputs out;
  for (int d = 0; d < kNumDTypes; ++d) {
    if (meta.flat_size[d] == 0) continue;
    const auto options = tensors[0].options().dtype(kTypes[d]);
    flat[d] = pooled ? cpu_grad_pool().acquire(meta.flat_size[d], options)
                     : at::empty({meta.flat_size[d]}, options);
    out.base[d] = flat[d].data_ptr();
  }
  out.grads.reserve(tensors.size());
  out.ptrs.reserve(tensors.size());
  int64_t offset[kNumDTypes] = {0, 0, 0, 0};
  for (const at::Tensor& t : tensors) {
    const int64_t d = dtype_code(t.scalar_type());
    if (t.numel() == 0) {  // no flat buffer exists for a dtype whose tensors are all empty
      out.grads.push_back(at::empty(t.sizes(), t.options()));
    } else {
      out.grads.push_back(flat[d].narrow(0, offset[d], t.numel()).view(t.sizes()));
      offset[d] += t.numel();
    }
    out.ptrs.push_back(reinterpret_cast<int64_t>(out.grads.back().data_ptr()));
  }
  return out;
}

// Launches the fused gradient; with `into` it adds to those tensors, else it returns new
// gradients (views of one flat buffer per dtype).
std::vector<at::Tensor> run_backward(const std::vector<at::Tensor>& tensors, const at::Tensor& scales,
                                     bool acc_double, const std::vector<at::Tensor>* into,
                                     int64_t stream) {
  const Metadata meta = metadata_for(tensors);
  c10::DeviceGuard guard(tensors[0].device());
  const at::Tensor s = acc_vector(scales, acc_double);
  const int64_t* table = meta.table.data_ptr<int64_t>();
  if (on_cuda(tensors)) {
#ifdef REGFUSE_WITH_CUDA
    GradOutputs out;
    const int64_t* out_table = nullptr;
    Metadata out_meta;
    if (into != nullptr) {
      out_meta = metadata_for(*into);
      out_table = out_meta.table.data_ptr<int64_t>();
    } else {
      out = allocate_grads(tensors, meta);
    }
    check_cuda_status(cuda::backward(table, meta.layout, s.data_ptr(), acc_double, out_table,
                                     out.base, stream_ptr(stream)));
    return std::move(out.grads);
#endif
  }
  GradOutputs out;
  if (into != nullptr) {
    out.ptrs.reserve(into->size());
    for (const at::Tensor& g : *into) out.ptrs.push_back(reinterpret_cast<int64_t>(g.data_ptr()));
  } else {
    out = allocate_grads(tensors, meta);
  }
  {
    py::gil_scoped_release no_gil;
    cpu::backward(table, meta.layout, s.data_ptr(), acc_double, out.ptrs.data(), into != nullptr);
  }
  return std::move(out.grads);
}

std::vector<at::Tensor> grad(const std::vector<at::Tensor>& tensors, const at::Tensor& scales,
                             bool acc_double, int64_t stream) {
  return run_backward(tensors, scales, acc_double, nullptr, stream);
}

void add_grad_(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& tensors,
               const at::Tensor& scales, bool acc_double, int64_t stream) {
  TORCH_CHECK(grads.size() == tensors.size(), "regfuse: one gradient per tensor");
  run_backward(tensors, scales, acc_double, &grads, stream);
}

void prox_l1_(const std::vector<at::Tensor>& tensors, const at::Tensor& thresholds, bool acc_double,
              int64_t stream) {
  const Metadata meta = metadata_for(tensors);
  c10::DeviceGuard guard(tensors[0].device());
  const at::Tensor t = acc_vector(thresholds, acc_double);
  const int64_t* table = meta.table.data_ptr<int64_t>();
  if (on_cuda(tensors)) {
#ifdef REGFUSE_WITH_CUDA
    check_cuda_status(cuda::prox_l1(table, meta.layout, t.data_ptr(), acc_double, stream_ptr(stream)));
#endif
  } else {
    py::gil_scoped_release no_gil;
    cpu::prox_l1(table, meta.layout, t.data_ptr(), acc_double);
  }
}

// The cached table for a list and a chunk size, for the Triton kernels.
py::tuple metadata(const std::vector<at::Tensor>& tensors, int64_t chunk_size) {
  TORCH_CHECK(!tensors.empty() && chunk_size > 0, "regfuse: metadata needs tensors and a chunk size");
  const Metadata meta = metadata_cache().get(tensors, chunk_size);
  return py::make_tuple(meta.table, meta.layout.num_chunks);
}

bool built_with_cuda() {
#ifdef REGFUSE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace regfuse

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace regfuse;
  m.doc() = "regfuse kernels: fused reductions, gradients and proximal steps over tensor lists";
  m.def("inspect", &inspect, "(acc_double, requires_grad, contiguous) of a valid list, else None");
  m.def("first_overlap", &first_overlap, "(i, j) of the first two tensors sharing memory, or None");
  m.def("grads_ready", &grads_ready, "every tensor has a dense contiguous .grad like itself");
  m.def("reduce", &reduce, "per-tensor norms or the weighted penalty", py::arg("tensors"),
        py::arg("op"), py::arg("weights"), py::arg("acc_double"), py::arg("stream") = 0);
  m.def("grad", &grad, "a*sign(x)+b*x per tensor, as views of one flat buffer per dtype",
        py::arg("tensors"), py::arg("scales"), py::arg("acc_double"), py::arg("stream") = 0);
  m.def("add_grad_", &add_grad_, "grads[i] += a*sign(x)+b*x in place", py::arg("grads"),
        py::arg("tensors"), py::arg("scales"), py::arg("acc_double"), py::arg("stream") = 0);
  m.def("prox_l1_", &prox_l1_, "in-place soft-thresholding", py::arg("tensors"),
        py::arg("thresholds"), py::arg("acc_double"), py::arg("stream") = 0);
  m.def("metadata", &metadata, "(int64 table on the device, number of chunks)", py::arg("tensors"),
        py::arg("chunk_size"));
  m.def("empty_cache", [] { cpu_grad_pool().clear(); },
        "release the CPU gradient buffers kept for reuse");
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled in");
  m.attr("CPU_CHUNK_SIZE") = cpu::kChunkSize;
}
