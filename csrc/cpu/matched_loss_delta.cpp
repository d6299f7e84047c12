// Matched-loss stage-1 epilogue on the CPU:  Z <- scale * (f(Z + b) - Y),  in place.
//
// Z (B, n) is the fp32 output of the caller's GEMM X W^T (PyTorch's BLAS). Turning it into
// the scaled delta here, in one pass over Z and Y, replaces the reference's separate passes
// (bias add, activation, subtraction, scaling) and their temporaries. Softmax is row-wise:
// per row one pass for the max, one that stores e^(z - max) and sums it, one that divides;
// subtracting the max keeps it finite for logits up to fp32's range.
// Parallel over rows (OpenMP, static schedule: every row costs the same); each row is a
// vectorised loop over its n columns.
#include <algorithm>

#include "../activation.h"
#include "../dispatch.h"
#include "kernels.h"
#include "parallel.h"

namespace locoprop::cpu {
namespace {

// Rows [row_begin, row_end) of an element-wise activation. Bias may be null.
template <Activation A, typename T>
LOCOPROP_CLONES void delta_rows(float* z, const T* bias, const T* target, int64_t row_begin,
                                int64_t row_end, int64_t n, float scale) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* zr = z + r * n;
    const T* yr = target + r * n;
    if (bias != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j)
        zr[j] = scale * (apply_elementwise<A>(zr[j] + to_float(bias[j])) - to_float(yr[j]));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j)
        zr[j] = scale * (apply_elementwise<A>(zr[j]) - to_float(yr[j]));
    }
  }
}

// Softmax rows: three passes over each row while it sits in L1/L2.
template <typename T>
LOCOPROP_CLONES void softmax_delta_rows(float* z, const T* bias, const T* target,
                                        int64_t row_begin, int64_t row_end, int64_t n,
                                        float scale) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* zr = z + r * n;
    const T* yr = target + r * n;
    if (bias != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) zr[j] += to_float(bias[j]);
    }
    float row_max = zr[0];
#pragma omp simd reduction(max : row_max)
    for (int64_t j = 0; j < n; ++j) row_max = std::max(row_max, zr[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      zr[j] = exp_fp32(zr[j] - row_max);
      sum += zr[j];
    }
    const float inv_sum = 1.0f / sum;  // sum >= 1: the max's own term is e^0
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) zr[j] = scale * (zr[j] * inv_sum - to_float(yr[j]));
  }
}

}  // namespace

void matched_loss_delta(float* z, const void* bias, const void* target, int dtype, int64_t B,
                        int64_t n, int activation, float scale) {
  if (B <= 0 || n <= 0) return;  // no element: nothing to do (and no task size of 2^14 / 0)
  // Rows per task: enough work per call of the row kernel (about 16K elements).
  const int64_t rows_per_task = std::max<int64_t>(1, (1 << 14) / n);
  const int64_t n_tasks = (B + rows_per_task - 1) / rows_per_task;
  const bool parallel = B * n >= kParallelMin;
  dispatch_dtype(dtype, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    const T* b = static_cast<const T*>(bias);
    const T* y = static_cast<const T*>(target);
    dispatch_activation(activation, [&](auto act_tag) {
      constexpr Activation A = decltype(act_tag)::value;
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t task = 0; task < n_tasks; ++task) {
        const int64_t r0 = task * rows_per_task;
        const int64_t r1 = std::min(B, r0 + rows_per_task);
        if constexpr (A == Activation::Softmax) {
          softmax_delta_rows<T>(z, b, y, r0, r1, n, scale);
        } else {
          delta_rows<A, T>(z, b, y, r0, r1, n, scale);
        }
      }
    });
  });
}

}  // namespace locoprop::cpu
