// pybind11 module `locoprop_kernels._C`: the C++ kernels behind the "cpp" backend.
//
// Every tensor crosses as an integer address (`tensor.data_ptr()` in Python) with its sizes
// and an integer dtype code, so the core has no torch headers and other frameworks can call
// it too. The caller (locoprop_kernels/backends/cpp.py) guarantees contiguous buffers of the
// stated sizes. The GIL is released while a kernel runs. CUDA entry points take the stream
// as an integer (`torch.cuda.current_stream().cuda_stream`) and exist only in a CUDA build;
// `build_info()` says which parts were built. The integer codes the kernels take are
// exported from their one C++ definition: ACTIVATION_CODES (activation.h), DTYPE_CODES
// (storage.h), RMSPROP_TABLE_COLUMNS (rmsprop.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <charconv>
#include <cstdint>
#include <string>
#include <vector>

#include "activation.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"
#include "rmsprop.h"
#include "storage.h"
#if defined(LOCOPROP_WITH_CUDA)
#include "cuda/kernels.h"
#endif

namespace py = pybind11;
using locoprop::kRmspropColumns;
using locoprop::RmspropOptions;

namespace {

template <typename T = void> T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

// The size of the table; its rows are checked by the kernels' entry points
// (check_rmsprop_table), which throw std::invalid_argument: ValueError here.
int64_t table_rows(const std::vector<int64_t>& table) {
  if (table.empty() || table.size() % kRmspropColumns != 0)
    throw std::invalid_argument("rmsprop table: expected a non-empty multiple of " +
                                std::to_string(kRmspropColumns) + " integers (" +
                                std::to_string(kRmspropColumns) + " per tensor), got " +
                                std::to_string(table.size()));
  return int64_t(table.size()) / kRmspropColumns;
}

// Floats in their shortest round-trip form ("0.99", not "0.99000001").
std::string repr(const RmspropOptions& o) {
  auto num = [](float v) {
    char buf[32];
    const auto end = std::to_chars(buf, buf + sizeof buf, v).ptr;
    return std::string(buf, end);
  };
  auto flag = [](bool b) { return b ? std::string("True") : std::string("False"); };
  return "RmspropOptions(style_tf=" + flag(o.style_tf) + ", alpha=" + num(o.alpha) +
         ", one_minus_alpha=" + num(o.one_minus_alpha) + ", eps=" + num(o.eps) +
         ", weight_decay=" + num(o.weight_decay) + ", momentum=" + num(o.momentum) +
         ", centered=" + flag(o.centered) + ", maximize=" + flag(o.maximize) + ")";
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
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "locoprop-kernels C++/CUDA kernels (raw pointers; see locoprop_kernels/backends/cpp.py)";
  m.def("build_info", &build_info, "Which parts were built: {'cpu', 'openmp', 'cuda', ...}");

  py::dict activation_codes;
  for (const auto& a : locoprop::kActivations) activation_codes[a.name] = int(a.code);
  m.attr("ACTIVATION_CODES") = activation_codes;
  py::dict dtype_codes;
  for (const auto& d : locoprop::kDtypes) dtype_codes[d.name] = int(d.code);
  m.attr("DTYPE_CODES") = dtype_codes;
  m.attr("RMSPROP_TABLE_COLUMNS") = int(kRmspropColumns);

  py::class_<RmspropOptions>(m, "RmspropOptions",
                             "Everything of an RMSProp update but lr (csrc/rmsprop.h)")
      .def(py::init<>())
      .def_readwrite("style_tf", &RmspropOptions::style_tf)
      .def_readwrite("alpha", &RmspropOptions::alpha)
      .def_readwrite("one_minus_alpha", &RmspropOptions::one_minus_alpha)
      .def_readwrite("eps", &RmspropOptions::eps)
      .def_readwrite("weight_decay", &RmspropOptions::weight_decay)
      .def_readwrite("momentum", &RmspropOptions::momentum)
      .def_readwrite("centered", &RmspropOptions::centered)
      .def_readwrite("maximize", &RmspropOptions::maximize)
      .def("__repr__", &repr);

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
        [](const std::vector<int64_t>& table, float lr, const RmspropOptions& options,
           uintptr_t sqrt_fn, int64_t sqrt_mode) {
          const int64_t rows = table_rows(table);
          const RmspropOptions o = options;  // a copy: the kernel runs without the GIL
          locoprop::cpu::VectorSqrt sqrt;
          sqrt.fn = reinterpret_cast<decltype(sqrt.fn)>(sqrt_fn);
          sqrt.mode = sqrt_mode;
          py::gil_scoped_release nogil;
          locoprop::cpu::rmsprop_multi(table.data(), rows, lr, o, sqrt);
        },
        py::arg("table"), py::arg("lr"), py::arg("options"), py::arg("sqrt_fn") = 0,
        py::arg("sqrt_mode") = 0,
        "One RMSProp step for all tensors. Table rows (RMSPROP_TABLE_COLUMNS int64 each): "
        "param, grad, square_avg, momentum_buf (0 if momentum == 0), grad_avg (0 if not "
        "centered) addresses, numel, param dtype code, grad dtype code. sqrt_fn: 0 (the IEEE "
        "sqrt) or the address of a vector sqrt with MKL VML's signature "
        "fn(int32 n, const float* in, float* out, int64 mode), called with sqrt_mode, for "
        "style 'torch' (backends/cpp.py passes torch's own)");

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
        [](const std::vector<int64_t>& table, float lr, const RmspropOptions& options,
           uintptr_t stream) {
          const int64_t rows = table_rows(table);
          const RmspropOptions o = options;
          py::gil_scoped_release nogil;
          locoprop::cuda::rmsprop_multi(table.data(), rows, lr, o, ptr(stream));
        },
        py::arg("table"), py::arg("lr"), py::arg("options"), py::arg("stream"));
#endif
}
