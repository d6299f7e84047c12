// Multi-tensor RMSProp on the CPU: every tensor of every layer in ONE parallel pass
// (cpu/multi_tensor.h); the update itself is rmsprop_update in ../rmsprop.h.
//
// The step is memory-bound: per element it reads p, g, ms (and buf, ga when the options use
// them) and writes each state once, where torch.optim.RMSprop(foreach=True) streams the same
// tensors through ~6 separate foreach kernels. sqrt and division are the IEEE ones (no
// -ffast-math), and this file is compiled with -ffp-contract=off (CMakeLists.txt) so that the
// only multiply-adds are the ones rmsprop_update writes: style "torch" is then
// torch.optim.RMSprop's result bit for bit in fp32 (tests/test_rmsprop_bitwise.py).
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

}  // namespace

void rmsprop_multi(const int64_t* table, int64_t n_tensors, float lr,
                   const RmspropOptions& options) {
  check_rmsprop_table(table, n_tensors, options);
  dispatch_rmsprop_variant(options, [&](auto variant) {
    using V = decltype(variant);
    multi_tensor_apply(table, n_tensors, kRmspropColumns, kNumel,
                       [&](const int64_t* row, int64_t begin, int64_t end) {
      const RmspropTensor t = rmsprop_tensor(row);
      dispatch_param_grad(t.param_dtype, t.grad_dtype, [&](auto p_tag, auto g_tag) {
        using TP = typename decltype(p_tag)::type;
        using TG = typename decltype(g_tag)::type;
        update_chunk<V, TP, TG>(static_cast<TP*>(t.param), static_cast<const TG*>(t.grad),
                                t.square_avg, t.momentum_buf, t.grad_avg, begin, end, lr,
                                options);
      });
    });
  });
}

}  // namespace locoprop::cpu
