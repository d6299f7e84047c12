// The CPU kernels' entry points: raw pointers, sizes and integer codes (Activation from
// activation.h, Dtype from storage.h). Row-major, contiguous buffers. Each is one parallel
// pass; the GEMMs around them stay with the caller's BLAS.
#pragma once

#include <cstdint>

#include "../rmsprop.h"

namespace locoprop::cpu {

// Matched-loss stage-1 epilogue, in place on the GEMM output z (B, n) in fp32:
//   z <- scale * (f(z + bias) - target)
// softmax row-wise and stable (row max subtracted). bias (n,) may be null; bias and target
// share one storage dtype. Folding `scale` in here makes the later GEMM D^T X and the bias
// sum produce the scaled gradient with no further pass.
void matched_loss_delta(float* z, const void* bias, const void* target, int dtype, int64_t B,
                        int64_t n, int activation, float scale);

// Matched-loss stage-2 epilogue, after grad_w32 = D^T X (n, k, fp32) and with D scaled:
//   out_weight = grad_w32 [+ (weight - anchor_weight) * inv_eta]   (n, k), `dtype`
//   out_bias   = sum_rows D [+ (bias - anchor_bias) * inv_eta]    (n,),   `dtype`
// `has_prox` turns the anchor terms on. out_weight may alias grad_w32 (fp32 in place);
// out_weight null skips the weight part, out_bias null skips the bias part.
void matched_loss_finish(const float* grad_w32, const void* weight, const void* anchor_weight,
                         void* out_weight, const float* delta, const void* bias,
                         const void* anchor_bias, void* out_bias, int dtype, int64_t B,
                         int64_t n, int64_t k, bool has_prox, float inv_eta);

// LocoProp targets, (B, n), one dtype for all three:  y = f(z) - gamma * g.
void local_targets(const void* z, const void* g, void* y, int dtype, int64_t B, int64_t n,
                   int activation, float gamma);

// A vector square root with MKL VML's calling convention, `fn(n, in, out, mode)`: torch's own
// fp32 sqrt where torch calls MKL for it (backends/cpp.py finds it and checks it against
// torch.sqrt before handing its address over). fn null: the IEEE sqrt.
struct VectorSqrt {
  void (*fn)(int32_t n, const float* in, float* out, int64_t mode) = nullptr;
  int64_t mode = 0;
};

// One RMSProp step over many tensors in one parallel pass. `table` holds kRmspropColumns
// int64 per tensor (the row layout, the options and the math: ../rmsprop.h). Style "torch"
// takes its square roots with `sqrt` when given (style "tf" always with the IEEE one). Throws
// std::invalid_argument for a row the options cannot run (check_rmsprop_table).
void rmsprop_multi(const int64_t* table, int64_t n_tensors, float lr,
                   const RmspropOptions& options, VectorSqrt sqrt = {});

}  // namespace locoprop::cpu
