// Multi-tensor RMSProp on the CPU: every tensor of every layer in ONE parallel pass
// (cpu/multi_tensor.h); the update itself is rmsprop_update in ../rmsprop.h.
//
// The step is memory-bound: per element it reads p, g, ms (and buf, ga when the options use
// them) and writes each state once, where torch.optim.RMSprop(foreach=True) streams the same
// tensors through ~6 separate foreach kernels. Division is the IEEE one (no -ffast-math), and
// this file is compiled with -ffp-contract=off (CMakeLists.txt) so that the only multiply-adds
// are the ones ../rmsprop.h writes. The square root is the IEEE one, or, given a VectorSqrt,
// that function: torch's own (MKL VML's vmsSqrt, which torch.sqrt calls on this CPU; found
// and checked by backends/cpp.py). With it style "torch" is torch.optim.RMSprop's result bit
// for bit in fp32 (tests/test_rmsprop_bitwise.py).
#include <algorithm>

#include "../rmsprop.h"
#include "kernels.h"
#include "multi_tensor.h"
#include "parallel.h"

namespace locoprop::cpu {
namespace {

// Elements [begin, end) of one tensor: one vectorised loop, compiled per instruction set.
// The options come by value so that the compiler knows no store in the loop changes them.
template <typename V, typename TP, typename TG>
LOCOPROP_CLONES void update_chunk(TP* p, const TG* g, float* ms, float* buf, float* ga,
                                  int64_t begin, int64_t end, float lr,
                                  const RmspropOptions options) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) rmsprop_update<V>(p, g, ms, buf, ga, i, lr, options);
}

// The same with the square roots taken by `sqrt`, a block at a time: the averages of a block
// (their square-root arguments into a buffer), one call, then the rest of the update, which
// recomputes the gradient (bit for bit the same: maximize and weight decay are exact
// functions of the grad and the not yet written param). The block stays in L1, so the memory
// traffic is the one pass's. 256: measured on this CPU (AMD EPYC, 1 thread, ResNet-18's 11.7M
// values) against 128 to 4096: smaller blocks pay the call (~50 ns each), larger ones ran
// slower still (the two passes no longer share L1). The call itself is most of the cost: MKL
// runs its SSE kernel on this CPU, ~0.4 ns per value, as much as the rest of the update.
constexpr int64_t kSqrtBlock = 256;

template <typename V, typename TP, typename TG>
LOCOPROP_CLONES void update_chunk_sqrt(TP* p, const TG* g, float* ms, float* buf, float* ga,
                                       int64_t begin, int64_t end, float lr,
                                       const RmspropOptions options, VectorSqrt sqrt) {
  alignas(64) float x[kSqrtBlock];
  alignas(64) float root[kSqrtBlock];
  for (int64_t start = begin; start < end; start += kSqrtBlock) {
    const int64_t n = std::min(kSqrtBlock, end - start);
    TP* const pb = p + start;
    const TG* const gb = g + start;
    float* const msb = ms + start;
    float* const gab = V::centered ? ga + start : ga;
    float* const bufb = V::has_momentum ? buf + start : buf;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k)
      x[k] = rmsprop_averages<V>(rmsprop_grad<V>(pb, gb, k, options), msb, gab, k, options);
    sqrt.fn(int32_t(n), x, root, sqrt.mode);
#pragma omp simd
    for (int64_t k = 0; k < n; ++k)
      rmsprop_apply<V>(pb, bufb, k, rmsprop_grad<V>(pb, gb, k, options), root[k], lr, options);
  }
}

}  // namespace

void rmsprop_multi(const int64_t* table, int64_t n_tensors, float lr,
                   const RmspropOptions& options, VectorSqrt sqrt) {
  check_rmsprop_table(table, n_tensors, options);
  // TF1's flavour keeps the IEEE sqrt: only "torch" has an oracle whose sqrt we take.
  const bool vector_sqrt = sqrt.fn != nullptr && !options.style_tf;
  dispatch_rmsprop_variant(options, [&](auto variant) {
    using V = decltype(variant);
    multi_tensor_apply(table, n_tensors, kRmspropColumns, kNumel,
                       [&](const int64_t* row, int64_t begin, int64_t end) {
      const RmspropTensor t = rmsprop_tensor(row);
      dispatch_param_grad(t.param_dtype, t.grad_dtype, [&](auto p_tag, auto g_tag) {
        using TP = typename decltype(p_tag)::type;
        using TG = typename decltype(g_tag)::type;
        if (vector_sqrt)
          update_chunk_sqrt<V, TP, TG>(static_cast<TP*>(t.param),
                                       static_cast<const TG*>(t.grad), t.square_avg,
                                       t.momentum_buf, t.grad_avg, begin, end, lr, options,
                                       sqrt);
        else
          update_chunk<V, TP, TG>(static_cast<TP*>(t.param), static_cast<const TG*>(t.grad),
                                  t.square_avg, t.momentum_buf, t.grad_avg, begin, end, lr,
                                  options);
      });
    });
  });
}

}  // namespace locoprop::cpu
