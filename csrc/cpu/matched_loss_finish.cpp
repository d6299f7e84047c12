// Matched-loss stage-2 epilogue on the CPU, after the caller's GEMM grad_w32 = D^T X:
//
//   out_weight = grad_w32 [+ (W - W0) / eta]       (n, k)  elementwise, storage dtype out
//   out_bias   = sum_b D[b, :] [+ (b - b0) / eta]  (n,)    a column sum of D (B, n)
//
// D already carries `scale` (matched_loss_delta folds it in), so both are the finished
// gradient. One OpenMP team does both parts: the weight part split into element chunks, the
// bias part into column blocks. The column sum walks D row by row (contiguous) and
// accumulates a block of columns in fp64 registers: order fixed by the block, not by the
// thread count, so the result is deterministic; fp64 keeps B = 1000-term sums at fp32
// accuracy.
#include <algorithm>

#include "../dispatch.h"
#include "kernels.h"
#include "parallel.h"

namespace locoprop::cpu {
namespace {

constexpr int64_t kWeightChunk = 1 << 14;  // elements per weight task: 64 KB of fp32
constexpr int64_t kBiasColumns = 64;       // columns per bias task: 64 fp64 accumulators

template <typename T>
LOCOPROP_CLONES void weight_chunk(const float* grad_w32, const T* weight, const T* anchor,
                                  T* out, int64_t begin, int64_t end, bool has_prox,
                                  float inv_eta) {
  if (has_prox) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i)
      out[i] = from_float<T>(grad_w32[i] + (to_float(weight[i]) - to_float(anchor[i])) * inv_eta);
  } else {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) out[i] = from_float<T>(grad_w32[i]);
  }
}

template <typename T>
LOCOPROP_CLONES void bias_columns(const float* delta, const T* bias, const T* anchor, T* out,
                                  int64_t B, int64_t n, int64_t c0, int64_t c1, bool has_prox,
                                  float inv_eta) {
  double acc[kBiasColumns] = {};
  const int64_t width = c1 - c0;
  for (int64_t r = 0; r < B; ++r) {
    const float* row = delta + r * n + c0;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) acc[j] += double(row[j]);
  }
  for (int64_t j = 0; j < width; ++j) {
    float g = float(acc[j]);
    if (has_prox) g += (to_float(bias[c0 + j]) - to_float(anchor[c0 + j])) * inv_eta;
    out[c0 + j] = from_float<T>(g);
  }
}

}  // namespace

void matched_loss_finish(const float* grad_w32, const void* weight, const void* anchor_weight,
                         void* out_weight, const float* delta, const void* bias,
                         const void* anchor_bias, void* out_bias, int dtype, int64_t B,
                         int64_t n, int64_t k, bool has_prox, float inv_eta) {
  const int64_t weight_tasks = out_weight ? (n * k + kWeightChunk - 1) / kWeightChunk : 0;
  const int64_t bias_tasks = out_bias ? (n + kBiasColumns - 1) / kBiasColumns : 0;
  const bool parallel = (out_weight ? n * k : 0) + (out_bias ? B * n : 0) >= kParallelMin;
  dispatch_dtype(dtype, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
#pragma omp parallel if (parallel)
    {
#pragma omp for schedule(static) nowait
      for (int64_t t = 0; t < weight_tasks; ++t) {
        const int64_t begin = t * kWeightChunk;
        weight_chunk<T>(grad_w32, static_cast<const T*>(weight),
                        static_cast<const T*>(anchor_weight), static_cast<T*>(out_weight),
                        begin, std::min(n * k, begin + kWeightChunk), has_prox, inv_eta);
      }
#pragma omp for schedule(static)
      for (int64_t t = 0; t < bias_tasks; ++t) {
        const int64_t c0 = t * kBiasColumns;
        bias_columns<T>(delta, static_cast<const T*>(bias), static_cast<const T*>(anchor_bias),
                        static_cast<T*>(out_bias), B, n, c0, std::min(n, c0 + kBiasColumns),
                        has_prox, inv_eta);
      }
    }
  });
}

}  // namespace locoprop::cpu
