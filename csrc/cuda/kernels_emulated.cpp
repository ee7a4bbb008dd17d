// The CUDA kernels of kernels.cu compiled by the host compiler, through the SIMT emulation
// of simt_cpu.h: the cuda backend's launchers for CPU tensors when REGFUSE_CUDA_EMULATE=1
// (regfuse/backends/cuda.py). Built into extensions without real CUDA kernels.
#include "kernels.cu"

namespace regfuse {
namespace cuda {

void configure_emulation(bool threads, int block_order, uint64_t seed, unsigned int grid) {
  simt::Config& config = simt::config();
  config.mode = threads ? simt::Mode::kThreads : simt::Mode::kFibers;
  config.order = static_cast<simt::BlockOrder>(block_order);
  config.seed = seed;
  config.grid = grid;
}

uint64_t emulated_launches() { return simt::config().launches; }

}  // namespace cuda
}  // namespace regfuse
