// The multi-tensor chunk table (layout in regfuse.h), built on the host in one place for
// every kernel family. Torch-free: the binding hands it data pointers, sizes and dtype
// codes and uploads the result to the tensors' device (once per list and stream, thanks
// to its cache).
#pragma once

#include <cstdint>
#include <vector>

#include "regfuse.h"

namespace regfuse {

inline int64_t num_chunks_of(int64_t numel, int64_t chunk_size) {
  return (numel + chunk_size - 1) / chunk_size;
}

// Elements tensor i takes in the flat buffer of its dtype: its numel rounded up to whole
// kAlignment-byte vectors, so that the next slot starts aligned too (see regfuse.h).
inline int64_t flat_slot(int64_t numel, int64_t dtype) {
  const int64_t per_vector = kAlignment / kElementSize[dtype];
  return (numel + per_vector - 1) / per_vector * per_vector;
}

// The metadata buffer for tensors i with data pointer ptrs[i], numel numels[i] and dtype
// code dtypes[i] (a valid DType), cut into chunks of chunk_size elements. `layout`
// receives its shape.
inline std::vector<int64_t> build_metadata(const std::vector<int64_t>& ptrs,
                                           const std::vector<int64_t>& numels,
                                           const std::vector<int64_t>& dtypes,
                                           int64_t chunk_size, MetaLayout* layout) {
  const int64_t n = static_cast<int64_t>(ptrs.size());
  int64_t num_chunks = 0;
  for (int64_t numel : numels) num_chunks += num_chunks_of(numel, chunk_size);
  *layout = MetaLayout{n, num_chunks, chunk_size};

  std::vector<int64_t> meta(layout->size());
  int64_t* chunk_offsets = meta.data() + layout->chunk_offsets();
  int64_t* chunk_tensor = meta.data() + layout->chunk_tensor();
  int64_t* chunk_start = meta.data() + layout->chunk_start();
  int64_t* flat_offset = meta.data() + layout->flat_offset();
  int64_t flat_size[kNumDTypes] = {0, 0, 0, 0};
  int64_t chunk = 0;
  for (int64_t i = 0; i < n; ++i) {
    meta[layout->ptrs() + i] = ptrs[i];
    meta[layout->numels() + i] = numels[i];
    meta[layout->dtypes() + i] = dtypes[i];
    chunk_offsets[i] = chunk;
    for (int64_t start = 0; start < numels[i]; start += chunk_size, ++chunk) {
      chunk_tensor[chunk] = i;
      chunk_start[chunk] = start;
    }
    flat_offset[i] = flat_size[dtypes[i]];
    flat_size[dtypes[i]] += flat_slot(numels[i], dtypes[i]);
  }
  chunk_offsets[n] = chunk;
  return meta;
}

// Elements of the flat gradient buffer of each dtype: the sum of its tensors' slots.
inline void flat_sizes(const int64_t* meta, const MetaLayout& layout, int64_t out[kNumDTypes]) {
  for (int d = 0; d < kNumDTypes; ++d) out[d] = 0;
  for (int64_t i = 0; i < layout.num_tensors; ++i) {
    const int64_t dtype = meta[layout.dtypes() + i];
    out[dtype] += flat_slot(meta[layout.numels() + i], dtype);
  }
}

}  // namespace regfuse
