// Things every kernel file needs, on the host and (under nvcc) on the device: a qualifier
// macro, bit casts and the correctly rounded sqrt and division. No torch, no CUDA runtime
// headers: a plain C++17 header.
#pragma once

#include <cmath>
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

// c ? a : b on the bits: the same value, but a select the vectoriser takes even where `a` is
// float arithmetic (which GCC will not evaluate unconditionally while FP traps may be on).
LOCOPROP_HD float select_float(bool c, float a, float b) {
  const uint32_t mask = c ? ~0u : 0u;
  return bits_float((float_bits(a) & mask) | (float_bits(b) & ~mask));
}

// IEEE (correctly rounded) sqrt and division on both sides, so that an optimizer tracks its
// PyTorch twin to rounding. On the device the _rn intrinsics keep them exact even under
// --use_fast_math; on the host std::sqrt and '/' are exact as long as nothing builds with
// -ffast-math (the CMake flags only drop errno, which lets the vectoriser use sqrtps).
LOCOPROP_HD float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

LOCOPROP_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// One rounding each, never fused with a neighbour: a product or sum rounded on its own, and a
// multiply-add rounded once. For code that must reproduce another library's rounding bit for
// bit (rmsprop.h's "torch" style). On the device the _rn intrinsics are never contracted
// (nvcc fuses a plain `a * b + c` by default). On the host `*` and `+` stay separate only
// where the translation unit is compiled with -ffp-contract=off (GCC's default in GNU mode is
// "fast", which fuses): CMakeLists.txt sets it for cpu/rmsprop.cpp, and
// tests/test_rmsprop_bitwise.py fails if it is lost. fma_rn is std::fma: the FMA instruction
// in the x86-64-v3/v4 clones, libm's (correctly rounded, slow) fmaf in the baseline one.
LOCOPROP_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

LOCOPROP_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

LOCOPROP_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

}  // namespace locoprop
