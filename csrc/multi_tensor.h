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

// What a table is built from: per entry i, data pointer ptrs[i], numel numels[i] and dtype
// code dtypes[i] (a valid DType). Every entry starts a new flat slot unless
// `continues_slot` (empty, or one flag per entry) says it continues the previous entry's:
// the later rows of a tensor (row_entries).
struct Entries {
  std::vector<int64_t> ptrs;
  std::vector<int64_t> numels;
  std::vector<int64_t> dtypes;
  std::vector<uint8_t> continues_slot;
};

// The entries of a table over the rows of each tensor: tensor i (data pointer ptrs[i],
// rows[i] contiguous rows of row_numels[i] elements, dtype code dtypes[i]) gives rows[i]
// consecutive entries, row r at ptrs[i] + r * row_numels[i] * element size, all in one
// flat slot. A tensor with no rows adds no entry.
inline Entries row_entries(const std::vector<int64_t>& ptrs, const std::vector<int64_t>& rows,
                           const std::vector<int64_t>& row_numels, const std::vector<int64_t>& dtypes) {
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  Entries entries;
  entries.ptrs.reserve(total);
  entries.numels.reserve(total);
  entries.dtypes.reserve(total);
  entries.continues_slot.reserve(total);
  for (size_t i = 0; i < ptrs.size(); ++i) {
    const int64_t row_bytes = row_numels[i] * kElementSize[dtypes[i]];
    for (int64_t r = 0; r < rows[i]; ++r) {
      entries.ptrs.push_back(ptrs[i] + r * row_bytes);
      entries.numels.push_back(row_numels[i]);
      entries.dtypes.push_back(dtypes[i]);
      entries.continues_slot.push_back(r > 0);
    }
  }
  return entries;
}

// The metadata buffer for `entries`, cut into chunks of chunk_size elements. `layout`
// receives its shape.
inline std::vector<int64_t> build_metadata(const Entries& entries, int64_t chunk_size, MetaLayout* layout) {
  const std::vector<int64_t>& ptrs = entries.ptrs;
  const std::vector<int64_t>& numels = entries.numels;
  const std::vector<int64_t>& dtypes = entries.dtypes;
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
    int64_t& end = flat_size[dtypes[i]];
    const bool continues = !entries.continues_slot.empty() && entries.continues_slot[i];
    if (!continues) end = flat_slot(end, dtypes[i]);  // a new slot starts aligned
    flat_offset[i] = end;
    end += numels[i];
  }
  chunk_offsets[n] = chunk;
  return meta;
}

// Elements of the flat gradient buffer of each dtype: up to the end of its last slot.
inline void flat_sizes(const int64_t* meta, const MetaLayout& layout, int64_t out[kNumDTypes]) {
  for (int d = 0; d < kNumDTypes; ++d) out[d] = 0;
  for (int64_t i = 0; i < layout.num_tensors; ++i) {
    const int64_t dtype = meta[layout.dtypes() + i];
    const int64_t end = flat_slot(meta[layout.flat_offset() + i] + meta[layout.numels() + i], dtype);
    if (end > out[dtype]) out[dtype] = end;
  }
}

}  // namespace regfuse
