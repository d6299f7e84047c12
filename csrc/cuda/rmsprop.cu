// Multi-tensor RMSProp on the GPU: every tensor in ONE launch (up to kMaxTensorsPerLaunch,
// cuda/multi_tensor_apply.cuh); the update itself is rmsprop_update in ../rmsprop.h, the same
// code as the CPU's. sqrt and division are the correctly rounded ones (__fsqrt_rn, __fdiv_rn
// through sqrt_rn / div_rn), as on the CPU.
#include "../rmsprop.h"
#include "kernels.h"
#include "launch.cuh"
#include "multi_tensor_apply.cuh"

namespace locoprop::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kPerThread = 4;
constexpr int kBlockElems = kThreads * kPerThread;

// One block's elements of one tensor. The (param, grad) dtype pair is uniform over the
// tensor, so the dispatch is uniform over the block: no divergence.
template <typename V> struct RmspropFunctor {
  float lr;
  RmspropOptions options;

  __device__ void operator()(const RmspropTensor& t, int64_t begin, int64_t end) const {
    dispatch_param_grad(t.param_dtype, t.grad_dtype, [&](auto p_tag, auto g_tag) {
      using TP = typename decltype(p_tag)::type;
      using TG = typename decltype(g_tag)::type;
      TP* p = static_cast<TP*>(t.param);
      const TG* g = static_cast<const TG*>(t.grad);
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
        rmsprop_update<V>(p, g, t.square_avg, t.momentum_buf, t.grad_avg, i, lr, options);
    });
  }
};

}  // namespace

void rmsprop_multi(const int64_t* table, int64_t n_tensors, float lr,
                   const RmspropOptions& options, void* stream) {
  check_rmsprop_table(table, n_tensors, options);
  dispatch_rmsprop_variant(options, [&](auto variant) {
    using V = decltype(variant);
    multi_tensor_apply<kThreads, kBlockElems>(table, n_tensors, kRmspropColumns,
                                              rmsprop_tensor, RmspropFunctor<V>{lr, options},
                                              as_stream(stream), "rmsprop_multi");
  });
}

}  // namespace locoprop::cuda
