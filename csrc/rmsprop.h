// RMSProp: the options, the tensor table and the per-element update, written once for the
// CPU (cpu/rmsprop.cpp) and the GPU (cuda/rmsprop.cu). The Python twin of this header is
// locoprop_kernels/rmsprop_options.py; the field names are the same.
//
// Per element, math in fp32 registers whatever the storage dtype (p the param before the
// update, g the grad; state in fp32):
//
//   g  = -g                                   if maximize
//   g  = g + weight_decay * p                 if weight_decay != 0 (else g is the grad, bit for bit)
//   ms = alpha * ms + (1 - alpha) * g^2
//   ga = lerp(ga, g, 1 - alpha), v = ms - ga^2   if centered, else v = ms
//   "tf":    step = lr * g / sqrt(v + eps);  buf = momentum * buf + step, step = buf  if momentum != 0
//            p -= step
//   "torch": step = g / (sqrt(v) + eps);     buf = momentum * buf + step, step = buf  if momentum != 0
//            p -= lr * step
//
// Style "torch" is torch.optim.RMSprop (foreach=False and foreach=True), BIT FOR BIT in fp32
// on the CPU: the same operations in the same order with the same roundings (which products
// are fused into multiply-adds, which are rounded first), listed at rmsprop_update, and
// torch's own square root (MKL's, which cpu/rmsprop.cpp calls a block at a time; the IEEE
// one here in rmsprop_update). This needs the CPU file compiled with -ffp-contract=off
// (CMakeLists.txt) and the helpers of portable.h (mul_rn, add_rn, fma_rn: one rounding each,
// never contracted). On the GPU the same order and the IEEE sqrt, not compared with torch's
// CUDA kernels (nor run here). Style "tf" is TF1's RMSPropOptimizer,
// whose centered form is sqrt(ms - mg^2 + eps). The momentum buffer is read and written only
// when momentum != 0, the gradient average only when centered.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "dispatch.h"
#include "portable.h"
#include "storage.h"

namespace locoprop {

// Everything of an update but the learning rate, which changes every step and travels beside
// it. `one_minus_alpha` is its own field so that the caller forms 1 - alpha in float64 and
// rounds once, as torch does with its Python-float scalars. Defaults: torch.optim.RMSprop's,
// as RMSpropOptions in Python.
struct RmspropOptions {
  bool style_tf = false;
  float alpha = 0.99f;
  float one_minus_alpha = 0.01f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  float momentum = 0.0f;
  bool centered = false;
  bool maximize = false;
};

// The tensor table: kRmspropColumns int64 per tensor, in this order. Addresses are
// `tensor.data_ptr()`; the state tensors are fp32 and have the param's numel.
enum RmspropColumn : int {
  kParamAddress = 0,
  kGradAddress = 1,
  kSquareAvgAddress = 2,
  kMomentumBufAddress = 3,  // 0 when momentum == 0
  kGradAvgAddress = 4,      // 0 when not centered
  kNumel = 5,
  kParamDtype = 6,          // storage.h's Dtype code
  kGradDtype = 7,           // the param's dtype or F32
  kRmspropColumns = 8,
};

// One table row, decoded. 56 bytes: 64 of them travel in a CUDA launch's arguments.
struct RmspropTensor {
  void* param;
  const void* grad;
  float* square_avg;
  float* momentum_buf;
  float* grad_avg;
  int64_t numel;
  int32_t param_dtype, grad_dtype;
};

inline RmspropTensor rmsprop_tensor(const int64_t* row) {
  return RmspropTensor{reinterpret_cast<void*>(row[kParamAddress]),
                       reinterpret_cast<const void*>(row[kGradAddress]),
                       reinterpret_cast<float*>(row[kSquareAvgAddress]),
                       reinterpret_cast<float*>(row[kMomentumBufAddress]),
                       reinterpret_cast<float*>(row[kGradAvgAddress]),
                       row[kNumel],
                       int32_t(row[kParamDtype]),
                       int32_t(row[kGradDtype])};
}

// std::invalid_argument (ValueError in Python) for a table the kernels cannot run: a bad
// dtype pair, a negative numel, or a null address the options need. Rows with numel 0 are
// skipped whatever their addresses (torch gives an empty tensor data_ptr() 0).
inline void check_rmsprop_table(const int64_t* table, int64_t n_tensors,
                                const RmspropOptions& options) {
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t* row = table + t * kRmspropColumns;
    auto fail = [t](const std::string& why) {
      throw std::invalid_argument("rmsprop table row " + std::to_string(t) + ": " + why);
    };
    if (row[kNumel] < 0) fail("negative numel " + std::to_string(row[kNumel]));
    if (!is_param_grad_pair(int(row[kParamDtype]), int(row[kGradDtype])))
      fail("dtype codes (" + std::to_string(row[kParamDtype]) + ", " +
           std::to_string(row[kGradDtype]) + "): grads must have the param's dtype or fp32");
    if (row[kNumel] == 0) continue;
    if (row[kParamAddress] == 0 || row[kGradAddress] == 0 || row[kSquareAvgAddress] == 0)
      fail("null param, grad or square_avg address");
    if (options.momentum != 0.0f && row[kMomentumBufAddress] == 0)
      fail("momentum != 0 needs a momentum_buf address");
    if (options.centered && row[kGradAvgAddress] == 0)
      fail("centered needs a grad_avg address");
  }
}

// The options that change which memory an update touches or the shape of its math, as
// compile-time flags: each combination is its own loop, with no dead loads. maximize and
// weight_decay stay run-time selects (one negation, one multiply-add: free in a
// memory-bound loop, and 4x fewer instantiations).
template <bool StyleTf, bool HasMomentum, bool Centered> struct RmspropVariant {
  static constexpr bool style_tf = StyleTf;
  static constexpr bool has_momentum = HasMomentum;
  static constexpr bool centered = Centered;
};

// Calls fn(RmspropVariant<...>{}) for the options' flags.
template <typename Fn> void dispatch_rmsprop_variant(const RmspropOptions& o, Fn&& fn) {
  auto with = [&](auto style_tf, auto has_momentum, auto centered) {
    fn(RmspropVariant<decltype(style_tf)::value, decltype(has_momentum)::value,
                      decltype(centered)::value>{});
  };
  auto centered = [&](auto style_tf, auto has_momentum) {
    o.centered ? with(style_tf, has_momentum, std::true_type{})
               : with(style_tf, has_momentum, std::false_type{});
  };
  auto momentum = [&](auto style_tf) {
    o.momentum != 0.0f ? centered(style_tf, std::true_type{})
                       : centered(style_tf, std::false_type{});
  };
  o.style_tf ? momentum(std::true_type{}) : momentum(std::false_type{});
}

// torch.lerp(start, end, weight) for a scalar weight, as torch's vectorised CPU kernel computes
// it: start + w (end - start) for |w| < 0.5, else end + (w - 1)(end - start), ONE fused
// multiply-add (torch's Vectorized fmadd; its scalar tail is contracted to the same fma),
// exact at both ends. Written as base + coeff (end - start), so that the choice is two selects
// and the arithmetic one fma, which vectorises for every storage type.
LOCOPROP_HD float lerp_torch(float start, float end, float weight) {
  const bool small = (weight < 0.0f ? -weight : weight) < 0.5f;
  const float base = small ? start : end;
  const float coeff = select_float(small, weight, weight - 1.0f);  // see rmsprop_update
  return fma_rn(coeff, end - start, base);
}

// The update of element i (see the top of this file), in three stages so that the CPU can
// take the square roots of a block in one call between them (cpu/rmsprop.cpp):
//   g    = rmsprop_grad(...)                  the gradient after maximize and weight decay
//   x    = rmsprop_averages(g, ...)           writes square_avg (and grad_avg); x is what
//                                             the update takes the square root of
//   rmsprop_apply(..., g, sqrt(x), ...)       writes momentum_buf (if any) and the param
// rmsprop_update is the three in a row with the IEEE sqrt. Pointers the variant does not use
// are never read (they may be null). Written with selects and `if constexpr` only, so that
// the CPU's `#pragma omp simd` loops over them vectorise.
//
// Style "torch" rounds as torch.optim.RMSprop does on the CPU, op by op (torch 2.13, both
// its foreach=False and foreach=True paths, which call the same per-tensor kernels; probed
// bit for bit, tests/test_rmsprop_bitwise.py), with every scalar a Python float rounded once
// to fp32 (value.to<float>()) and fma(a, b, c) one rounding:
//   grad.add(param, alpha=wd)              fma(wd, p, g)
//   square_avg.mul_(alpha)                 ms * alpha
//   .addcmul_(grad, grad, value=1-alpha)   fma((1-alpha) * g, g, ms)     (v * t1, then fused)
//   grad_avg.lerp_(grad, 1-alpha)          lerp_torch
//   square_avg.addcmul(ga, ga, value=-1)   fma(-ga, ga, ms)
//   .sqrt() / .sqrt_()                     MKL VML's vmsSqrt where torch is built with MKL
//                                          (this CPU): NOT the IEEE sqrt, 1 ulp off it for
//                                          ~20% of inputs; cpu/rmsprop.cpp calls the same
//                                          function (torch_sqrt in backends/cpp.py)
//   .add_(eps)                             sqrt(v) + eps
//   buf.mul_(momentum).addcdiv_(g, avg)    buf * momentum + g / avg      (not fused)
//   param.add_(buf, alpha=-lr)             fma(-lr, buf, p)
//   param.addcdiv_(g, avg, value=-lr)      p + ((-lr) * g) / avg         (v * t1, then / t2)
// Style "tf" keeps its formulas (no oracle to match bit for bit) and the IEEE sqrt, each
// operation rounded on its own except the centered lerp and ms - ga^2, which it shares with
// "torch".
template <typename V, typename TP, typename TG>
LOCOPROP_HD float rmsprop_grad(const TP* param, const TG* grad, int64_t i,
                               const RmspropOptions& o) {
  // param[i] is read where it is used (one load after CSE; nothing writes it before the
  // end): reading it once at the top moves fp16's branchy conversion out of the selects.
  float g = to_float(grad[i]);
  // The two run-time options in bit operations, not `?:` on floats: GCC vectorises neither
  // a select on a bool option in a loop with 16-bit loads nor, without -fno-trapping-math, a
  // float operation under a condition. Both forms are exact: the sign flip is -g, and with
  // weight_decay == 0 g keeps the grad's bits (an inf or NaN param does not leak in).
  g = bits_float(float_bits(g) ^ (uint32_t(o.maximize) << 31));  // -g if maximize
  const float decayed = V::style_tf ? add_rn(g, mul_rn(o.weight_decay, to_float(param[i])))
                                    : fma_rn(o.weight_decay, to_float(param[i]), g);
  return select_float(o.weight_decay != 0.0f, decayed, g);
}

template <typename V>
LOCOPROP_HD float rmsprop_averages(float g, float* square_avg, float* grad_avg, int64_t i,
                                   const RmspropOptions& o) {
  const float ms =
      V::style_tf ? add_rn(mul_rn(o.alpha, square_avg[i]), mul_rn(o.one_minus_alpha, mul_rn(g, g)))
                  : fma_rn(mul_rn(o.one_minus_alpha, g), g, mul_rn(square_avg[i], o.alpha));
  square_avg[i] = ms;
  float v = ms;
  if constexpr (V::centered) {
    const float ga = lerp_torch(grad_avg[i], g, o.one_minus_alpha);
    grad_avg[i] = ga;
    v = fma_rn(-ga, ga, ms);
  }
  return V::style_tf ? add_rn(v, o.eps) : v;  // "tf": sqrt(v + eps), "torch": sqrt(v) + eps
}

template <typename V, typename TP>
LOCOPROP_HD void rmsprop_apply(TP* param, float* momentum_buf, int64_t i, float g, float root,
                               float lr, const RmspropOptions& o) {
  if constexpr (V::style_tf) {
    float step = div_rn(mul_rn(lr, g), root);
    if constexpr (V::has_momentum) {
      step = add_rn(mul_rn(o.momentum, momentum_buf[i]), step);
      momentum_buf[i] = step;
    }
    param[i] = from_float<TP>(to_float(param[i]) - step);
  } else {
    const float avg = add_rn(root, o.eps);
    float p;
    if constexpr (V::has_momentum) {
      const float buf = add_rn(mul_rn(momentum_buf[i], o.momentum), div_rn(g, avg));
      momentum_buf[i] = buf;
      p = fma_rn(-lr, buf, to_float(param[i]));
    } else {
      p = add_rn(to_float(param[i]), div_rn(mul_rn(-lr, g), avg));
    }
    param[i] = from_float<TP>(p);
  }
}

template <typename V, typename TP, typename TG>
LOCOPROP_HD void rmsprop_update(TP* param, const TG* grad, float* square_avg,
                                float* momentum_buf, float* grad_avg, int64_t i, float lr,
                                const RmspropOptions& o) {
  const float g = rmsprop_grad<V>(param, grad, i, o);
  const float x = rmsprop_averages<V>(g, square_avg, grad_avg, i, o);
  rmsprop_apply<V>(param, momentum_buf, i, g, sqrt_rn(x), lr, o);
}

}  // namespace locoprop
