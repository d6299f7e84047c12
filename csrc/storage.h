// Storage dtypes: tensors are stored as fp32, fp16 or bf16, the math is always fp32.
//
// `Dtype` codes travel from Python as plain integers (`_C.DTYPE_CODES`, from `kDtypes`). The
// conversions are written with integer bit operations so that the same code runs on the CPU
// (where the loops stay vectorisable: no library calls, no branches the compiler cannot
// turn into selects) and on the GPU. Rounding is round-to-nearest-even, like torch's casts.
#pragma once

#include "portable.h"

namespace locoprop {

enum class Dtype : int { F32 = 0, F16 = 1, BF16 = 2 };

// Every storage dtype with torch's name for it.
struct DtypeName {
  Dtype code;
  const char* name;
};

inline constexpr DtypeName kDtypes[] = {
    {Dtype::F32, "float32"}, {Dtype::F16, "float16"}, {Dtype::BF16, "bfloat16"}};

// Distinct 16-bit storage types, so that templates dispatch on them.
struct f16 { uint16_t bits; };
struct bf16 { uint16_t bits; };

LOCOPROP_HD float to_float(float v) { return v; }

LOCOPROP_HD float to_float(bf16 v) { return bits_float(uint32_t(v.bits) << 16); }

// IEEE half -> float is exact. Half: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
LOCOPROP_HD float to_float(f16 v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1fu;
  const uint32_t mantissa = v.bits & 0x3ffu;
  // Normal numbers: rebias the exponent from 15 to 127 (add 112) and widen the mantissa.
  uint32_t normal = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  // Inf / NaN keep an all-ones exponent.
  uint32_t special = sign | 0x7f800000u | (mantissa << 13);
  // Zero and subnormals: mantissa * 2^-24, exact in fp32.
  uint32_t tiny = sign | float_bits(float(mantissa) * 5.9604644775390625e-8f);
  return bits_float(exponent == 0x1fu ? special : (exponent == 0u ? tiny : normal));
}

template <typename T> LOCOPROP_HD T from_float(float v);

template <> LOCOPROP_HD float from_float<float>(float v) { return v; }

template <> LOCOPROP_HD bf16 from_float<bf16>(float v) {
  const uint32_t u = float_bits(v);
  // Round to nearest even by adding 0x7fff plus the lowest kept bit; NaN stays a quiet NaN.
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16{uint16_t(nan ? ((u >> 16) | 0x40u) : rounded)};
}

template <> LOCOPROP_HD f16 from_float<f16>(float v) {
  const uint32_t u = float_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal range: rebias 127 -> 15 (subtract 112 << 23), round to nearest even on the 13
  // dropped bits; a carry out of the mantissa correctly bumps the exponent.
  const uint32_t normal = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // Below 2^-14 the result is subnormal (ulp 2^-24): adding 0.5f, whose ulp is 2^-24, lets
  // the fp32 adder do the rounding; what is left above 0.5 is the half's bit pattern.
  const uint32_t tiny = float_bits(bits_float(a) + 0.5f) - 0x3f000000u;
  // 65520 and above round to infinity; NaN stays a quiet NaN.
  uint32_t h = a < 0x38800000u ? tiny : (a < 0x477ff000u ? normal : 0x7c00u);
  if (a > 0x7f800000u) h = 0x7e00u;
  return f16{uint16_t(sign | h)};
}

}  // namespace locoprop
