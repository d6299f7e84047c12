// LocoProp targets on the CPU, one pass:  Y = f(Z) - gamma * G   (B, n), one storage dtype.
//
// Variant "S" (Y = Z - gamma G) is the identity row of the table: the caller passes code 0.
// Softmax is row-wise and stable (max, then exp and sum, then write). Parallel over rows.
#include <algorithm>

#include "../activation.h"
#include "../dispatch.h"
#include "kernels.h"
#include "parallel.h"

namespace locoprop::cpu {
namespace {

template <Activation A, typename T>
LOCOPROP_CLONES void target_rows(const T* z, const T* g, T* y, int64_t row_begin,
                                 int64_t row_end, int64_t n, float gamma) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* zr = z + r * n;
    const T* gr = g + r * n;
    T* yr = y + r * n;
    if constexpr (A == Activation::Softmax) {
      float row_max = to_float(zr[0]);
#pragma omp simd reduction(max : row_max)
      for (int64_t j = 0; j < n; ++j) row_max = std::max(row_max, to_float(zr[j]));
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) sum += exp_fp32(to_float(zr[j]) - row_max);
      const float inv_sum = 1.0f / sum;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j)
        yr[j] = from_float<T>(exp_fp32(to_float(zr[j]) - row_max) * inv_sum -
                              gamma * to_float(gr[j]));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j)
        yr[j] = from_float<T>(apply_elementwise<A>(to_float(zr[j])) - gamma * to_float(gr[j]));
    }
  }
}

}  // namespace

void local_targets(const void* z, const void* g, void* y, int dtype, int64_t B, int64_t n,
                   int activation, float gamma) {
  if (B <= 0 || n <= 0) return;  // no element: nothing to do (and no task size of 2^14 / 0)
  const int64_t rows_per_task = std::max<int64_t>(1, (1 << 14) / n);
  const int64_t n_tasks = (B + rows_per_task - 1) / rows_per_task;
  const bool parallel = B * n >= kParallelMin;
  dispatch_dtype(dtype, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    dispatch_activation(activation, [&](auto act_tag) {
      constexpr Activation A = decltype(act_tag)::value;
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t task = 0; task < n_tasks; ++task) {
        const int64_t r0 = task * rows_per_task;
        target_rows<A, T>(static_cast<const T*>(z), static_cast<const T*>(g),
                          static_cast<T*>(y), r0, std::min(B, r0 + rows_per_task), n, gamma);
      }
    });
  });
}

}  // namespace locoprop::cpu
