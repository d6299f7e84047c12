// Multi-tensor machinery on the CPU: one parallel pass over every tensor of a table, apart
// from what is done to each element (the optimizer's functor, e.g. cpu/rmsprop.cpp).
//
// A table is `n_rows` rows of `columns` int64 (addresses, sizes, codes: the functor's own
// layout), one row per tensor; column `numel_column` holds the tensor's element count. A flat
// arena is a table of one row. The work is cut into fixed chunks that never straddle two
// tensors, and one OpenMP loop hands them out, calling fn(row, begin, end) for the elements
// [begin, end) of the tensor of `row`.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "parallel.h"

namespace locoprop::cpu {

// 16K elements per chunk: 64 KB per fp32 stream, long enough to amortise the dispatch and
// short enough that 2.8M parameters (the autoencoder) make ~170 chunks to balance over the
// threads.
constexpr int64_t kMultiTensorChunk = 1 << 14;

template <typename Fn>
void multi_tensor_apply(const int64_t* table, int64_t n_rows, int columns, int numel_column,
                        Fn&& fn) {
  // (row, first element) of every chunk, in table order.
  std::vector<std::pair<int64_t, int64_t>> chunks;
  int64_t total = 0;
  for (int64_t t = 0; t < n_rows; ++t) {
    const int64_t numel = table[t * columns + numel_column];
    total += numel;
    for (int64_t start = 0; start < numel; start += kMultiTensorChunk)
      chunks.emplace_back(t, start);
  }
  const int64_t n_chunks = int64_t(chunks.size());
  // Below kParallelMin elements the pass stays on the calling thread (see parallel.h). The
  // schedule is dynamic: every chunk costs the same, but on a shared 2-core machine one
  // thread is often descheduled for a whole time slice, and a static split would make the
  // other wait for its half.
#pragma omp parallel for schedule(dynamic) if (total >= kParallelMin)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t* row = table + chunks[c].first * columns;
    const int64_t begin = chunks[c].second;
    fn(row, begin, std::min(row[numel_column], begin + kMultiTensorChunk));
  }
}

}  // namespace locoprop::cpu
