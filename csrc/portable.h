// Things every kernel file needs, on the host and (under nvcc) on the device: a qualifier
// macro and bit casts. No torch, no CUDA runtime headers: a plain C++17 header.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LOCOPROP_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined into the caller, so that the math takes the caller's instruction set (the
// CPU kernels are compiled once per x86-64 level, see cpu/parallel.h).
#define LOCOPROP_HD inline __attribute__((always_inline))
#else
#define LOCOPROP_HD inline
#endif

namespace locoprop {

// memcpy is the well-defined bit cast in C++17; compilers turn it into a register move.
LOCOPROP_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

LOCOPROP_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace locoprop
