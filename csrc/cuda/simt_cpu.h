// A CPU emulation of the SIMT subset that csrc/cuda/kernels.cu uses, so that the very same
// kernels run without a GPU (tests, sanitizers). Included through simt.h when the file is
// compiled by a host C++ compiler instead of nvcc; the kernels contain no emulation code.
//
// What it provides: threadIdx / blockIdx / blockDim / gridDim (x only; y = z = 0 / 1),
// __syncthreads, __shfl_down_sync (lane l receives lane l + offset's value, its own past
// the end of the warp, as CUDA's width-32 rule), __shared__ storage (one copy, used by one
// block at a time), __ldcg / __stwb, atomicAdd / atomicExch on unsigned int,
// __threadfence, cudaGetLastError / cudaGetErrorString, cudaStreamGetCaptureInfo (never
// capturing), and the launch (simt.h's REGFUSE_LAUNCH).
//
// How it runs a launch: one block after another, in an order set by Config (grid order,
// reversed, or shuffled with a seed: a reduction must not depend on it). The threads of a
// block run either
//   - as fibers on the calling thread (Mode::kFibers, the default; fast): each fiber runs
//     until its next __syncthreads or shuffle, so every thread really waits for the others
//     there; or
//   - as real threads (Mode::kThreads), one OS thread per CUDA thread, for
//     ThreadSanitizer: two threads touching one __shared__ address with no barrier
//     between them is a reported data race.
// Launches are serialized process-wide (one block runs at a time), which is what lets a
// single static copy of each __shared__ array serve every block.
//
// What it does not model: the GPU memory model (every access is sequentially consistent
// here, so a missing __threadfence or a stale L1 line goes unseen), independent thread
// scheduling within a warp (lanes diverge and reconverge freely; a shuffle is a warp-wide
// rendezvous, and its mask is not checked), timing and occupancy, streams (a launch runs
// to completion before returning), dynamic shared memory, y/z dimensions, and the
// address spaces (a host pointer "on the device" is not an error). Fibers run in thread
// order turn some missing __syncthreads into wrong results, not all (a missing barrier
// between the last reads of a __shared__ array and its next writes goes unseen): those
// need Mode::kThreads under ThreadSanitizer.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::sqrt;

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };

namespace regfuse {
namespace simt {

enum class Mode { kFibers, kThreads };
enum class BlockOrder { kForward, kReversed, kShuffled };

// Settings of the emulation, for tests (exposed by the binding): how threads run, the
// order of the blocks, and a grid size that replaces every launch's (0: the launch's own;
// the kernels loop over their work with a grid stride, so any grid is correct).
struct Config {
  Mode mode = Mode::kFibers;
  BlockOrder order = BlockOrder::kForward;
  uint64_t seed = 0;
  unsigned int grid = 0;
  uint64_t launches = 0;  // kernel launches so far
};

struct Dim3 {
  unsigned int x, y, z;
};

// What a CUDA thread sees: its indices, and the block it belongs to.
struct ThreadState;
struct Block;

inline Config& config() {
  static Config c;
  return c;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline cudaError_t& last_error() {
  static thread_local cudaError_t error = cudaSuccess;
  return error;
}

// ---- barriers ---------------------------------------------------------------------------
// A barrier over the live threads of a group (the block, or one warp): a thread that
// returns from the kernel stops counting, as on the GPU.

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
  std::mutex mutex;  // Mode::kThreads only
  std::condition_variable released;
  std::vector<ThreadState*> waiters;  // Mode::kFibers only
};

// The threads of a block and the state they share.
struct Block {
  Dim3 block_idx{0, 0, 1};
  Dim3 block_dim{1, 1, 1};
  Dim3 grid_dim{1, 1, 1};
  Mode mode = Mode::kFibers;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  // Shuffle exchange: two buffers per warp used alternately, so that one rendezvous per
  // shuffle suffices (a lane can only overwrite a buffer after every lane of its warp has
  // passed the next shuffle's rendezvous, i.e. read the previous one).
  std::vector<uint64_t> exchange;  // [warp][parity][lane]
  std::vector<ThreadState> threads;
};

struct ThreadState {
  Dim3 thread_idx{0, 0, 1};
  Block* block = nullptr;
  int parity = 0;  // next shuffle buffer
  // Mode::kFibers
  void* stack_pointer = nullptr;
  unsigned char* stack = nullptr;  // kFiberStackBytes, from fiber_stack()
  Barrier* waiting = nullptr;  // the barrier this fiber waits at, or nullptr
  bool done = false;
  std::function<void()>* body = nullptr;
};

// The CUDA thread running here. Fibers: one block at a time in the whole process (launches
// are serialized), so a plain global is enough, and much cheaper than a TLS read in a
// shared library; OS threads: one per thread.
struct Current {
  static inline bool threads = false;  // the running launch's mode
  static inline ThreadState* fiber = nullptr;
  static inline thread_local ThreadState* thread = nullptr;
};

inline ThreadState* current() { return Current::threads ? Current::thread : Current::fiber; }

// ---- fibers -----------------------------------------------------------------------------

#if defined(__x86_64__)
// switch_stack(save, next): saves the callee-saved registers, the SSE and x87 control
// words and the stack pointer in *save, then resumes the context whose stack pointer is
// next (System V x86-64 ABI).
extern "C" void regfuse_simt_switch(void** save, void* next);
extern "C" void regfuse_simt_fiber_entry();
asm(R"(
  .text
  .globl regfuse_simt_switch
  .type regfuse_simt_switch,@function
regfuse_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size regfuse_simt_switch, .-regfuse_simt_switch
  .globl regfuse_simt_fiber_entry
  .type regfuse_simt_fiber_entry,@function
regfuse_simt_fiber_entry:
  movq %rbx, %rdi
  call regfuse_simt_fiber_main
  ud2
  .size regfuse_simt_fiber_entry, .-regfuse_simt_fiber_entry
)");
#else
#error "simt_cpu.h: fibers are implemented for x86-64 only"
#endif

inline void*& scheduler_stack_pointer() {
  static void* sp = nullptr;  // fibers run on the launching thread, one launch at a time
  return sp;
}

inline void yield_to_scheduler(ThreadState* t) { regfuse_simt_switch(&t->stack_pointer, scheduler_stack_pointer()); }

// Reached from regfuse_simt_fiber_entry only (one translation unit includes this header).
extern "C" __attribute__((used)) void regfuse_simt_fiber_main(ThreadState* t) {
  (*t->body)();
  t->done = true;
  yield_to_scheduler(t);
  std::abort();  // a finished fiber is never resumed
}

constexpr size_t kFiberStackBytes = 64 * 1024;

// The stack of fiber i, kept for the next launches on this OS thread (allocating and
// faulting in 256 fresh stacks per launch would cost more than most kernels).
inline unsigned char* fiber_stack(size_t i) {
  static thread_local std::vector<std::unique_ptr<unsigned char[]>> stacks;
  while (stacks.size() <= i) stacks.emplace_back(new unsigned char[kFiberStackBytes]);
  return stacks[i].get();
}

// A fresh context for t: regfuse_simt_switch "returns" into regfuse_simt_fiber_entry with
// t in rbx and a 16-byte aligned stack.
inline void prepare_fiber(ThreadState* t) {
  auto top = reinterpret_cast<uintptr_t>(t->stack + kFiberStackBytes) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<uint64_t*>(top);
  *--slot = reinterpret_cast<uint64_t>(&regfuse_simt_fiber_entry);  // return address: rsp = top after ret
  *--slot = 0;                                                       // rbp
  *--slot = reinterpret_cast<uint64_t>(t);                           // rbx
  for (int r = 0; r < 4; ++r) *--slot = 0;                           // r12 .. r15
  uint32_t control[2];
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  --slot;
  std::memcpy(slot, control, sizeof(control));
  t->stack_pointer = slot;
  t->done = false;
  t->waiting = nullptr;
}

// Releases the fibers waiting at b once every live fiber of its group is there.
inline void release_if_complete(Barrier& b);

// Runs every fiber of the block in thread order until it waits at a barrier or returns,
// over and over, until all have returned.
inline void run_block_fibers(Block& block, std::function<void()>& body) {
  for (size_t i = 0; i < block.threads.size(); ++i) {
    ThreadState& t = block.threads[i];
    t.body = &body;
    t.stack = fiber_stack(i);
    prepare_fiber(&t);
  }
  for (;;) {
    bool ran = false, all_done = true;
    for (ThreadState& t : block.threads) {
      if (t.done) continue;
      all_done = false;
      if (t.waiting != nullptr) continue;
      Current::fiber = &t;
      regfuse_simt_switch(&scheduler_stack_pointer(), t.stack_pointer);
      Current::fiber = nullptr;
      ran = true;
    }
    if (all_done) return;
    if (!ran) {
      std::fprintf(stderr, "simt_cpu: deadlock in block %u: threads wait at barriers that not every "
                   "live thread of their group reaches (a __syncthreads or shuffle under divergent "
                   "control flow)\n", block.block_idx.x);
      std::abort();
    }
  }
}

// ---- barrier waits, both modes ------------------------------------------------------------

inline void release_if_complete(Barrier& b) {
  if (b.arrived == 0 || b.arrived < b.expected) return;
  for (ThreadState* t : b.waiters) t->waiting = nullptr;
  b.waiters.clear();
  b.arrived = 0;
  ++b.generation;
}

inline void wait_at(Barrier& b) {
  ThreadState* t = current();
  if (t->block->mode == Mode::kFibers) {
    ++b.arrived;
    t->waiting = &b;
    b.waiters.push_back(t);
    release_if_complete(b);  // the last to arrive lets everyone go on, itself included
    if (t->waiting != nullptr) yield_to_scheduler(t);
    return;
  }
  std::unique_lock<std::mutex> lock(b.mutex);
  const uint64_t generation = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    b.released.notify_all();
    return;
  }
  b.released.wait(lock, [&] { return b.generation != generation; });
}

// A thread that returns from the kernel leaves its barriers (Mode::kThreads; the fiber
// scheduler counts live fibers through the expected counts in the same way).
inline void leave(Barrier& b) {
  if (current()->block->mode == Mode::kFibers) {
    --b.expected;
    release_if_complete(b);
    return;
  }
  std::lock_guard<std::mutex> lock(b.mutex);
  --b.expected;
  if (b.arrived > 0 && b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    b.released.notify_all();
  }
}

inline Barrier& warp_barrier() {
  ThreadState* t = current();
  return t->block->warp_barriers[t->thread_idx.x / 32];
}

template <typename T>
inline T shfl_down(T value, unsigned int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "simt_cpu: shuffles of up to 8 bytes");
  ThreadState* t = current();
  Block& block = *t->block;
  const unsigned int lane = t->thread_idx.x % 32;
  const unsigned int warp = t->thread_idx.x / 32;
  const unsigned int warp_lanes = std::min(32u, block.block_dim.x - warp * 32);
  uint64_t* buffer = &block.exchange[(warp * 2 + t->parity) * 32];
  t->parity ^= 1;
  std::memcpy(&buffer[lane], &value, sizeof(T));
  wait_at(warp_barrier());
  const unsigned int source = lane + offset;
  T result = value;
  if (source < warp_lanes) std::memcpy(&result, &buffer[source], sizeof(T));
  return result;
}

// ---- launch -----------------------------------------------------------------------------

inline std::vector<unsigned int> block_order(unsigned int grid) {
  std::vector<unsigned int> order(grid);
  std::iota(order.begin(), order.end(), 0u);
  if (config().order == BlockOrder::kReversed) std::reverse(order.begin(), order.end());
  if (config().order == BlockOrder::kShuffled) std::shuffle(order.begin(), order.end(), std::mt19937_64(config().seed));
  return order;
}

inline void reset_block(Block& block, unsigned int block_idx) {
  const int n = static_cast<int>(block.block_dim.x);
  block.block_idx = {block_idx, 0, 0};
  block.block_barrier.expected = n;
  block.block_barrier.arrived = 0;
  block.block_barrier.waiters.clear();
  for (int w = 0; w * 32 < n; ++w) {
    block.warp_barriers[w].expected = std::min(32, n - w * 32);
    block.warp_barriers[w].arrived = 0;
    block.warp_barriers[w].waiters.clear();
  }
  for (ThreadState& t : block.threads) t.parity = 0;
}

// Runs body() once per CUDA thread of every block of the grid.
inline void run_grid(unsigned int grid, unsigned int threads, std::function<void()> body) {
  if (threads == 0 || threads > 1024 || grid == 0) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  std::lock_guard<std::mutex> serialized(launch_mutex());
  ++config().launches;
  if (config().grid != 0) grid = config().grid;
  const int num_warps = static_cast<int>((threads + 31) / 32);
  Block block;
  block.mode = config().mode;
  Current::threads = block.mode == Mode::kThreads;
  block.block_dim = {threads, 1, 1};
  block.grid_dim = {grid, 1, 1};
  block.warp_barriers = std::vector<Barrier>(num_warps);
  block.exchange.assign(static_cast<size_t>(num_warps) * 2 * 32, 0);
  block.threads = std::vector<ThreadState>(threads);
  for (unsigned int i = 0; i < threads; ++i) {
    block.threads[i].thread_idx = {i, 0, 0};
    block.threads[i].block = &block;
  }
  const std::vector<unsigned int> order = block_order(grid);
  // The body of one CUDA thread: the kernel, then leaving its barriers.
  std::function<void()> thread_body = [&] {
    body();
    leave(block.block_barrier);
    leave(warp_barrier());
  };
  if (block.mode == Mode::kFibers) {
    for (unsigned int b : order) {
      reset_block(block, b);
      run_block_fibers(block, thread_body);
    }
    return;
  }
  // Mode::kThreads: one OS thread per CUDA thread for the whole launch; a barrier over
  // all of them (never left early) ends each block before the next starts.
  Barrier block_done;
  block_done.expected = static_cast<int>(threads);
  reset_block(block, order[0]);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned int i = 0; i < threads; ++i) {
    workers.emplace_back([&, i] {
      Current::thread = &block.threads[i];
      for (size_t k = 0; k < order.size(); ++k) {
        thread_body();
        std::unique_lock<std::mutex> lock(block_done.mutex);
        const uint64_t generation = block_done.generation;
        if (++block_done.arrived == block_done.expected) {
          if (k + 1 < order.size()) reset_block(block, order[k + 1]);
          block_done.arrived = 0;
          ++block_done.generation;
          block_done.released.notify_all();
        } else {
          block_done.released.wait(lock, [&] { return block_done.generation != generation; });
        }
      }
      Current::thread = nullptr;
    });
  }
  for (std::thread& w : workers) w.join();
}

// REGFUSE_LAUNCH(grid, block, stream, kernel)(args...): kernel(args...) on every thread.
template <typename... Params>
struct Launch {
  unsigned int grid, threads;
  void (*kernel)(Params...);
  template <typename... Args>
  void operator()(Args&&... args) const {
    auto bound = [kernel = kernel, args...] { kernel(args...); };
    run_grid(grid, threads, bound);
  }
};

template <typename... Params>
Launch<Params...> launch(unsigned int grid, unsigned int threads, cudaStream_t /*stream*/,
                         void (*kernel)(Params...)) {
  return {grid, threads, kernel};
}

}  // namespace simt
}  // namespace regfuse

// ---- the CUDA names ---------------------------------------------------------------------

#define threadIdx (::regfuse::simt::current()->thread_idx)
#define blockIdx (::regfuse::simt::current()->block->block_idx)
#define blockDim (::regfuse::simt::current()->block->block_dim)
#define gridDim (::regfuse::simt::current()->block->grid_dim)

inline void __syncthreads() {
  ::regfuse::simt::wait_at(::regfuse::simt::current()->block->block_barrier);
}

template <typename T>
inline T __shfl_down_sync(unsigned int /*mask*/, T value, unsigned int offset) {
  return ::regfuse::simt::shfl_down(value, offset);
}

template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename T>
inline void __stwb(T* p, T value) {
  *p = value;
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
inline unsigned int atomicExch(unsigned int* address, unsigned int value) {
  return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST);
}

// No graphs here: a stream never captures.
inline cudaError_t cudaStreamGetCaptureInfo(cudaStream_t, cudaStreamCaptureStatus* status, unsigned long long* id) {
  *status = cudaStreamCaptureStatusNone;
  *id = 0;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = ::regfuse::simt::last_error();
  ::regfuse::simt::last_error() = cudaSuccess;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid configuration argument (emulated launch)";
}
