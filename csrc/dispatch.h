// Run-time dtype codes -> compile-time storage types, the storage twin of dispatch_activation.
#pragma once

#include <stdexcept>
#include <string>

#include "storage.h"

namespace locoprop {

template <typename T> struct TypeTag { using type = T; };

// Calls fn(TypeTag<float|f16|bf16>{}) for a Dtype code.
template <typename Fn> void dispatch_dtype(int code, Fn&& fn) {
  switch (static_cast<Dtype>(code)) {
    case Dtype::F32: fn(TypeTag<float>{}); return;
    case Dtype::F16: fn(TypeTag<f16>{}); return;
    case Dtype::BF16: fn(TypeTag<bf16>{}); return;
  }
  throw std::invalid_argument("locoprop: unknown dtype code " + std::to_string(code));
}

// The (param, grad) storage pairs the optimizers take: grads in the param's dtype or in fp32
// (an fp32 gradient accumulated for low-precision params).
inline bool is_param_grad_pair(int p_code, int g_code) {
  const bool known = p_code >= int(Dtype::F32) && p_code <= int(Dtype::BF16);
  return known && (g_code == p_code || g_code == int(Dtype::F32));
}

// Calls fn(TypeTag<P>{}, TypeTag<G>{}) for one of those pairs and returns true; returns false
// for any other pair (the host refuses those first, see is_param_grad_pair). No exceptions,
// so that CUDA kernels call it too (once per block: the pair is uniform over a tensor).
template <typename Fn> LOCOPROP_HD bool dispatch_param_grad(int p_code, int g_code, Fn&& fn) {
  const Dtype p = static_cast<Dtype>(p_code);
  if (g_code == p_code) {
    switch (p) {
      case Dtype::F32: fn(TypeTag<float>{}, TypeTag<float>{}); return true;
      case Dtype::F16: fn(TypeTag<f16>{}, TypeTag<f16>{}); return true;
      case Dtype::BF16: fn(TypeTag<bf16>{}, TypeTag<bf16>{}); return true;
    }
  } else if (g_code == int(Dtype::F32)) {
    switch (p) {
      case Dtype::F16: fn(TypeTag<f16>{}, TypeTag<float>{}); return true;
      case Dtype::BF16: fn(TypeTag<bf16>{}, TypeTag<float>{}); return true;
      case Dtype::F32: break;  // handled above
    }
  }
  return false;
}

}  // namespace locoprop
