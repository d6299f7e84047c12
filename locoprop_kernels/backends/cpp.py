"""The "cpp" backend: the C++ (OpenMP) and CUDA C++ kernels of ``locoprop_kernels._C``.

The GEMMs stay in PyTorch (its BLAS on the CPU, cuBLAS on the GPU); everything around them is
one pass of ours over raw pointers (``csrc/``, no torch headers):

    matched_loss_grad   Z = X W^T                       torch.mm          (B, d_out) fp32
                        (or Z0 + X (W - W0)^T, b - b0 for b: torch.addmm, the delta form)
                        Z <- scale (f(Z + b) - Y)       _C, one pass      (D, already scaled)
                        grad_W = D^T X                  torch.mm(out=)    (d_out, d_in)
                        grad_W += (W - W0)/eta; grad_b = sum_n D + (b - b0)/eta   _C, one pass
    matched_loss_grad_conv2d   the same on a Conv2d's output positions (``_conv.py``):
                        Z = conv2d(X, W), channels-last = (N*H_out*W_out, C_out) rows   torch
                        (or Z0 + conv2d(X, W - W0), b - b0 for b: the delta form)
                        Z <- scale (f(Z + b) - Y)       _C, the same delta pass
                        grad_W = conv2d_weight_grad(X, D)               torch
                        grad_W += (W - W0)/eta; grad_b = sum over rows of D + (b - b0)/eta   _C
    local_targets       Y = f(Z) - gamma G              _C, one pass
    rmsprop_step_       every tensor, one pass          _C, one call for all layers

Half storage (fp16/bf16) is upcast for the GEMMs, so the math is fp32 everywhere; the kernels
read and write the storage dtype directly. That storage dtype is the weight's (the parameters
and outputs, ``ops`` module docstring): with mixed precision (half x and target, fp32 weight)
x is upcast for the GEMMs as half storage is, and a target of another dtype than the weight is
upcast once (one pass over (B, d_out), next to the GEMMs' B d_out d_in), so that the kernels
see one storage dtype. ``LAUNCHES["cpp"]`` counts calls into ``_C``
(``locoprop_kernels.testing.count_launches().cpp``). CUDA tensors need an extension built
with ``LOCOPROP_CUDA=ON`` (``_C.build_info()["cuda"]``); their kernels run on the current
stream. A device ``lr`` tensor is read on the host (``.item()``, a sync on CUDA): use the
triton backend for steps captured in a CUDA graph.
"""
from __future__ import annotations

import collections
import functools
from typing import Callable, Optional

import torch  # first: _C links libgomp.so.1 by soname and must find torch's copy loaded

from .. import _C
from ..activations import get_activation
from . import _conv as conv
from .base import Backend

#: Calls into the C++/CUDA kernels since import; ``testing.count_launches`` reads it.
LAUNCHES = collections.Counter()

#: Storage dtype -> the ``Dtype`` code of ``csrc/storage.h`` (``_C.DTYPE_CODES``).
DTYPE_CODES = {getattr(torch, name): code for name, code in _C.DTYPE_CODES.items()}
IDENTITY = get_activation("identity").code


def build_info() -> dict:
    """What the extension was built with: {'cpu', 'openmp', 'max_threads', 'cuda', ...}."""
    return dict(_C.build_info())


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t contiguous and of ``dtype``: itself when it is already, else one converting copy."""
    if t.dtype == dtype:
        return t.contiguous()
    return t.to(dtype, memory_format=torch.contiguous_format)


def _into(out: Optional[torch.Tensor], dtype: torch.dtype, fill: Callable) -> None:
    """Run ``fill(buffer)`` on ``out`` itself when it is contiguous and of ``dtype`` (the
    kernels' storage dtype), else on a scratch buffer copied into ``out`` afterwards."""
    if out is None or (out.is_contiguous() and out.dtype == dtype):
        fill(out)
        return
    tmp = torch.empty(out.shape, dtype=dtype, device=out.device)
    fill(tmp)
    out.copy_(tmp)


class _Kernels:
    """The four entry points for one device type; CUDA ones get the current stream."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda and not _C.build_info()["cuda"]:
            raise ValueError("locoprop: backend 'cpp' got CUDA tensors, but locoprop_kernels._C "
                             "was built without CUDA (reinstall with LOCOPROP_CUDA=ON), or use "
                             "backend 'triton'")
        self.device = device

    def _call(self, name: str, *args):
        LAUNCHES["cpp"] += 1
        if self.cuda:
            stream = torch.cuda.current_stream(self.device).cuda_stream
            return getattr(_C, "cuda_" + name)(*args, stream)
        return getattr(_C, name)(*args)

    def matched_loss_delta(self, *args):
        self._call("matched_loss_delta", *args)

    def matched_loss_finish(self, *args):
        self._call("matched_loss_finish", *args)

    def local_targets(self, *args):
        self._call("local_targets", *args)

    def rmsprop_multi(self, *args):
        self._call("rmsprop_multi", *args)


#: MKL VML's mode bits as torch passes them (ATen/cpu/vml.h): VML_HA | VML_FTZDAZ_OFF |
#: VML_ERRMODE_IGNORE (mkl_vml_defines.h: 0x2, 0x140000, 0x100).
TORCH_VML_MODE = 0x2 | 0x140000 | 0x100
#: Environment variable: "1" makes the "torch" style take the IEEE sqrt (see torch_sqrt).
IEEE_SQRT_ENV = "LOCOPROP_IEEE_SQRT"


@functools.lru_cache(maxsize=1)
def torch_sqrt() -> tuple:
    """``(address, mode, name)`` of the fp32 square root ``torch.sqrt`` computes with on this
    CPU, for the "torch" style of ``rmsprop_multi`` (``csrc/cpu/rmsprop.cpp``), so that its
    result is torch.optim.RMSprop's bit for bit.

    torch built with MKL (the x86-64 Linux wheels) computes ``Tensor.sqrt`` of fp32 with MKL
    VML's ``vmsSqrt`` (high-accuracy mode, not the IEEE sqrt: 1 ulp off it for ~20% of inputs
    on this CPU, tests/test_rmsprop_bitwise.py). That function is exported by torch's own
    ``libtorch_cpu``: it is looked up there (already loaded, nothing new is loaded) and used
    only if it gives ``torch.sqrt``'s bits on a probe of 2^16 values across the fp32 range,
    special values included. ``name`` is "mkl-vml" then; "ieee" (address 0: the kernels' IEEE
    sqrt) when torch's sqrt is the IEEE one; "ieee, torch's sqrt not reproduced" when it is
    neither (the update is then within an ulp of torch's per sqrt, no longer bitwise).
    Computed once per process.

    The price on this CPU: MKL runs an SSE kernel for it on AMD processors, ~0.4 ns per value,
    which makes the "torch" style's step 1.3x to 1.8x the IEEE one's (still faster than
    torch's own foreach step; bench/rmsprop_torch_sqrt.py). ``LOCOPROP_IEEE_SQRT=1`` in the environment takes the IEEE sqrt
    (one pass, the old speed; every other operation still torch's), name "ieee
    (LOCOPROP_IEEE_SQRT=1)"."""
    import os

    if os.environ.get(IEEE_SQRT_ENV) == "1":
        return (0, 0, f"ieee ({IEEE_SQRT_ENV}=1)")
    gen = torch.Generator().manual_seed(0)
    probe = torch.cat([torch.exp(torch.randn(1 << 16, generator=gen) * 20.0),
                       torch.tensor([0.0, -0.0, 1.0, 4.0, float("inf"), float("nan"), -1.0,
                                     1e-45, 1e-38, 3.4e38], dtype=torch.float32)])
    want = probe.sqrt()

    def same(a):
        return bool(((a.view(torch.int32) == want.view(torch.int32))
                     | (a.isnan() & want.isnan())).all())

    # fp64 sqrt rounded once to fp32 is the correctly rounded fp32 sqrt (53 >= 2 * 24 + 2)
    if same(probe.double().sqrt().float()):
        return (0, 0, "ieee")
    try:
        import ctypes
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib",
                                       "libtorch_cpu.so"), mode=os.RTLD_NOLOAD)
        fn = lib.vmsSqrt
        fn.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
        out = torch.empty_like(probe)
        fn(probe.numel(), probe.data_ptr(), out.data_ptr(), TORCH_VML_MODE)
        if same(out):
            return (ctypes.cast(fn, ctypes.c_void_p).value, TORCH_VML_MODE, "mkl-vml")
    except (OSError, AttributeError):
        pass
    return (0, 0, "ieee, torch's sqrt not reproduced")


@functools.lru_cache(maxsize=64)
def _c_options(options) -> "_C.RmspropOptions":
    """The C++ twin (``csrc/rmsprop.h``) of an ``RMSpropOptions``; made once per options."""
    c = _C.RmspropOptions()
    c.style_tf = options.style == "tf"
    c.alpha, c.one_minus_alpha = options.alpha, options.one_minus_alpha
    c.eps, c.weight_decay, c.momentum = options.eps, options.weight_decay, options.momentum
    c.centered, c.maximize = options.centered, options.maximize
    return c


class CppBackend(Backend):
    """The C++/CUDA kernels behind the interface of ``backends/base.py``."""

    name = "cpp"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def launches(self):
        return LAUNCHES["cpp"]

    # ------------------------------------------------------------ matched_loss_grad

    def matched_loss_grad_into(self, x, weight, bias, target, activation, scale, anchor_weight,
                               anchor_bias, eta, out_weight, out_bias, precision,
                               anchor_preact=None):
        """grad_W = scale D^T X [+ (W - W0)/eta], grad_b = scale sum_n D [+ (b - b0)/eta]
        with D = f(X W^T + b) - Y, into ``out_weight`` (d_out, d_in) / ``out_bias`` (d_out,).
        Two C++ calls (one when there is nothing to do after the GEMM). ``precision`` is not
        used: the GEMMs are PyTorch's, in fp32 (on CUDA ``torch.backends.cuda.matmul``
        settings decide whether they use TF32). With ``anchor_preact`` Z0 the GEMM is
        Z0 + X (W - W0)^T (one addmm) and the delta kernel adds b - b0 instead of b."""
        kernels = _Kernels(x.device)
        code = get_activation(activation).code
        storage = weight.dtype  # the parameters' and outputs' dtype; x may be a half one
        dtype = DTYPE_CODES[storage]
        B, d_in = x.shape
        d_out = weight.shape[0]
        x32 = _fp32(x)
        bias = None if bias is None else bias.contiguous()
        target = _as_dtype(target, storage)

        # Stage 1: D (scaled) in place on the GEMM's output.
        if anchor_preact is None:
            delta, delta_bias = torch.mm(x32, _fp32(weight).T), bias
        else:
            delta = torch.addmm(_fp32(anchor_preact), x32,
                                (_fp32(weight) - _fp32(anchor_weight)).T).contiguous()
            delta_bias = None if bias is None else (bias - anchor_bias).contiguous()
        kernels.matched_loss_delta(delta.data_ptr(), _ptr(delta_bias), target.data_ptr(),
                                   dtype, B, d_out, code, float(scale))

        # Stage 2: the weight GEMM, straight into out_weight when it is fp32 and contiguous.
        has_prox = eta is not None
        direct = (storage == torch.float32 and out_weight.dtype == torch.float32
                  and out_weight.is_contiguous())
        grad_w32 = out_weight if direct else torch.empty((d_out, d_in), dtype=torch.float32,
                                                         device=x.device)
        torch.mm(delta.T, x32, out=grad_w32)
        weight_part = has_prox or not direct
        if not weight_part and bias is None:
            return
        if has_prox:
            weight, anchor_weight = weight.contiguous(), anchor_weight.contiguous()
            if bias is not None:
                anchor_bias = anchor_bias.contiguous()
        inv_eta = 1.0 / eta if has_prox else 0.0

        def finish(gw, gb):
            kernels.matched_loss_finish(
                grad_w32.data_ptr(), _ptr(weight) if has_prox else 0,
                _ptr(anchor_weight) if has_prox else 0, _ptr(gw) if weight_part else 0,
                delta.data_ptr(), _ptr(bias) if has_prox else 0,
                _ptr(anchor_bias) if has_prox else 0, _ptr(gb), dtype, B, d_out, d_in,
                has_prox, inv_eta)

        _into(out_weight if weight_part else None, storage,
              lambda gw: _into(out_bias, storage, lambda gb: finish(gw, gb)))

    # ------------------------------------------------------------ matched_loss_grad_conv2d

    def matched_loss_grad_conv2d_into(self, x, weight, bias, target, activation, stride,
                                      padding, dilation, groups, scale, anchor_weight,
                                      anchor_bias, eta, out_weight, out_bias, precision,
                                      anchor_preact=None):
        """The Linear path on a Conv2d's output positions (``backends/_conv.py``):
        Z = conv2d(X, W) channels-last, i.e. a (R = N*H_out*W_out, C_out) row matrix;
        D = scale (f(Z + b) - Y) in place on it (the Linear delta kernel);
        grad_W = conv2d_weight_grad(X, D) (torch); grad_W [+ (W - W0)/eta] and
        grad_b = sum over rows of D [+ (b - b0)/eta] (the Linear finish kernel). Two C++
        calls. A channels-last target of the weight's dtype is read where it lies; any other is
        copied once into rows (converted to the weight's dtype in the same pass). With
        ``anchor_preact`` Z0 the convolution is of W - W0 (formed in fp32), Z0 is added to it
        in fp32 and the delta kernel adds b - b0 instead of b, as in matched_loss_grad_into.
        ``precision`` only sets cuDNN's TF32 switch on CUDA (fp32 IEEE on the CPU)."""
        kernels = _Kernels(x.device)
        code = get_activation(activation).code
        storage = weight.dtype  # as in matched_loss_grad_into
        dtype = DTYPE_CODES[storage]
        x32, w32 = _fp32(x), _fp32(weight)
        anchored = anchor_preact is not None
        conv_weight = w32 - _fp32(anchor_weight) if anchored else w32
        with conv.conv_precision(precision, x.device):
            z = conv.preactivation(x32, conv_weight, stride, padding, dilation, groups)
        if anchored:
            z += anchor_preact  # in place: z stays channels-last, whatever Z0's layout
        delta = conv.rows(z)
        R, C_out = delta.shape
        target_rows = conv.rows_copy(target, storage)
        bias = None if bias is None else bias.contiguous()
        delta_bias = bias
        if anchored and bias is not None:  # the storage dtype, as the Linear path's
            delta_bias = (bias - anchor_bias).contiguous()
        kernels.matched_loss_delta(delta.data_ptr(), _ptr(delta_bias), target_rows.data_ptr(),
                                   dtype, R, C_out, code, float(scale))
        # Stage 2 needs no delta form: D is formed in fp32 from the accurate Z, and its GEMM
        # with X cancels nothing (each operand is rounded, if at all, relative to itself).
        with conv.conv_precision(precision, x.device):
            grad_w32 = conv.weight_grad(x32, w32, z, stride, padding, dilation, groups)

        has_prox = eta is not None
        if has_prox:
            weight, anchor_weight = weight.contiguous(), anchor_weight.contiguous()
            if bias is not None:
                anchor_bias = anchor_bias.contiguous()
        inv_eta = 1.0 / eta if has_prox else 0.0
        K = grad_w32.numel() // C_out

        def finish(gw, gb):
            kernels.matched_loss_finish(
                grad_w32.data_ptr(), _ptr(weight) if has_prox else 0,
                _ptr(anchor_weight) if has_prox else 0, gw.data_ptr(), delta.data_ptr(),
                _ptr(bias) if has_prox else 0, _ptr(anchor_bias) if has_prox else 0,
                _ptr(gb), dtype, R, C_out, K, has_prox, inv_eta)

        _into(out_weight, storage, lambda gw: _into(out_bias, storage,
                                                   lambda gb: finish(gw, gb)))

    # ------------------------------------------------------------ local_targets

    def local_targets_into(self, preact, grad_preact, activation, gamma, variant, out):
        """Y = f(Z) - gamma G (variant "M") or Z - gamma G ("S"), one C++ call."""
        kernels = _Kernels(preact.device)
        code = IDENTITY if variant == "S" else get_activation(activation).code
        z, g = preact.contiguous(), grad_preact.contiguous()
        B, n = z.shape
        _into(out, z.dtype, lambda y: kernels.local_targets(
            z.data_ptr(), g.data_ptr(), y.data_ptr(), DTYPE_CODES[z.dtype], B, n, code,
            float(gamma)))

    # ------------------------------------------------------------ rmsprop_step_

    def rmsprop_step_(self, params, grads, square_avgs, momentum_bufs, grad_avgs, lr,
                      options):
        """One RMSProp step on every tensor in one C++ call (a table of addresses)."""
        kernels = _Kernels(params[0].device)
        n = len(params)
        bufs = momentum_bufs if options.has_momentum else [None] * n
        avgs = grad_avgs if options.centered else [None] * n
        written = (params, square_avgs, bufs, avgs)
        # In-place tensors with gaps or odd strides are updated through contiguous copies.
        work = [[t if t is None or t.is_contiguous() else t.contiguous() for t in ts]
                for ts in written]
        # The table: _C.RMSPROP_TABLE_COLUMNS int64 per tensor. Plain Python on purpose: for
        # the autoencoder's 16 tensors it costs tens of microseconds, the kernel a millisecond.
        grads = [g.contiguous() for g in grads]  # kept alive until the kernel has run
        table = []
        for p, g, ms, buf, avg in zip(work[0], grads, work[1], work[2], work[3]):
            table += (p.data_ptr(), g.data_ptr(), ms.data_ptr(), _ptr(buf), _ptr(avg),
                      p.numel(), DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype])
        # On the CPU, torch's own sqrt for the "torch" style (torch_sqrt); CUDA's is IEEE.
        sqrt_args = () if kernels.cuda or options.style != "torch" else torch_sqrt()[:2]
        kernels.rmsprop_multi(table, float(lr), _c_options(options), *sqrt_args)
        for originals, copies in zip(written, work):
            for t, w in zip(originals, copies):
                if t is not w:
                    t.copy_(w)
