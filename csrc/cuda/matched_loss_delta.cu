// Matched-loss stage-1 epilogue on the GPU:  Z <- scale * (f(Z + b) - Y),  in place.
//
// Z (B, n) fp32 is cuBLAS's output of X W^T. Element-wise activations: one grid-stride pass.
// Softmax: one block per row (max, then e^(z - max) parked in Z and summed, then the
// division), block reductions in shared memory; rows are independent, so the grid is B.
#include "../activation.h"
#include "../dispatch.h"
#include "kernels.h"
#include "launch.cuh"

namespace locoprop::cuda {
namespace {

constexpr int kThreads = 256;

template <Activation A, typename T>
__global__ void delta_kernel(float* z, const T* bias, const T* target, int64_t total,
                             int64_t n, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float b = bias ? to_float(bias[i % n]) : 0.0f;
    z[i] = scale * (apply_elementwise<A>(z[i] + b) - to_float(target[i]));
  }
}

template <typename T>
__global__ void softmax_delta_kernel(float* z, const T* bias, const T* target, int64_t n,
                                     float scale) {
  __shared__ float scratch[kThreads / kWarp];
  float* zr = z + blockIdx.x * n;
  const T* yr = target + blockIdx.x * n;
  float row_max = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float v = zr[j] + (bias ? to_float(bias[j]) : 0.0f);
    zr[j] = v;
    row_max = fmaxf(row_max, v);
  }
  row_max = block_reduce(row_max, MaxOp{}, scratch);
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float e = exp_fp32(zr[j] - row_max);
    zr[j] = e;
    sum += e;
  }
  const float inv_sum = 1.0f / block_reduce(sum, SumOp{}, scratch);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    zr[j] = scale * (zr[j] * inv_sum - to_float(yr[j]));
}

}  // namespace

void matched_loss_delta(float* z, const void* bias, const void* target, int dtype, int64_t B,
                        int64_t n, int activation, float scale, void* stream) {
  dispatch_dtype(dtype, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    const T* b = static_cast<const T*>(bias);
    const T* y = static_cast<const T*>(target);
    dispatch_activation(activation, [&](auto act_tag) {
      constexpr Activation A = decltype(act_tag)::value;
      if constexpr (A == Activation::Softmax) {
        softmax_delta_kernel<T><<<unsigned(B), kThreads, 0, as_stream(stream)>>>(z, b, y, n,
                                                                                 scale);
      } else {
        delta_kernel<A, T><<<grid_for(B * n, kThreads), kThreads, 0, as_stream(stream)>>>(
            z, b, y, B * n, n, scale);
      }
    });
  });
  check_launch("matched_loss_delta");
}

}  // namespace locoprop::cuda
