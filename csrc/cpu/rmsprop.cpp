// Multi-tensor RMSProp on the CPU: every tensor of every layer in ONE parallel pass.
//
//   "tf":    ms = a ms + (1-a) g^2;  mom = m mom + lr g / sqrt(ms + eps);  p -= mom
//   "torch": ms = a ms + (1-a) g^2;  avg = sqrt(ms) + eps;
//            with momentum buf = m buf + g / avg, p -= lr buf;  else p -= lr g / avg
//
// The step is memory-bound: per element it reads p, g, ms, buf and writes p, ms, buf once,
// where torch.optim.RMSprop(foreach=True) streams the same tensors through ~6 separate
// foreach kernels. Tensors come as a table (one row of addresses, size and dtypes per
// tensor; a flat arena is a table of one row). The work is cut into fixed chunks that never
// straddle two tensors, and one OpenMP loop hands them out. The schedule is dynamic: every
// chunk costs the same, but on a shared 2-core machine one thread is often descheduled for a
// whole time slice, and a static split would make the other wait for its half.
// sqrt and division are the IEEE ones (no -ffast-math), so "torch" tracks
// torch.optim.RMSprop(foreach=False) to rounding.
#include <algorithm>
#include <vector>

#include "../dispatch.h"
#include "kernels.h"
#include "parallel.h"

#include <cmath>

namespace locoprop::cpu {
namespace {

// 16K elements per chunk: 64 KB per fp32 stream, long enough to amortise the dispatch and
// short enough that 2.8M parameters make ~170 chunks to balance over the threads.
constexpr int64_t kChunk = 1 << 14;

struct Scalars {
  float lr, alpha, one_minus_alpha, eps, momentum;
};

template <typename TP, typename TG, bool StyleTf, bool HasMomentum>
LOCOPROP_CLONES void update_chunk(TP* p, const TG* g, float* ms, float* buf, int64_t begin,
                                  int64_t end, Scalars s) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float gi = to_float(g[i]);
    const float msi = s.alpha * ms[i] + s.one_minus_alpha * (gi * gi);
    ms[i] = msi;
    float step = StyleTf ? (s.lr * gi) / std::sqrt(msi + s.eps) : gi / (std::sqrt(msi) + s.eps);
    if constexpr (HasMomentum) {
      step = s.momentum * buf[i] + step;
      buf[i] = step;
    }
    if constexpr (!StyleTf) step = s.lr * step;
    p[i] = from_float<TP>(to_float(p[i]) - step);
  }
}

template <bool StyleTf, bool HasMomentum>
void update_row_chunk(const int64_t* row, int64_t begin, int64_t end, const Scalars& s) {
  float* ms = reinterpret_cast<float*>(row[2]);
  float* buf = reinterpret_cast<float*>(row[3]);
  dispatch_dtype(int(row[5]), [&](auto p_tag) {
    using TP = typename decltype(p_tag)::type;
    dispatch_dtype(int(row[6]), [&](auto g_tag) {
      using TG = typename decltype(g_tag)::type;
      update_chunk<TP, TG, StyleTf, HasMomentum>(reinterpret_cast<TP*>(row[0]),
                                                 reinterpret_cast<const TG*>(row[1]), ms, buf,
                                                 begin, end, s);
    });
  });
}

template <bool StyleTf, bool HasMomentum>
void run(const int64_t* table, int64_t n_tensors, const Scalars& s) {
  // (tensor, first element) of every chunk, in table order.
  std::vector<std::pair<int64_t, int64_t>> chunks;
  int64_t total = 0;
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t numel = table[t * kRmspropColumns + 4];
    total += numel;
    for (int64_t start = 0; start < numel; start += kChunk) chunks.emplace_back(t, start);
  }
  const int64_t n_chunks = int64_t(chunks.size());
#pragma omp parallel for schedule(dynamic) if (total >= kParallelMin)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t* row = table + chunks[c].first * kRmspropColumns;
    const int64_t begin = chunks[c].second;
    update_row_chunk<StyleTf, HasMomentum>(row, begin, std::min(row[4], begin + kChunk), s);
  }
}

}  // namespace

void rmsprop_multi(const int64_t* table, int64_t n_tensors, float lr, float alpha,
                   float one_minus_alpha, float eps, float momentum, bool style_tf,
                   bool has_momentum) {
  const Scalars s{lr, alpha, one_minus_alpha, eps, momentum};
  if (style_tf) {
    has_momentum ? run<true, true>(table, n_tensors, s) : run<true, false>(table, n_tensors, s);
  } else {
    has_momentum ? run<false, true>(table, n_tensors, s) : run<false, false>(table, n_tensors, s);
  }
}

}  // namespace locoprop::cpu
