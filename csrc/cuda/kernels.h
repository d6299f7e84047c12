// The CUDA kernels' entry points: the CPU ops of cpu/kernels.h on device pointers, each
// enqueued on `stream` (a cudaStream_t passed as void*, so that this header needs no CUDA
// headers and bindings.cpp compiles with the host compiler). Launch errors throw
// std::runtime_error; nothing synchronises.
#pragma once

#include <cstdint>

#include "../rmsprop.h"

namespace locoprop::cuda {

// z (B, n) fp32 <- scale * (f(z + bias) - target); bias may be null. Softmax row-wise.
void matched_loss_delta(float* z, const void* bias, const void* target, int dtype, int64_t B,
                        int64_t n, int activation, float scale, void* stream);

// out_weight = grad_w32 [+ (W - W0) inv_eta]; out_bias = sum_rows delta [+ (b - b0) inv_eta].
void matched_loss_finish(const float* grad_w32, const void* weight, const void* anchor_weight,
                         void* out_weight, const float* delta, const void* bias,
                         const void* anchor_bias, void* out_bias, int dtype, int64_t B,
                         int64_t n, int64_t k, bool has_prox, float inv_eta, void* stream);

// y = f(z) - gamma g, (B, n).
void local_targets(const void* z, const void* g, void* y, int dtype, int64_t B, int64_t n,
                   int activation, float gamma, void* stream);

// One RMSProp step over many tensors; table rows, options and math as in ../rmsprop.h.
// Up to kMaxTensorsPerLaunch (cuda/multi_tensor_apply.cuh) tensors go in one launch, their
// addresses in the kernel's arguments; longer tables take one launch per that many tensors.
void rmsprop_multi(const int64_t* table, int64_t n_tensors, float lr,
                   const RmspropOptions& options, void* stream);

}  // namespace locoprop::cuda
