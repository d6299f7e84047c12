// Run-time dtype code -> compile-time storage type, the storage twin of dispatch_activation.
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

}  // namespace locoprop
