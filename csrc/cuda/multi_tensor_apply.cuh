// Multi-tensor machinery on the GPU: many tensors in ONE launch, apart from what is done to
// their elements (the optimizer's functor, e.g. cuda/rmsprop.cu).
//
// The host decodes each row of a tensor table into a `Ref` (the functor's own struct, with an
// `int64_t numel` member) and packs up to kMaxTensorsPerLaunch of them into a TensorTable,
// which travels BY VALUE in the kernel's arguments: no device buffer, no host-to-device copy,
// nothing to keep alive until the kernel has run. Beside the refs it holds the prefix sum of
// each tensor's block count; a block finds its tensor by a scan of that prefix sum (at most
// kMaxTensorsPerLaunch compares against the parameter bank) and calls
// fn(ref, begin, end) for its kBlockElems elements [begin, end). Longer tables take one
// launch per kMaxTensorsPerLaunch tensors.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "launch.cuh"

namespace locoprop::cuda {

// 64 tensors: the autoencoder's 16 layers (weights and biases) in one launch, with room, and
// the arguments of the launch below the 4 KB every driver accepts (see TensorTable).
constexpr int kMaxTensorsPerLaunch = 64;

template <typename Ref> struct TensorTable {
  Ref tensors[kMaxTensorsPerLaunch];
  int32_t first_block[kMaxTensorsPerLaunch + 1];  // prefix sum of blocks per tensor
  int32_t count;
};

template <int kThreads, int kBlockElems, typename Ref, typename Functor>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(const TensorTable<Ref> table, const Functor fn) {
  const int32_t block = int32_t(blockIdx.x);
  int t = 0;
  while (t + 1 < table.count && table.first_block[t + 1] <= block) ++t;
  const Ref& ref = table.tensors[t];
  const int64_t begin = int64_t(block - table.first_block[t]) * kBlockElems;
  const int64_t end = begin + kBlockElems < ref.numel ? begin + kBlockElems : ref.numel;
  fn(ref, begin, end);
}

// Runs fn over every tensor of a table of `n_rows` rows of `columns` int64, on `stream`.
// make_ref(row) decodes one row (host side). `what` names the op in a launch error.
template <int kThreads, int kBlockElems, typename MakeRef, typename Functor>
void multi_tensor_apply(const int64_t* rows, int64_t n_rows, int columns, MakeRef&& make_ref,
                        const Functor& fn, cudaStream_t stream, const char* what) {
  using Ref = decltype(make_ref(rows));
  using Table = TensorTable<Ref>;
  // Classic limit on a launch's arguments; CUDA 12.1+ drivers take 32 KB on sm_70+, but
  // staying below 4 KB needs nothing of the driver.
  static_assert(sizeof(Table) + sizeof(Functor) <= 4096, "kernel arguments over 4 KB");
  for (int64_t first = 0; first < n_rows; first += kMaxTensorsPerLaunch) {
    const int64_t count =
        n_rows - first < kMaxTensorsPerLaunch ? n_rows - first : kMaxTensorsPerLaunch;
    Table table{};
    table.count = int32_t(count);
    int64_t blocks = 0;
    for (int64_t i = 0; i < count; ++i) {
      table.tensors[i] = make_ref(rows + (first + i) * columns);
      table.first_block[i] = int32_t(blocks);
      blocks += (table.tensors[i].numel + kBlockElems - 1) / kBlockElems;
      if (blocks > int64_t(INT32_MAX))
        throw std::invalid_argument(std::string(what) + ": over 2^31 blocks in one launch");
    }
    table.first_block[count] = int32_t(blocks);
    if (blocks == 0) continue;
    multi_tensor_kernel<kThreads, kBlockElems, Ref, Functor>
        <<<unsigned(blocks), kThreads, 0, stream>>>(table, fn);
    check_launch(what);
  }
}

}  // namespace locoprop::cuda
