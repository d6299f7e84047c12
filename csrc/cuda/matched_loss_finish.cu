// Matched-loss stage-2 epilogue on the GPU, after cuBLAS's grad_w32 = D^T X (D scaled):
//
//   out_weight = grad_w32 [+ (W - W0) / eta]       (n, k)
//   out_bias   = sum_b D[b, :] [+ (b - b0) / eta]  (n,)
//
// One launch: the first `weight_blocks` blocks stream the weight part, the others own one
// column each per thread and sum D down the rows (adjacent threads read adjacent columns:
// coalesced). A fixed per-column order, no atomics: deterministic.
#include "../dispatch.h"
#include "kernels.h"
#include "launch.cuh"

namespace locoprop::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void finish_kernel(const float* grad_w32, const T* weight, const T* anchor_weight,
                              T* out_weight, const float* delta, const T* bias,
                              const T* anchor_bias, T* out_bias, int64_t B, int64_t n,
                              int64_t k, bool has_prox, float inv_eta, unsigned weight_blocks) {
  if (blockIdx.x < weight_blocks) {
    const int64_t total = n * k;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
         i += int64_t(weight_blocks) * blockDim.x) {
      float g = grad_w32[i];
      if (has_prox) g += (to_float(weight[i]) - to_float(anchor_weight[i])) * inv_eta;
      out_weight[i] = from_float<T>(g);
    }
    return;
  }
  const int64_t col = (blockIdx.x - weight_blocks) * int64_t(blockDim.x) + threadIdx.x;
  if (col >= n) return;
  double acc = 0.0;
  for (int64_t r = 0; r < B; ++r) acc += double(delta[r * n + col]);
  float g = float(acc);
  if (has_prox) g += (to_float(bias[col]) - to_float(anchor_bias[col])) * inv_eta;
  out_bias[col] = from_float<T>(g);
}

}  // namespace

void matched_loss_finish(const float* grad_w32, const void* weight, const void* anchor_weight,
                         void* out_weight, const float* delta, const void* bias,
                         const void* anchor_bias, void* out_bias, int dtype, int64_t B,
                         int64_t n, int64_t k, bool has_prox, float inv_eta, void* stream) {
  const unsigned weight_blocks = out_weight ? grid_for(n * k, kThreads) : 0;
  const unsigned bias_blocks = out_bias ? unsigned((n + kThreads - 1) / kThreads) : 0;
  if (weight_blocks + bias_blocks == 0) return;
  dispatch_dtype(dtype, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    finish_kernel<T><<<weight_blocks + bias_blocks, kThreads, 0, as_stream(stream)>>>(
        grad_w32, static_cast<const T*>(weight), static_cast<const T*>(anchor_weight),
        static_cast<T*>(out_weight), delta, static_cast<const T*>(bias),
        static_cast<const T*>(anchor_bias), static_cast<T*>(out_bias), B, n, k, has_prox,
        inv_eta, weight_blocks);
  });
  check_launch("matched_loss_finish");
}

}  // namespace locoprop::cuda
