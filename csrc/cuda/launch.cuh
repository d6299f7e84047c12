// Shared CUDA plumbing: stream cast, launch check, block reductions.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace locoprop::cuda {

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("locoprop CUDA kernel ") + what + ": " +
                             cudaGetErrorString(err));
}

// Grid for a grid-stride loop over n elements: enough blocks to fill the GPU, no more.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return unsigned(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

constexpr int kWarp = 32;

// Reduce `v` over the block with `op` (max or +); every thread gets the result. `scratch`
// holds one float per warp (blockDim.x <= 1024).
template <typename Op>
__device__ float block_reduce(float v, Op op, float* scratch) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int n_warps = (blockDim.x + kWarp - 1) / kWarp;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < n_warps; ++w) v = op(v, scratch[w]);
  return v;
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return a > b ? a : b; }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};

}  // namespace locoprop::cuda
