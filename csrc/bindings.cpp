// The only file that includes torch: list inspection, argument checks, the metadata
// cache, allocation, the device guard and the dispatch to the CPU kernels or the CUDA
// launchers. The CUDA stream and whether it is capturing a graph come from Python
// (regfuse/device_cache.py::current_stream), so this file needs no CUDA headers and
// builds against a CPU-only torch.
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <list>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cpu/kernels.h"
#include "multi_tensor.h"
#include "regfuse.h"
// The CUDA launchers: compiled by nvcc (REGFUSE_WITH_CUDA), or, in a build without CUDA,
// the same kernels compiled for the CPU through csrc/cuda/simt_cpu.h
// (REGFUSE_WITH_CUDA_EMULATION), which run CPU tensors on request (`emulated_cuda`).
#if defined(REGFUSE_WITH_CUDA) || defined(REGFUSE_WITH_CUDA_EMULATION)
#define REGFUSE_CUDA_KERNELS
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

// Whether the kernels may read the tensor through its data pointer. A tensor subclass with
// __torch_dispatch__ (DTensor, FakeTensor, wrapper subclasses in general) has no storage of
// its own to read, or one whose meaning only its Python code knows; a nested tensor has no
// flat data either. The Python checks name the type in their error.
bool readable(const at::Tensor& t) {
  return !t.key_set().has(c10::DispatchKey::Python) && !t.is_nested() && t.has_storage();
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
    if (!readable(t)) return py::none();
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
    if (!readable(t) || !g.defined() || !readable(g) || g.layout() != at::kStrided || !g.is_contiguous() ||
        g.scalar_type() != t.scalar_type() || g.device() != t.device() || g.sizes() != t.sizes()) {
      return false;
    }
  }
  return true;
}

// The .grad of every tensor of the list that has one, in list order: clip_grad_norm_'s
// `[p.grad for p in params if p.grad is not None]` without a Python loop (which costs
// more than the fused kernels on 2,000 small tensors). None when the argument is not a
// list of tensors; the Python loop then says what is wrong.
py::object defined_grads(py::handle list) {
  if (!PyList_Check(list.ptr())) return py::none();
  const Py_ssize_t n = PyList_GET_SIZE(list.ptr());
  py::list grads;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(list.ptr(), i);
    if (!THPVariable_Check(item)) return py::none();
    const at::Tensor& g = THPVariable_Unpack(item).grad();
    if (g.defined()) grads.append(py::reinterpret_steal<py::object>(THPVariable_Wrap(g)));
  }
  return grads;
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

// ---- argument checks -------------------------------------------------------------------
// The kernels take raw pointers, so everything they read is checked here, whoever calls
// (regfuse.ops or regfuse._C directly): a bad argument raises before any kernel runs
// instead of reading past a buffer or dereferencing a host pointer on the device.

// A non-empty list of dense, contiguous tensors of supported dtypes on one device.
void check_list(const std::vector<at::Tensor>& tensors, const char* what) {
  TORCH_CHECK_VALUE(!tensors.empty(), "regfuse: the list of ", what, "s is empty");
  const at::Device device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_TYPE(t.defined() && t.layout() == at::kStrided && dtype_code(t.scalar_type()) >= 0,
                     "regfuse: ", what, " ", i, " must be a dense float32, float64, float16 or "
                     "bfloat16 tensor, got ", t.defined() ? t.toString() : "an undefined tensor");
    TORCH_CHECK_VALUE(t.device() == device, "regfuse: ", what, " ", i, " is on ", t.device(), ", ",
                      what, " 0 on ", device);
    TORCH_CHECK_VALUE(t.is_contiguous(), "regfuse: ", what, " ", i, " is not contiguous");
  }
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(), "regfuse: unsupported device ", device);
}

// Gradients that the kernels write through: one per tensor, each dense and shaped, typed
// and placed like its tensor (contiguity is check_list's).
void check_matching(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK_VALUE(grads.size() == tensors.size(), "regfuse: ", grads.size(), " gradients for ",
                    tensors.size(), " tensors; one gradient per tensor");
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_TYPE(g.defined() && g.layout() == at::kStrided, "regfuse: gradient ", i,
                     " must be a dense tensor, got ", g.defined() ? g.toString() : "an undefined tensor");
    TORCH_CHECK_VALUE(g.sizes() == t.sizes() && g.scalar_type() == t.scalar_type() &&
                          g.device() == t.device(),
                      "regfuse: gradient ", i, " (", g.sizes(), ", ", g.scalar_type(), ", ", g.device(),
                      ") does not match its tensor (", t.sizes(), ", ", t.scalar_type(), ", ",
                      t.device(), ")");
  }
}

// A table of per-tensor numbers the kernels index by table entry: `rows` x n (one row:
// shape (n,)) in the accumulation dtype on the tensors' device, n the number of entries
// (`entries`; by default one per tensor); returned contiguous.
at::Tensor per_tensor_table(const c10::optional<at::Tensor>& table, const char* name, int64_t rows,
                            const std::vector<at::Tensor>& tensors, bool acc_double,
                            int64_t entries = -1) {
  const int64_t n = entries >= 0 ? entries : static_cast<int64_t>(tensors.size());
  const at::ScalarType acc = acc_double ? at::kDouble : at::kFloat;
  const std::vector<int64_t> shape = rows == 1 ? std::vector<int64_t>{n} : std::vector<int64_t>{rows, n};
  TORCH_CHECK_VALUE(table.has_value() && table->defined(), "regfuse: ", name, " are required");
  const at::Tensor& t = *table;
  TORCH_CHECK_VALUE(t.layout() == at::kStrided && t.sizes() == c10::IntArrayRef(shape) &&
                        t.scalar_type() == acc && t.device() == tensors[0].device(),
                    "regfuse: ", name, " must be a dense ", c10::IntArrayRef(shape), " ", acc,
                    " tensor on ", tensors[0].device(), " (the accumulation dtype of the list), got ",
                    t.sizes(), " ", t.scalar_type(), " on ", t.device());
  return t.contiguous();
}

// ---- table entries: the tensors, or their rows ---------------------------------------

// Rows of a tensor along dim 0, the groups of the group ops: a 0-d tensor is one row
// (regfuse/backends/base.py::row_counts).
int64_t rows_of(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(0); }

// Entries of a table over `tensors`, whose data pointers are `ptrs`: the tensors
// themselves, or with `by_rows` their rows (multi_tensor.h::row_entries).
Entries entries_of(const std::vector<at::Tensor>& tensors, std::vector<int64_t> ptrs, bool by_rows) {
  const size_t n = tensors.size();
  std::vector<int64_t> numels(n), dtypes(n);
  for (size_t i = 0; i < n; ++i) {
    numels[i] = tensors[i].numel();
    dtypes[i] = dtype_code(tensors[i].scalar_type());
  }
  if (!by_rows) return Entries{std::move(ptrs), std::move(numels), std::move(dtypes), {}};
  std::vector<int64_t> rows(n), row_numels(n);
  for (size_t i = 0; i < n; ++i) {
    rows[i] = rows_of(tensors[i]);
    row_numels[i] = rows[i] == 0 ? 0 : numels[i] / rows[i];
  }
  return row_entries(ptrs, rows, row_numels, dtypes);
}

std::vector<int64_t> data_ptrs(const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> ptrs;
  ptrs.reserve(tensors.size());
  for (const at::Tensor& t : tensors) ptrs.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  return ptrs;
}

int64_t num_entries(const std::vector<at::Tensor>& tensors, bool by_rows) {
  if (!by_rows) return static_cast<int64_t>(tensors.size());
  int64_t total = 0;
  for (const at::Tensor& t : tensors) total += rows_of(t);
  return total;
}

// ---- metadata cache ------------------------------------------------------------------
// Keyed by everything the table is computed from (chunk size, device, data pointers,
// sizes, dtypes, and row counts for a table over rows) and by the stream that uses it, so
// a hit is always the right table; a training loop that passes the same parameters every
// step pays one host build and one upload in all.
//
// No host synchronization: a miss uploads from pinned memory with a non-blocking copy on
// the current stream, and the pinned block stays in the entry (alive as long as the
// table; the caching host allocator also defers its reuse until the copy is done).
//
// Streams: an entry is made and used on one stream only (the stream is part of the key),
// so freeing it on eviction is ordered after its last use by the CUDA caching allocator,
// which recycles a block only for later work on the stream it was allocated on.
//
// CUDA graphs: a captured kernel reads the table at the same address on every replay,
// and a table first made during capture is uploaded by a copy recorded in the graph. So
// an entry used while the stream is capturing becomes permanent: never evicted, never
// freed (with its pinned source). During capture, a table made on another stream (the
// usual warm-up on a side stream) is taken rather than built again.

struct Metadata {
  at::Tensor table;  // int64, on the tensors' device
  at::Tensor host;   // the same table on the host (pinned for CUDA: the upload's source)
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
  Metadata get(const std::vector<at::Tensor>& tensors, int64_t chunk_size, int64_t stream, bool capturing,
               bool by_rows) {
    const int64_t n = static_cast<int64_t>(tensors.size());
    const at::Device device = tensors[0].device();
    std::vector<int64_t> key;
    key.reserve(4 * n + kHeader);
    key.push_back(chunk_size);
    key.push_back(static_cast<int64_t>(device.type()));
    key.push_back(device.index());
    key.push_back(stream);  // kStreamSlot
    key.push_back(by_rows);  // kRowsSlot
    for (const at::Tensor& t : tensors) key.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
    for (const at::Tensor& t : tensors) key.push_back(t.numel());
    for (const at::Tensor& t : tensors) key.push_back(dtype_code(t.scalar_type()));
    if (by_rows) {
      for (const at::Tensor& t : tensors) key.push_back(rows_of(t));
    }

    std::lock_guard<std::mutex> lock(mutex_);
    const auto permanent = permanent_.find(key);
    if (permanent != permanent_.end()) return permanent->second;
    const auto found = index_.find(key);
    if (found != index_.end()) {
      const Metadata meta = found->second->second;
      if (capturing) {
        entries_.erase(found->second);
        index_.erase(found);
        permanent_.emplace(std::move(key), meta);
      } else {
        entries_.splice(entries_.begin(), entries_, found->second);
      }
      return meta;
    }
    if (capturing) {
      const Metadata* other = made_on_another_stream(key);
      if (other != nullptr) {
        const Metadata meta = *other;
        permanent_.emplace(std::move(key), meta);
        return meta;
      }
    }
    const Metadata meta = build(tensors, key, n, chunk_size, device);
    if (capturing) {
      permanent_.emplace(std::move(key), meta);
    } else {
      entries_.emplace_front(std::move(key), meta);
      index_[entries_.front().first] = entries_.begin();
      if (entries_.size() > kCapacity) {
        index_.erase(entries_.back().first);
        entries_.pop_back();
      }
    }
    return meta;
  }

 private:
  static constexpr size_t kCapacity = 64;
  static constexpr size_t kHeader = 5;      // chunk size, device type, device index, stream, rows
  static constexpr size_t kStreamSlot = 3;
  static constexpr size_t kRowsSlot = 4;

  static Metadata build(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& key,
                        int64_t n, int64_t chunk_size, const at::Device& device) {
    const auto first = key.begin() + kHeader;
    const Entries entries = entries_of(tensors, std::vector<int64_t>(first, first + n), key[kRowsSlot] != 0);
    Metadata meta;
    const std::vector<int64_t> host = build_metadata(entries, chunk_size, &meta.layout);
    flat_sizes(host.data(), meta.layout, meta.flat_size);
    const auto size = static_cast<int64_t>(host.size());
    meta.host = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(device.is_cuda()));
    std::copy(host.begin(), host.end(), meta.host.data_ptr<int64_t>());
    if (device.is_cuda()) {
      // Issued on the device's current stream, the one the kernels run on.
      meta.table = at::empty({size}, at::TensorOptions().dtype(at::kLong).device(device));
      meta.table.copy_(meta.host, /*non_blocking=*/true);
    } else {
      meta.table = meta.host;
    }
    return meta;
  }

  static bool same_but_stream(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
    if (a.size() != b.size()) return false;
    for (size_t k = 0; k < a.size(); ++k) {
      if (k != kStreamSlot && a[k] != b[k]) return false;
    }
    return true;
  }

  const Metadata* made_on_another_stream(const std::vector<int64_t>& key) const {
    for (const Entry& entry : entries_) {
      if (same_but_stream(entry.first, key)) return &entry.second;
    }
    for (const auto& entry : permanent_) {
      if (same_but_stream(entry.first, key)) return &entry.second;
    }
    return nullptr;
  }

  using Entry = std::pair<std::vector<int64_t>, Metadata>;
  std::mutex mutex_;
  std::list<Entry> entries_;  // most recently used first
  std::unordered_map<std::vector<int64_t>, std::list<Entry>::iterator, KeyHash> index_;
  std::unordered_map<std::vector<int64_t>, Metadata, KeyHash> permanent_;  // used by CUDA graphs
};

MetadataCache& metadata_cache() {
  static MetadataCache cache;
  return cache;
}

bool on_cuda(const std::vector<at::Tensor>& tensors) { return tensors[0].device().is_cuda(); }

// Whether a call on a checked list runs the CUDA launchers: for CUDA tensors, and with
// `emulated_cuda` for CPU tensors, where the build has the CPU-compiled CUDA kernels.
bool uses_cuda_kernels(const std::vector<at::Tensor>& tensors, bool emulated_cuda) {
#ifndef REGFUSE_WITH_CUDA
  TORCH_CHECK(!on_cuda(tensors), "regfuse: this build of the extension has no CUDA kernels");
#endif
  if (!emulated_cuda) return on_cuda(tensors);
#ifdef REGFUSE_WITH_CUDA_EMULATION
  TORCH_CHECK_VALUE(tensors[0].device().is_cpu(), "regfuse: the emulated CUDA kernels run CPU tensors only, got ",
                    tensors[0].device());
  return true;
#else
  TORCH_CHECK(false, "regfuse: this build of the extension has no emulated CUDA kernels");
#endif
}

// The table of a checked list (check_list) for the CUDA kernels or the CPU ones; with
// `rows`, over the rows of its tensors.
Metadata metadata_for(const std::vector<at::Tensor>& tensors, bool cuda_kernels, int64_t stream,
                      bool capturing, bool rows = false) {
  int64_t chunk_size = cpu::kChunkSize;
#ifdef REGFUSE_CUDA_KERNELS
  if (cuda_kernels) chunk_size = cuda::kChunkSize;
#endif
  return metadata_cache().get(tensors, chunk_size, stream, capturing, rows);
}

#ifdef REGFUSE_CUDA_KERNELS
void check_cuda_status(const char* error) { TORCH_CHECK(error == nullptr, "regfuse CUDA kernel: ", error); }

void* stream_ptr(int64_t stream) { return reinterpret_cast<void*>(stream); }

// The counter of the reductions launched on a stream (launchers.h::reduce), one per device,
// stream and graph capture, zeroed once when made (a fill queued on that stream before its
// first reduction) and left at zero by every launch, so no call clears it. Launches on one
// stream run one after another; another stream's, or another graph's (two graphs captured
// on one stream may be replayed at once on two), have counters of their own. A counter
// made while capturing is zeroed by a fill node of the graph (once per replay, before its
// first reduction on that stream) and lives as long as the process: the graph may be
// replayed any time.
unsigned int* reduce_counter(const at::Device& device, int64_t stream, bool capturing) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int64_t, unsigned long long>, at::Tensor> counters;
  const unsigned long long capture = capturing ? cuda::capture_id(stream_ptr(stream)) : 0;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(static_cast<int>(device.type()), static_cast<int>(device.index()), stream, capture);
  auto found = counters.find(key);
  if (found == counters.end()) {
    found = counters.emplace(key, at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device))).first;
  }
  return reinterpret_cast<unsigned int*>(found->second.data_ptr<int32_t>());
}
#endif

// ---- ops -------------------------------------------------------------------------------

// `stream` is the current CUDA stream of the tensors' device (0 for CPU tensors) and
// `capturing` whether it is capturing a CUDA graph (see MetadataCache). `rows`: the
// table's entries are the rows of the tensors (per-row results and scales).
at::Tensor reduce(const std::vector<at::Tensor>& tensors, int64_t op,
                  const c10::optional<at::Tensor>& weights, bool acc_double, int64_t stream,
                  bool capturing, double p, bool rows, bool emulated_cuda) {
  check_list(tensors, "tensor");
  const bool cuda_kernels = uses_cuda_kernels(tensors, emulated_cuda);
  TORCH_CHECK_VALUE(op >= kL1 && op <= kL1L2, "regfuse: unknown reduction ", op);
  TORCH_CHECK_VALUE(!(rows && op == kPenalty), "regfuse: the penalty reduction takes per-tensor weights, not rows");
  TORCH_CHECK_VALUE(op != kLp || (p > 0 && std::isfinite(p)),
                    "regfuse: the order of kLp must be a finite p > 0, got ", p);
  // Only kPenalty reads weights: (2, n).
  const at::Tensor w = op == kPenalty ? per_tensor_table(weights, "weights", 2, tensors, acc_double)
                                      : at::Tensor();
  const void* w_ptr = w.defined() ? w.data_ptr() : nullptr;
  const Metadata meta = metadata_for(tensors, cuda_kernels, stream, capturing, rows);
  c10::DeviceGuard guard(tensors[0].device());
  const auto options = tensors[0].options().dtype(acc_double ? at::kDouble : at::kFloat);
  const int64_t entries = meta.layout.num_tensors;
  at::Tensor out = op == kPenalty ? at::empty({}, options)
                   : op == kL1L2  ? at::empty({2, entries}, options)
                                  : at::empty({entries}, options);
  const int64_t* table = meta.table.data_ptr<int64_t>();
  if (cuda_kernels) {
#ifdef REGFUSE_CUDA_KERNELS
    at::Tensor workspace = at::empty(
        {static_cast<int64_t>(cuda::reduce_workspace_bytes(meta.layout, acc_double))},
        tensors[0].options().dtype(at::kByte));
    unsigned int* counter = reduce_counter(tensors[0].device(), stream, capturing);
    py::gil_scoped_release no_gil;  // an emulated launch runs for a while
    check_cuda_status(cuda::reduce(table, meta.layout, static_cast<int>(op), w_ptr, acc_double, p,
                                   workspace.data_ptr(), counter, out.data_ptr(), stream_ptr(stream)));
#endif
  } else {
    py::gil_scoped_release no_gil;
    cpu::reduce(table, meta.layout, static_cast<int>(op), w_ptr, acc_double, p, out.data_ptr());
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

// Gradient outputs shaped like `tensors`: views of one flat buffer per dtype, tensor i at
// the table's (aligned) flat_offset of its first entry, where the CUDA kernels write it
// (its rows follow it in the same slot); with each view's data pointer.
struct GradOutputs {
  std::vector<at::Tensor> grads;
  std::vector<int64_t> ptrs;
  void* base[kNumDTypes] = {nullptr, nullptr, nullptr, nullptr};
};

GradOutputs allocate_grads(const std::vector<at::Tensor>& tensors, const Metadata& meta, bool rows) {
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
  const int64_t* flat_offset = meta.host.data_ptr<int64_t>() + meta.layout.flat_offset();
  int64_t entry = 0;  // the first entry of tensor i
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const int64_t d = dtype_code(t.scalar_type());
    if (t.numel() == 0) {  // no flat buffer exists for a dtype whose tensors are all empty
      out.grads.push_back(at::empty(t.sizes(), t.options()));
    } else {
      out.grads.push_back(flat[d].narrow(0, flat_offset[entry], t.numel()).view(t.sizes()));
    }
    out.ptrs.push_back(reinterpret_cast<int64_t>(out.grads.back().data_ptr()));
    entry += rows ? rows_of(t) : 1;
  }
  return out;
}

// Launches the fused gradient; with `into` it adds to those tensors, else it returns new
// gradients (views of one flat buffer per dtype).
std::vector<at::Tensor> run_backward(const std::vector<at::Tensor>& tensors, const at::Tensor& scales,
                                     bool acc_double, const std::vector<at::Tensor>* into,
                                     int64_t stream, bool capturing, bool rows, bool emulated_cuda) {
  check_list(tensors, "tensor");
  const bool cuda_kernels = uses_cuda_kernels(tensors, emulated_cuda);
  if (into != nullptr) {
    check_matching(*into, tensors);
    check_list(*into, "gradient");
  }
  const at::Tensor s = per_tensor_table(scales, "scales", 2, tensors, acc_double, num_entries(tensors, rows));
  const Metadata meta = metadata_for(tensors, cuda_kernels, stream, capturing, rows);
  c10::DeviceGuard guard(tensors[0].device());
  const int64_t* table = meta.table.data_ptr<int64_t>();
  if (cuda_kernels) {
#ifdef REGFUSE_CUDA_KERNELS
    GradOutputs out;
    const int64_t* out_table = nullptr;
    Metadata out_meta;
    if (into != nullptr) {
      out_meta = metadata_for(*into, true, stream, capturing, rows);
      out_table = out_meta.table.data_ptr<int64_t>();
    } else {
      out = allocate_grads(tensors, meta, rows);
    }
    py::gil_scoped_release no_gil;
    check_cuda_status(cuda::backward(table, meta.layout, s.data_ptr(), acc_double, out_table,
                                     out.base, stream_ptr(stream)));
    return std::move(out.grads);
#endif
  }
  GradOutputs out;
  if (into != nullptr) {
    out.ptrs = data_ptrs(*into);
  } else {
    out = allocate_grads(tensors, meta, rows);
  }
  if (rows) out.ptrs = entries_of(tensors, std::move(out.ptrs), true).ptrs;  // one per row
  {
    py::gil_scoped_release no_gil;
    cpu::backward(table, meta.layout, s.data_ptr(), acc_double, out.ptrs.data(), into != nullptr);
  }
  return std::move(out.grads);
}

std::vector<at::Tensor> grad(const std::vector<at::Tensor>& tensors, const at::Tensor& scales,
                             bool acc_double, int64_t stream, bool capturing, bool rows, bool emulated_cuda) {
  return run_backward(tensors, scales, acc_double, nullptr, stream, capturing, rows, emulated_cuda);
}

void add_grad_(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& tensors,
               const at::Tensor& scales, bool acc_double, int64_t stream, bool capturing, bool rows,
               bool emulated_cuda) {
  run_backward(tensors, scales, acc_double, &grads, stream, capturing, rows, emulated_cuda);
}

// The in-place element-wise ops: each element of entry i is updated with per_tensor[i]
// (entries: the tensors, or with `rows` their rows).
enum class InPlace { kProxL1, kScale, kBlockShrink, kSparseBlockShrink };

void update_in_place(const std::vector<at::Tensor>& tensors, const at::Tensor& per_tensor,
                     const char* name, bool acc_double, int64_t stream, bool capturing, InPlace kind,
                     bool rows = false, bool emulated_cuda = false) {
  check_list(tensors, "tensor");
  const bool cuda_kernels = uses_cuda_kernels(tensors, emulated_cuda);
  const bool sparse = kind == InPlace::kSparseBlockShrink;
  const at::Tensor t =
      per_tensor_table(per_tensor, name, sparse ? 2 : 1, tensors, acc_double, num_entries(tensors, rows));
  // On a GPU the block soft-threshold is the row norms and the per-row scale (two
  // launches, see regfuse/groups.py): a block cannot scale a row that other blocks sum.
  TORCH_CHECK_VALUE((kind != InPlace::kBlockShrink && !sparse) || !cuda_kernels,
                    "regfuse: block_shrink_ runs on CPU tensors only");
  const Metadata meta = metadata_for(tensors, cuda_kernels, stream, capturing, rows);
  c10::DeviceGuard guard(tensors[0].device());
  const int64_t* table = meta.table.data_ptr<int64_t>();
  if (cuda_kernels) {
#ifdef REGFUSE_CUDA_KERNELS
    const auto launch = kind == InPlace::kScale ? cuda::scale : cuda::prox_l1;
    py::gil_scoped_release no_gil;
    check_cuda_status(launch(table, meta.layout, t.data_ptr(), acc_double, stream_ptr(stream)));
#endif
  } else {
    py::gil_scoped_release no_gil;
    switch (kind) {
      case InPlace::kProxL1: return cpu::prox_l1(table, meta.layout, t.data_ptr(), acc_double);
      case InPlace::kScale: return cpu::scale(table, meta.layout, t.data_ptr(), acc_double);
      case InPlace::kBlockShrink:
      case InPlace::kSparseBlockShrink:
        return cpu::block_shrink(table, meta.layout, t.data_ptr(), sparse, acc_double);
    }
  }
}

void prox_l1_(const std::vector<at::Tensor>& tensors, const at::Tensor& thresholds, bool acc_double,
              int64_t stream, bool capturing, bool emulated_cuda) {
  update_in_place(tensors, thresholds, "thresholds", acc_double, stream, capturing, InPlace::kProxL1, false,
                  emulated_cuda);
}

// With `rows`, one factor per row: block soft-thresholding scales each group by its factor.
void scale_(const std::vector<at::Tensor>& tensors, const at::Tensor& factors, bool acc_double,
            int64_t stream, bool capturing, bool rows, bool emulated_cuda) {
  update_in_place(tensors, factors, "factors", acc_double, stream, capturing, InPlace::kScale, rows,
                  emulated_cuda);
}

// One pass per row: its norm, then the row scaled by max(0, 1 - thresholds[row] / norm);
// with soft_threshold_first, thresholds is (2, rows) and each row is first soft-thresholded
// by thresholds[1][row].
void block_shrink_(const std::vector<at::Tensor>& tensors, const at::Tensor& thresholds,
                   bool soft_threshold_first, bool acc_double) {
  update_in_place(tensors, thresholds, "thresholds", acc_double, 0, false,
                  soft_threshold_first ? InPlace::kSparseBlockShrink : InPlace::kBlockShrink, true);
}

// The cached table for a list (or its rows) and a chunk size, for the Triton kernels.
py::tuple metadata(const std::vector<at::Tensor>& tensors, int64_t chunk_size, int64_t stream,
                   bool capturing, bool rows) {
  check_list(tensors, "tensor");
  TORCH_CHECK_VALUE(chunk_size > 0 && chunk_size % (kAlignment / kElementSize[kFloat16]) == 0,
                    "regfuse: the chunk size must be a positive multiple of 8 elements, got ", chunk_size);
  const Metadata meta = metadata_cache().get(tensors, chunk_size, stream, capturing, rows);
  return py::make_tuple(meta.table, meta.layout.num_chunks);
}

bool built_with_cuda() {
#ifdef REGFUSE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool built_with_cuda_emulation() {
#ifdef REGFUSE_WITH_CUDA_EMULATION
  return true;
#else
  return false;
#endif
}

#ifdef REGFUSE_WITH_CUDA_EMULATION
// Settings of the emulated CUDA launches, for tests (launchers.h::configure_emulation).
void configure_cuda_emulation(bool threads, const std::string& block_order, uint64_t seed, unsigned int grid) {
  static const std::map<std::string, int> kOrders = {{"forward", 0}, {"reversed", 1}, {"shuffled", 2}};
  const auto order = kOrders.find(block_order);
  TORCH_CHECK_VALUE(order != kOrders.end(), "regfuse: block_order must be 'forward', 'reversed' or 'shuffled', got ",
                    block_order);
  cuda::configure_emulation(threads, order->second, seed, grid);
}
#endif

}  // namespace
}  // namespace regfuse

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace regfuse;
  m.doc() = "regfuse kernels: fused reductions, gradients and proximal steps over tensor lists";
  m.def("inspect", &inspect, "(acc_double, requires_grad, contiguous) of a valid list, else None");
  m.def("first_overlap", &first_overlap, "(i, j) of the first two tensors sharing memory, or None");
  m.def("grads_ready", &grads_ready, "every tensor has a dense contiguous .grad like itself");
  m.def("defined_grads", &defined_grads, "the .grad of each tensor that has one, else None");
  m.def("check_gradients", &check_matching, "raise unless grads[i] is dense and like tensors[i]",
        py::arg("grads"), py::arg("tensors"));
  // stream: the current CUDA stream's handle (0 on the CPU); capturing: whether it is
  // capturing a CUDA graph. Both key and pin the cached tables (MetadataCache). rows: the
  // table's entries are the rows of each tensor along dim 0 (per-row results, scales and
  // factors).
  // emulated_cuda: CPU tensors through the CUDA launchers compiled for the CPU
  // (built_with_cuda_emulation()).
  m.def("reduce", &reduce, "per-entry norms or the weighted penalty", py::arg("tensors"),
        py::arg("op"), py::arg("weights"), py::arg("acc_double"), py::arg("stream") = 0,
        py::arg("capturing") = false, py::arg("p") = 0.0, py::arg("rows") = false,
        py::arg("emulated_cuda") = false);
  m.def("grad", &grad, "a*sign(x)+b*x per entry, as views of one flat buffer per dtype",
        py::arg("tensors"), py::arg("scales"), py::arg("acc_double"), py::arg("stream") = 0,
        py::arg("capturing") = false, py::arg("rows") = false, py::arg("emulated_cuda") = false);
  m.def("add_grad_", &add_grad_, "grads[i] += a*sign(x)+b*x in place", py::arg("grads"),
        py::arg("tensors"), py::arg("scales"), py::arg("acc_double"), py::arg("stream") = 0,
        py::arg("capturing") = false, py::arg("rows") = false, py::arg("emulated_cuda") = false);
  m.def("prox_l1_", &prox_l1_, "in-place soft-thresholding", py::arg("tensors"),
        py::arg("thresholds"), py::arg("acc_double"), py::arg("stream") = 0,
        py::arg("capturing") = false, py::arg("emulated_cuda") = false);
  m.def("scale_", &scale_, "in-place x *= factors[i]; entries with factor 1 untouched",
        py::arg("tensors"), py::arg("factors"), py::arg("acc_double"), py::arg("stream") = 0,
        py::arg("capturing") = false, py::arg("rows") = false, py::arg("emulated_cuda") = false);
  m.def("block_shrink_", &block_shrink_, "in-place block soft-thresholding of the rows, one pass (CPU)",
        py::arg("tensors"), py::arg("thresholds"), py::arg("soft_threshold_first"), py::arg("acc_double"));
  m.def("metadata", &metadata, "(int64 table on the device, number of chunks)", py::arg("tensors"),
        py::arg("chunk_size"), py::arg("stream") = 0, py::arg("capturing") = false,
        py::arg("rows") = false);
  m.def("empty_cache", [] { cpu_grad_pool().clear(); },
        "release the CPU gradient buffers kept for reuse");
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled in");
  m.def("built_with_cuda_emulation", &built_with_cuda_emulation,
        "whether the CUDA kernels were compiled for the CPU (emulated_cuda)");
#ifdef REGFUSE_WITH_CUDA_EMULATION
  m.def("configure_cuda_emulation", &configure_cuda_emulation,
        "emulated launches: threads as OS threads (else fibers), block order, shuffle seed, forced grid (0: none)",
        py::arg("threads") = false, py::arg("block_order") = "forward", py::arg("seed") = 0, py::arg("grid") = 0);
  m.def("cuda_emulation_launches", &cuda::emulated_launches, "emulated CUDA kernel launches so far");
#endif
  m.attr("CPU_CHUNK_SIZE") = cpu::kChunkSize;
}
