// pybind11 module `locoprop_kernels._C`: the C++ kernels behind the "cpp" backend.
//
// Every tensor crosses as an integer address (`tensor.data_ptr()` in Python) with its sizes
// and an integer dtype code, so the core has no torch headers and other frameworks can call
// it too. The caller (locoprop_kernels/cpp_backend.py) guarantees contiguous buffers of the
// stated sizes. The GIL is released while a kernel runs. CUDA entry points take the stream
// as an integer (`torch.cuda.current_stream().cuda_stream`) and exist only in a CUDA build;
// `build_info()` says which parts were built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/parallel.h"
#if defined(LOCOPROP_WITH_CUDA)
#include "cuda/kernels.h"
#endif

namespace py = pybind11;
using locoprop::cpu::kRmspropColumns;

namespace {

template <typename T = void> T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

void check_table(const std::vector<int64_t>& table) {
  if (table.empty() || table.size() % kRmspropColumns != 0)
    throw std::invalid_argument("rmsprop table: expected a non-empty multiple of " +
                                std::to_string(kRmspropColumns) + " integers per tensor");
}

py::dict build_info() {
  py::dict info;
  info["cpu"] = true;
  info["openmp"] = locoprop::cpu::built_with_openmp();
  info["max_threads"] = locoprop::cpu::max_threads();
#if defined(LOCOPROP_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_arch"] = LOCOPROP_CUDA_ARCHS;
#else
  info["cuda"] = false;
#endif
  info["rmsprop_columns"] = kRmspropColumns;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "locoprop-kernels C++/CUDA kernels (raw pointers; see locoprop_kernels/cpp_backend.py)";
  m.def("build_info", &build_info, "Which parts were built: {'cpu', 'openmp', 'cuda', ...}");

  m.def("matched_loss_delta",
        [](uintptr_t z, uintptr_t bias, uintptr_t target, int dtype, int64_t B, int64_t n,
           int activation, float scale) {
          py::gil_scoped_release nogil;
          locoprop::cpu::matched_loss_delta(ptr<float>(z), ptr(bias), ptr(target), dtype, B, n,
                                            activation, scale);
        },
        "z (B, n) fp32 <- scale * (f(z + bias) - target), in place; bias may be 0");
  m.def("matched_loss_finish",
        [](uintptr_t grad_w32, uintptr_t weight, uintptr_t anchor_weight, uintptr_t out_weight,
           uintptr_t delta, uintptr_t bias, uintptr_t anchor_bias, uintptr_t out_bias,
           int dtype, int64_t B, int64_t n, int64_t k, bool has_prox, float inv_eta) {
          py::gil_scoped_release nogil;
          locoprop::cpu::matched_loss_finish(ptr<const float>(grad_w32), ptr(weight),
                                             ptr(anchor_weight), ptr(out_weight),
                                             ptr<const float>(delta), ptr(bias), ptr(anchor_bias),
                                             ptr(out_bias), dtype, B, n, k, has_prox, inv_eta);
        },
        "out_weight = grad_w32 [+ (W - W0) inv_eta]; out_bias = colsum(delta) [+ (b - b0) inv_eta]");
  m.def("local_targets",
        [](uintptr_t z, uintptr_t g, uintptr_t y, int dtype, int64_t B, int64_t n, int activation,
           float gamma) {
          py::gil_scoped_release nogil;
          locoprop::cpu::local_targets(ptr(z), ptr(g), ptr(y), dtype, B, n, activation, gamma);
        },
        "y = f(z) - gamma * g, (B, n)");
  m.def("rmsprop_multi",
        [](const std::vector<int64_t>& table, float lr, float alpha, float one_minus_alpha,
           float eps, float momentum, bool style_tf, bool has_momentum) {
          check_table(table);
          py::gil_scoped_release nogil;
          locoprop::cpu::rmsprop_multi(table.data(), int64_t(table.size()) / kRmspropColumns, lr,
                                       alpha, one_minus_alpha, eps, momentum, style_tf,
                                       has_momentum);
        },
        "One RMSProp step for all tensors; table rows: p, g, ms, buf, numel, p_dtype, g_dtype");

#if defined(LOCOPROP_WITH_CUDA)
  m.def("cuda_matched_loss_delta",
        [](uintptr_t z, uintptr_t bias, uintptr_t target, int dtype, int64_t B, int64_t n,
           int activation, float scale, uintptr_t stream) {
          py::gil_scoped_release nogil;
          locoprop::cuda::matched_loss_delta(ptr<float>(z), ptr(bias), ptr(target), dtype, B, n,
                                             activation, scale, ptr(stream));
        });
  m.def("cuda_matched_loss_finish",
        [](uintptr_t grad_w32, uintptr_t weight, uintptr_t anchor_weight, uintptr_t out_weight,
           uintptr_t delta, uintptr_t bias, uintptr_t anchor_bias, uintptr_t out_bias,
           int dtype, int64_t B, int64_t n, int64_t k, bool has_prox, float inv_eta,
           uintptr_t stream) {
          py::gil_scoped_release nogil;
          locoprop::cuda::matched_loss_finish(ptr<const float>(grad_w32), ptr(weight),
                                              ptr(anchor_weight), ptr(out_weight),
                                              ptr<const float>(delta), ptr(bias),
                                              ptr(anchor_bias), ptr(out_bias), dtype, B, n, k,
                                              has_prox, inv_eta, ptr(stream));
        });
  m.def("cuda_local_targets",
        [](uintptr_t z, uintptr_t g, uintptr_t y, int dtype, int64_t B, int64_t n, int activation,
           float gamma, uintptr_t stream) {
          py::gil_scoped_release nogil;
          locoprop::cuda::local_targets(ptr(z), ptr(g), ptr(y), dtype, B, n, activation, gamma,
                                        ptr(stream));
        });
  m.def("cuda_rmsprop_multi",
        [](const std::vector<int64_t>& table, float lr, float alpha, float one_minus_alpha,
           float eps, float momentum, bool style_tf, bool has_momentum, uintptr_t stream) {
          check_table(table);
          py::gil_scoped_release nogil;
          locoprop::cuda::rmsprop_multi(table.data(), int64_t(table.size()) / kRmspropColumns,
                                        lr, alpha, one_minus_alpha, eps, momentum, style_tf,
                                        has_momentum, ptr(stream));
        });
#endif
}
