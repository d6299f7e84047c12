// The C++ side of the one activation table (locoprop_kernels/activations.py).
//
// The integer codes are the table's `code` column: Python passes them through unchanged, and
// `_C.ACTIVATION_CODES` exports `kActivations` below so that a test can hold the two tables
// side by side. Adding an element-wise activation is one enum value, one row of
// `kActivations` and one branch in `apply_elementwise`, all in this header: the dispatch is
// generated from `kActivations`, and every kernel, CPU or CUDA, calls `apply_elementwise<A>`
// for all codes but Softmax (the one row-wise activation, which has its own kernels).
//
// The fp32 functions below avoid libm on purpose: a loop that calls expf/tanhf does not
// vectorise without -ffast-math, and the epilogues evaluate f on every element of every
// layer's (B, d_out) output, ten times per outer step. `exp_fp32` is a range reduction
// plus a degree-7 polynomial (max relative error ~2 ulp on the range we use), written with
// selects instead of branches so that the compiler vectorises it and nvcc compiles it.
#pragma once

#include <cstddef>
#include <iterator>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "portable.h"

namespace locoprop {

enum class Activation : int {
  Identity = 0,
  Tanh = 1,
  Sigmoid = 2,
  Softmax = 3,
  Relu = 4,
  LeakyRelu = 5,
  Gelu = 6,
  GeluTanh = 7,
  Silu = 8,
};

// Every activation with the name locoprop_kernels/activations.py gives it.
struct ActivationName {
  Activation code;
  const char* name;
};

inline constexpr ActivationName kActivations[] = {
    {Activation::Identity, "identity"}, {Activation::Tanh, "tanh"},
    {Activation::Sigmoid, "sigmoid"},   {Activation::Softmax, "softmax"},
    {Activation::Relu, "relu"},         {Activation::LeakyRelu, "leaky_relu"},
    {Activation::Gelu, "gelu"},         {Activation::GeluTanh, "gelu_tanh"},
    {Activation::Silu, "silu"},
};

// nn.LeakyReLU's default negative slope.
constexpr float kLeakyReluSlope = 0.01f;

// e^x for x <= 88 (arguments are clamped to [-87.3, 88]: e^-87.3 is the smallest normal
// float, e^88 < FLT_MAX). Every caller passes x <= 0 except sigmoid's e^-z, where a
// clamped value changes 1/(1+e^-z) by less than 1e-38.
LOCOPROP_HD float exp_fp32(float x) {
  x = x < -87.33654f ? -87.33654f : (x > 88.0f ? 88.0f : x);
  // x = n ln2 + r with n an integer, |r| <= ln2/2. Adding and subtracting 1.5 * 2^23 rounds
  // to the nearest integer in the fp32 adder (no rint call to block vectorisation).
  const float shifter = 12582912.0f;
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  // ln2 split in two so that n * ln2_hi is exact (ln2_hi has 9 low zero bits).
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  // Taylor series of e^r to r^7 / 7!: truncation error < |r|^8/8! <= 1.4e-9 for |r| <= 0.347.
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n built directly in the exponent field; n is in [-126, 127] after the clamp. A NaN x
  // gives a NaN p (through r) whatever the scale, but converting a NaN n to an integer is
  // undefined behaviour in C++: it goes through a select of 0 first.
  const float n_finite = n == n ? n : 0.0f;
  return p * bits_float(uint32_t(int32_t(n_finite) + 127) << 23);
}

// Below this |z| tanh uses its odd Taylor series: (1 - e^{-2z}) / (1 + e^{-2z}) loses about
// eps / |z| relative precision to cancellation near 0. At 0.2 the first dropped term (z^11)
// is ~2e-10 relative, and the exp form's error above it ~2e-7. Same split as the Triton side.
constexpr float kTanhSeriesBelow = 0.2f;

LOCOPROP_HD float tanh_fp32(float z) {
  const float a = z < 0.0f ? -z : z;
  const float t = exp_fp32(-2.0f * a);
  const float far = (1.0f - t) / (1.0f + t);
  const float a2 = a * a;
  // tanh a = a (1 - a^2/3 + 2a^4/15 - 17a^6/315 + 62a^8/2835), Horner form.
  const float near = a * (1.0f + a2 * (-1.0f / 3.0f + a2 * (2.0f / 15.0f +
                     a2 * (-17.0f / 315.0f + a2 * (62.0f / 2835.0f)))));
  const float r = a < kTanhSeriesBelow ? near : far;
  return z < 0.0f ? -r : r;
}

// Past the clamp of exp_fp32 (-z > 88) the formula would stay at 1/(1 + e^88) = 6.05e-39 for
// every z down to -inf, and silu = z sigmoid(z) would grow with |z| (-6e-9 at z = -1e30,
// -inf at -inf where torch gives NaN). torch's fp32 sigmoid is exactly 0 once e^-z overflows,
// z <= -88.72284 (the float above ln FLT_MAX): the same here, by a select so the loops stay
// vectorised. Between -88.72284 and -88 the result is within 3.2e-39 (a subnormal) of torch's.
constexpr float kSigmoidZeroBelow = -88.72283f;

LOCOPROP_HD float sigmoid_fp32(float z) {
  return select_float(z < kSigmoidZeroBelow, 0.0f, 1.0f / (1.0f + exp_fp32(-z)));
}

// Phi(z), the standard normal CDF, for GELU = z Phi(z). erfc(a) for a = |z|/sqrt(2) >= 0 from
// Abramowitz & Stegun 7.1.26, erfc(a) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^{-a^2} with
// t = 1 / (1 + p a): absolute error <= 1.5e-7 (their bound; measured 1.3e-7 against float64
// over [-10, 10] in tests/test_cpp_backend.py's elementwise test). Phi(z) = 1 - erfc/2 for
// z >= 0 and erfc/2 for z < 0, so the negative tail is never 1 - (1 - small).
LOCOPROP_HD float normal_cdf_fp32(float z) {
  const float a = (z < 0.0f ? -z : z) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f +
                     t * (-1.453152027f + t * 1.061405429f))));
  const float half_erfc = 0.5f * poly * exp_fp32(-a * a);
  return z < 0.0f ? half_erfc : 1.0f - half_erfc;
}

// GELU's tanh form as torch computes it: 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))).
LOCOPROP_HD float gelu_tanh_fp32(float z) {
  const float inner = 0.79788456080286536f * (z + 0.044715f * z * z * z);
  return 0.5f * z * (1.0f + tanh_fp32(inner));
}

// f(z) for the element-wise activations (every code but Softmax, which is row-wise and
// handled by the kernels: max, sum of exp, then the division).
template <Activation A> LOCOPROP_HD float apply_elementwise(float z) {
  if constexpr (A == Activation::Tanh) {
    return tanh_fp32(z);
  } else if constexpr (A == Activation::Sigmoid) {
    return sigmoid_fp32(z);
  } else if constexpr (A == Activation::Relu) {
    return z < 0.0f ? 0.0f : z;  // NaN stays NaN, as torch.relu
  } else if constexpr (A == Activation::LeakyRelu) {
    // select_float, not `?:`: GCC will not if-convert the multiply under a condition, and a
    // branch would keep the loops scalar. NaN * slope stays NaN, -0 stays -0.
    return select_float(z > 0.0f, z, kLeakyReluSlope * z);
  } else if constexpr (A == Activation::Gelu) {
    return z * normal_cdf_fp32(z);
  } else if constexpr (A == Activation::GeluTanh) {
    return gelu_tanh_fp32(z);
  } else if constexpr (A == Activation::Silu) {
    return z * sigmoid_fp32(z);
  } else {
    return z;
  }
}

template <Activation A> using ActivationTag = std::integral_constant<Activation, A>;

// The one switch from a run-time code to a compile-time activation: `fn(ActivationTag<A>{})`.
// It walks `kActivations` at compile time (one `if` per row), so a new row is dispatched with
// no edit here.
template <std::size_t I = 0, typename Fn> void dispatch_activation(int code, Fn&& fn) {
  if constexpr (I < std::size(kActivations)) {
    if (code == int(kActivations[I].code)) {
      fn(ActivationTag<kActivations[I].code>{});
      return;
    }
    dispatch_activation<I + 1>(code, fn);
  } else {
    throw std::invalid_argument("locoprop: unknown activation code " + std::to_string(code));
  }
}

}  // namespace locoprop
