// LocoProp targets on the GPU:  Y = f(Z) - gamma * G   (B, n). Element-wise: a grid-stride
// pass; softmax: one block per row (max, sum of exp, write), as in matched_loss_delta.cu.
#include "../activation.h"
#include "../dispatch.h"
#include "kernels.h"
#include "launch.cuh"

namespace locoprop::cuda {
namespace {

constexpr int kThreads = 256;

template <Activation A, typename T>
__global__ void targets_kernel(const T* z, const T* g, T* y, int64_t total, float gamma) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = from_float<T>(apply_elementwise<A>(to_float(z[i])) - gamma * to_float(g[i]));
}

template <typename T>
__global__ void softmax_targets_kernel(const T* z, const T* g, T* y, int64_t n, float gamma) {
  __shared__ float scratch[kThreads / kWarp];
  const int64_t row = blockIdx.x * n;
  float row_max = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    row_max = fmaxf(row_max, to_float(z[row + j]));
  row_max = block_reduce(row_max, MaxOp{}, scratch);
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    sum += exp_fp32(to_float(z[row + j]) - row_max);
  const float inv_sum = 1.0f / block_reduce(sum, SumOp{}, scratch);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    y[row + j] = from_float<T>(exp_fp32(to_float(z[row + j]) - row_max) * inv_sum -
                               gamma * to_float(g[row + j]));
}

}  // namespace

void local_targets(const void* z, const void* g, void* y, int dtype, int64_t B, int64_t n,
                   int activation, float gamma, void* stream) {
  dispatch_dtype(dtype, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    const T* zt = static_cast<const T*>(z);
    const T* gt = static_cast<const T*>(g);
    T* yt = static_cast<T*>(y);
    dispatch_activation(activation, [&](auto act_tag) {
      constexpr Activation A = decltype(act_tag)::value;
      if constexpr (A == Activation::Softmax) {
        softmax_targets_kernel<T><<<unsigned(B), kThreads, 0, as_stream(stream)>>>(zt, gt, yt,
                                                                                   n, gamma);
      } else {
        targets_kernel<A, T><<<grid_for(B * n, kThreads), kThreads, 0, as_stream(stream)>>>(
            zt, gt, yt, B * n, gamma);
      }
    });
  });
  check_launch("local_targets");
}

}  // namespace locoprop::cuda
