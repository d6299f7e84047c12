"""RMSProp for every layer in ONE launch: both flavours and torch's options, math in fp32.

Per element, g the gradient and p the parameter before the update:

    g = -g                                  if maximize
    g = g + weight_decay p                  if weight_decay != 0 (else g is the grad, bit for bit)
    ms = alpha ms + (1 - alpha) g^2
    centered:  ga = lerp(ga, g, 1 - alpha);  v = ms - ga^2        else v = ms
    "tf"    (TF1):   step = lr g / sqrt(v + eps);   momentum != 0: buf = m buf + step, step = buf
                     p -= step
    "torch" (torch.optim.RMSprop):
                     step = g / (sqrt(v) + eps);    momentum != 0: buf = m buf + step, step = buf
                     p -= lr step

lerp is torch's formula, lerp(a, b, w) = a + w (b - a) if |w| < 0.5 else b - (b - a)(1 - w).
The "torch" flavour performs torch.optim.RMSprop's operations in the order and with the
roundings of torch's CPU kernels, as ``csrc/rmsprop.h`` lists them: ``grad.add(p, alpha=wd)``,
``addcmul`` (ms + ((1 - alpha) g) g, and ms - ga^2), ``lerp`` and ``add(buf, alpha=-lr)`` are
one fma each; ``p.addcdiv(g, avg, value=-lr)`` is p + ((-lr) g) / avg; everything else rounds on
its own. The kernels are compiled with ``enable_fp_fusion=False`` so that the compiler adds no
multiply-add of its own (``tools/triton_compile_check.py`` counts the fma instructions of every
variant). sqrt and division are the correctly rounded ones (``sqrt_rn``/``div_rn``). Two
limits: torch's CPU sqrt is MKL's, not the IEEE one (the cpp backend calls MKL for it, see
``backends/cpp.py``), so on a CPU this kernel would differ from torch by up to an ulp per sqrt;
and it is checked here only under the interpreter (numpy's fp32 operations, each correctly
rounded, and a true fma), where it is bit for bit the cpp kernel with the IEEE sqrt
(``tests/test_rmsprop_bitwise.py``); its GPU compile is not run here. The "tf" flavour keeps
its formulas, each operation rounded on its own but the centered lerp and ms - ga^2.
The momentum buffer is read and written only when momentum != 0, the grad average only when
centered.

Two layouts, one update helper (``_update``):
- flat: every list holds one contiguous buffer (an arena holding all layers as views); the
  kernel is a 1-D pass over it.
- table: a list of separate tensors; an int64 table holds each tensor's addresses (param,
  grad, square_avg, momentum_buf, grad_avg) and size, and a block map says which tensor and
  offset each program owns. One launch per (param dtype, grad dtype) group.
Params may be fp32/bf16/fp16 (grads the same or fp32); state is fp32. The options become the
kernels' run-time scalars and constexprs in one place, ``_kernel_args``.
"""
import torch
import triton
import triton.language as tl

from ._launch import launch, table_row

# 1024 elements per program: 4 KB of fp32 per stream, enough bytes in flight per SM on the
# GPU for a bandwidth-bound update, and few enough programs for the interpreter.
BLOCK = 1024

STYLES = ("tf", "torch")

# Address-table columns (int64 per tensor): addresses of param, grad, square_avg,
# momentum_buf (the square_avg's address when unused), grad_avg (likewise), and numel.
P_COL: tl.constexpr = tl.constexpr(0)
G_COL: tl.constexpr = tl.constexpr(1)
MS_COL: tl.constexpr = tl.constexpr(2)
BUF_COL: tl.constexpr = tl.constexpr(3)
GA_COL: tl.constexpr = tl.constexpr(4)
NUMEL_COL: tl.constexpr = tl.constexpr(5)
TABLE_FIELDS: tl.constexpr = tl.constexpr(6)
# Block-map columns: (tensor index, first element).
TENSOR_COL: tl.constexpr = tl.constexpr(0)
START_COL: tl.constexpr = tl.constexpr(1)
BLOCK_FIELDS: tl.constexpr = tl.constexpr(2)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _scalar(value, IS_PTR: tl.constexpr):
    """A scalar argument given by value, or by pointer to one fp32 on the device (so that a
    captured CUDA graph reads the current learning rate at replay)."""
    if IS_PTR:
        return tl.load(value)
    else:
        return value


@triton.jit
def _lerp(a, b, w):
    """torch.lerp(a, b, w) for a scalar weight w: torch's formula, its multiply-add fused
    (exact at w = 0 and w = 1)."""
    d = b - a
    return tl.where(tl.abs(w) < 0.5, tl.fma(w, d, a), tl.fma(-d, 1.0 - w, b))


@triton.jit
def _update(p_ptr, g_ptr, ms_ptr, buf_ptr, ga_ptr, offs, mask, lr, alpha, one_minus_alpha,
            eps, weight_decay, momentum, STYLE_TF: tl.constexpr, MAXIMIZE: tl.constexpr,
            HAS_WD: tl.constexpr, CENTERED: tl.constexpr, HAS_MOM: tl.constexpr):
    """Load, update and store one block of (param, grad, square_avg[, momentum_buf]
    [, grad_avg]): the math of the module docstring, in fp32, each operation in the order
    and with the rounding of ``csrc/rmsprop.h`` (torch's CPU kernels for the "torch" style;
    the kernels are compiled with ``enable_fp_fusion=False``, so every multiply-add here is
    an explicit ``tl.fma``)."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    # p is read where it is first needed: kept live from the top it costs the base variants
    # (no weight decay) ~16 registers per thread on sm_90 (tools/triton_compile_check.py).
    if HAS_WD:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if STYLE_TF:
            g = g + weight_decay * p
        else:
            g = tl.fma(p, weight_decay, g)  # grad.add(param, alpha=wd): one fma
    ms = tl.load(ms_ptr + offs, mask=mask, other=1.0)
    if STYLE_TF:
        ms = alpha * ms + one_minus_alpha * (g * g)
    else:
        # square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        ms = tl.fma(one_minus_alpha * g, g, ms * alpha)
    tl.store(ms_ptr + offs, ms, mask=mask)
    if CENTERED:
        ga = _lerp(tl.load(ga_ptr + offs, mask=mask, other=0.0), g, one_minus_alpha)
        tl.store(ga_ptr + offs, ga, mask=mask)
        v = tl.fma(-ga, ga, ms)
    else:
        v = ms
    if STYLE_TF:
        step = tl.div_rn(lr * g, tl.sqrt_rn(v + eps))
        if HAS_MOM:
            step = momentum * tl.load(buf_ptr + offs, mask=mask, other=0.0) + step
            tl.store(buf_ptr + offs, step, mask=mask)
        if not HAS_WD:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = p - step
    else:
        avg = tl.sqrt_rn(v) + eps
        if HAS_MOM:
            # buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
            buf = tl.load(buf_ptr + offs, mask=mask, other=0.0) * momentum + tl.div_rn(g, avg)
            tl.store(buf_ptr + offs, buf, mask=mask)
            if not HAS_WD:
                p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.fma(buf, -lr, p)
        else:
            step = tl.div_rn(-lr * g, avg)
            if not HAS_WD:
                p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p = p + step  # param.addcdiv_(grad, avg, value=-lr)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsprop_flat_kernel(p_ptr, g_ptr, ms_ptr, buf_ptr, ga_ptr, n, lr, alpha,
                         one_minus_alpha, eps, weight_decay, momentum,
                         STYLE_TF: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
                         CENTERED: tl.constexpr, HAS_MOM: tl.constexpr,
                         LR_IS_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """Flat layout: n elements in each buffer. Grid (cdiv(n, BLOCK),)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _update(p_ptr, g_ptr, ms_ptr, buf_ptr, ga_ptr, offs, offs < n, _scalar(lr, LR_IS_PTR),
            alpha, one_minus_alpha, eps, weight_decay, momentum,
            STYLE_TF, MAXIMIZE, HAS_WD, CENTERED, HAS_MOM)


@triton.jit
def _rmsprop_table_kernel(table_ptr, blocks_ptr, lr, alpha, one_minus_alpha, eps,
                          weight_decay, momentum, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                          STYLE_TF: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
                          CENTERED: tl.constexpr, HAS_MOM: tl.constexpr,
                          LR_IS_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """Table layout. table: int64 (tensors, TABLE_FIELDS), columns *_COL; blocks: int64
    (n_blocks, BLOCK_FIELDS) = (tensor index, first element). Grid (n_blocks,)."""
    block = blocks_ptr + tl.program_id(0).to(tl.int64) * BLOCK_FIELDS
    row = table_ptr + tl.load(block + TENSOR_COL) * TABLE_FIELDS
    p_ptr = tl.load(row + P_COL).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + G_COL).to(tl.pointer_type(G_DTYPE))
    ms_ptr = tl.load(row + MS_COL).to(tl.pointer_type(tl.float32))
    buf_ptr = tl.load(row + BUF_COL).to(tl.pointer_type(tl.float32))
    ga_ptr = tl.load(row + GA_COL).to(tl.pointer_type(tl.float32))
    offs = tl.load(block + START_COL) + tl.arange(0, BLOCK)
    _update(p_ptr, g_ptr, ms_ptr, buf_ptr, ga_ptr, offs, offs < tl.load(row + NUMEL_COL),
            _scalar(lr, LR_IS_PTR), alpha, one_minus_alpha, eps, weight_decay, momentum,
            STYLE_TF, MAXIMIZE, HAS_WD, CENTERED, HAS_MOM)


def _kernel_args(lr, options):
    """(run-time scalars, constexprs) of both kernels for ``lr`` and ``options``: the one
    place that turns the options into kernel arguments.

    Scalars: lr, alpha, 1 - alpha, eps, weight_decay, momentum. 1 - alpha is formed in
    float64 and rounded once (to the kernel's fp32), as torch does with its scalars. ``lr``
    may be a one-element fp32 device tensor, read by the kernel (CUDA-graph replay).
    """
    if options.style not in STYLES:
        raise ValueError(f"rmsprop_step_: options.style expected one of {STYLES}, "
                         f"got {options.style!r}")
    lr_is_ptr = isinstance(lr, torch.Tensor)
    alpha = float(options.alpha)
    weight_decay, momentum = float(options.weight_decay), float(options.momentum)
    scalars = (lr if lr_is_ptr else float(lr), alpha, 1.0 - alpha, float(options.eps),
               weight_decay, momentum)
    # enable_fp_fusion is a launch option (no multiply-add but the explicit tl.fma's), not a
    # kernel argument; the interpreter drops it.
    constexprs = dict(STYLE_TF=options.style == "tf", MAXIMIZE=bool(options.maximize),
                      HAS_WD=weight_decay != 0.0, CENTERED=bool(options.centered),
                      HAS_MOM=momentum != 0.0, LR_IS_PTR=lr_is_ptr, enable_fp_fusion=False)
    return scalars, constexprs


def _optional_state(name, tensors, used, n):
    """The list of an optional state (momentum_bufs, grad_avgs): checked when used, else
    None (its slots then hold the square_avgs' addresses, never dereferenced)."""
    if not used:
        return None
    if len(tensors) != n:
        raise ValueError(f"rmsprop_step_: argument '{name}' expected {n} tensors (the options "
                         f"use it), got {len(tensors)}")
    return tensors


#: Device copies of recent address tables, keyed by their content: a table holds only
#: addresses and sizes, so the same content is the same table whatever tensors it came from.
#: A step over the same tensors (an optimizer's, every iteration) then skips the host-to-device
#: copy, and a CUDA graph can capture it after one eager call (a capture allows no such copy).
_DEVICE_TABLES: dict = {}
_DEVICE_TABLES_MAX = 16


def _device_tables(device, rows):
    """(table, block map) on ``device`` for the table rows ``rows``, cached by content.

    The block map has one row (tensor index, first element) per BLOCK-element block of every
    tensor: tens of thousands of rows for a large model (ResNet-50: 25k), so it is built only
    on a cache miss, vectorised (built in Python per call it cost ~37 ms a step on an H200,
    20x the kernel)."""
    key = (device, tuple(map(tuple, rows)))
    cached = _DEVICE_TABLES.get(key)
    if cached is None:
        table = torch.tensor(rows, dtype=torch.int64)
        counts = (table[:, NUMEL_COL.value] + BLOCK - 1) // BLOCK
        tensor_index = torch.repeat_interleave(torch.arange(len(rows)), counts)
        first_block = torch.cumsum(counts, 0) - counts  # of each tensor, in the block map
        block = torch.arange(int(counts.sum()))
        blocks = torch.empty((block.numel(), BLOCK_FIELDS.value), dtype=torch.int64)
        blocks[:, TENSOR_COL.value] = tensor_index
        blocks[:, START_COL.value] = (block - first_block[tensor_index]) * BLOCK
        cached = (table.to(device, non_blocking=True), blocks.to(device, non_blocking=True))
        if len(_DEVICE_TABLES) >= _DEVICE_TABLES_MAX:
            _DEVICE_TABLES.pop(next(iter(_DEVICE_TABLES)))  # the oldest
        _DEVICE_TABLES[key] = cached
    return cached


def rmsprop_step_(params, grads, square_avgs, momentum_bufs, grad_avgs, *, lr,
                  options) -> None:
    """One RMSProp step on every tensor, in place (module docstring: the math).

    params, grads, square_avgs: lists of equal length, equal shapes per index, contiguous;
    params fp32/bf16/fp16, grads the params' dtype or fp32, state fp32. ``momentum_bufs`` is
    used iff ``options.momentum != 0`` and ``grad_avgs`` iff ``options.centered`` (otherwise
    either may be empty). ``options``: any object with ``style`` ("tf" or "torch"),
    ``alpha``, ``eps``, ``weight_decay``, ``momentum`` (floats), ``centered``, ``maximize``
    (bools). ``lr``: a float, or a one-element fp32 tensor on the params' device.

    One list entry each (an arena): one launch of the flat kernel. Otherwise one launch of
    the table kernel per (param dtype, grad dtype) group.
    """
    scalars, constexprs = _kernel_args(lr, options)
    n = len(params)
    bufs = _optional_state("momentum_bufs", momentum_bufs, constexprs["HAS_MOM"], n)
    gas = _optional_state("grad_avgs", grad_avgs, constexprs["CENTERED"], n)
    if n == 1:
        p, g, ms = params[0], grads[0], square_avgs[0]
        launch(_rmsprop_flat_kernel, (triton.cdiv(p.numel(), BLOCK),), p, g, ms,
               bufs[0] if bufs else ms, gas[0] if gas else ms, p.numel(), *scalars,
               **constexprs, BLOCK=BLOCK)
        return
    groups = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        groups.setdefault((p.dtype, g.dtype), []).append(i)
    for (p_dtype, g_dtype), idx in groups.items():
        rows = []
        for i in idx:
            ms = square_avgs[i]
            rows.append(table_row(TABLE_FIELDS, (P_COL, params[i].data_ptr()),
                             (G_COL, grads[i].data_ptr()), (MS_COL, ms.data_ptr()),
                             (BUF_COL, (bufs[i] if bufs else ms).data_ptr()),
                             (GA_COL, (gas[i] if gas else ms).data_ptr()),
                             (NUMEL_COL, params[i].numel())))
        table, block_map = _device_tables(params[idx[0]].device, rows)
        launch(_rmsprop_table_kernel, (block_map.shape[0],), table, block_map, *scalars,
               P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], **constexprs,
               BLOCK=BLOCK)
