// Multi-tensor RMSProp on the GPU: every tensor in ONE launch (up to kMaxTensorsPerLaunch).
//
//   "tf":    ms = a ms + (1-a) g^2;  mom = m mom + lr g / sqrt(ms + eps);  p -= mom
//   "torch": ms = a ms + (1-a) g^2;  avg = sqrt(ms) + eps;
//            with momentum buf = m buf + g / avg, p -= lr buf;  else p -= lr g / avg
//
// The tensor table travels by value in the kernel's arguments (a few KB: no device buffer,
// no host-to-device copy, nothing to keep alive), with the prefix sum of each tensor's
// block count. A block finds its tensor by a scan of that prefix sum, then streams its
// kBlockElems elements with the math in fp32 registers. sqrt and division are the correctly
// rounded ones (nvcc's defaults without --use_fast_math), as on the CPU.
#include <cmath>

#include "../cpu/kernels.h"
#include "../dispatch.h"
#include "kernels.h"
#include "launch.cuh"

namespace locoprop::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kPerThread = 4;
constexpr int64_t kBlockElems = int64_t(kThreads) * kPerThread;

struct TensorRef {
  void* p;
  const void* g;
  float* ms;
  float* buf;
  int64_t numel;
  int32_t p_dtype, g_dtype;
};

struct Table {
  TensorRef tensors[kMaxTensorsPerLaunch];
  int64_t first_block[kMaxTensorsPerLaunch + 1];  // prefix sum of blocks per tensor
  int32_t count;
};

struct Scalars {
  float lr, alpha, one_minus_alpha, eps, momentum;
};

template <typename TP, typename TG, bool StyleTf, bool HasMomentum>
__device__ void update(const TensorRef& t, int64_t begin, const Scalars& s) {
  TP* p = static_cast<TP*>(t.p);
  const TG* g = static_cast<const TG*>(t.g);
  const int64_t end = begin + kBlockElems < t.numel ? begin + kBlockElems : t.numel;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float gi = to_float(g[i]);
    const float msi = s.alpha * t.ms[i] + s.one_minus_alpha * (gi * gi);
    t.ms[i] = msi;
    float step = StyleTf ? __fdiv_rn(s.lr * gi, __fsqrt_rn(msi + s.eps))
                         : __fdiv_rn(gi, __fsqrt_rn(msi) + s.eps);
    if (HasMomentum) {
      step = s.momentum * t.buf[i] + step;
      t.buf[i] = step;
    }
    if (!StyleTf) step = s.lr * step;
    p[i] = from_float<TP>(to_float(p[i]) - step);
  }
}

template <bool StyleTf, bool HasMomentum>
__global__ void __launch_bounds__(kThreads) rmsprop_kernel(const Table table, Scalars s) {
  const int64_t block = blockIdx.x;
  int t = 0;
  while (t + 1 < table.count && table.first_block[t + 1] <= block) ++t;
  const TensorRef& ref = table.tensors[t];
  const int64_t begin = (block - table.first_block[t]) * kBlockElems;
  // The (param, grad) dtype pair is uniform over the block: no divergence.
  const int code = ref.p_dtype * 3 + ref.g_dtype;
  switch (code) {
    case 0: update<float, float, StyleTf, HasMomentum>(ref, begin, s); break;
    case 3: update<f16, float, StyleTf, HasMomentum>(ref, begin, s); break;
    case 4: update<f16, f16, StyleTf, HasMomentum>(ref, begin, s); break;
    case 6: update<bf16, float, StyleTf, HasMomentum>(ref, begin, s); break;
    case 8: update<bf16, bf16, StyleTf, HasMomentum>(ref, begin, s); break;
    default: break;  // other pairs are refused on the host
  }
}

void launch_table(const int64_t* rows, int64_t count, const Scalars& s, bool style_tf,
                  bool has_momentum, cudaStream_t stream) {
  using locoprop::cpu::kRmspropColumns;
  Table table{};
  table.count = int32_t(count);
  table.first_block[0] = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t* row = rows + i * kRmspropColumns;
    const int p_dtype = int(row[5]), g_dtype = int(row[6]);
    if (!(g_dtype == p_dtype || g_dtype == int(Dtype::F32)) || p_dtype < 0 || p_dtype > 2)
      throw std::invalid_argument("rmsprop: grads must have the params' dtype or fp32");
    table.tensors[i] = TensorRef{reinterpret_cast<void*>(row[0]),
                                 reinterpret_cast<const void*>(row[1]),
                                 reinterpret_cast<float*>(row[2]),
                                 reinterpret_cast<float*>(row[3]), row[4], p_dtype, g_dtype};
    table.first_block[i + 1] = table.first_block[i] + (row[4] + kBlockElems - 1) / kBlockElems;
  }
  const int64_t blocks = table.first_block[count];
  if (blocks == 0) return;
  if (style_tf) {
    if (has_momentum) rmsprop_kernel<true, true><<<unsigned(blocks), kThreads, 0, stream>>>(table, s);
    else rmsprop_kernel<true, false><<<unsigned(blocks), kThreads, 0, stream>>>(table, s);
  } else {
    if (has_momentum) rmsprop_kernel<false, true><<<unsigned(blocks), kThreads, 0, stream>>>(table, s);
    else rmsprop_kernel<false, false><<<unsigned(blocks), kThreads, 0, stream>>>(table, s);
  }
  check_launch("rmsprop_multi");
}

}  // namespace

void rmsprop_multi(const int64_t* table, int64_t n_tensors, float lr, float alpha,
                   float one_minus_alpha, float eps, float momentum, bool style_tf,
                   bool has_momentum, void* stream) {
  const Scalars s{lr, alpha, one_minus_alpha, eps, momentum};
  for (int64_t first = 0; first < n_tensors; first += kMaxTensorsPerLaunch) {
    const int64_t count = n_tensors - first < kMaxTensorsPerLaunch ? n_tensors - first
                                                                    : kMaxTensorsPerLaunch;
    launch_table(table + first * locoprop::cpu::kRmspropColumns, count, s, style_tf,
                 has_momentum, as_stream(stream));
  }
}

}  // namespace locoprop::cuda
