"""RMSProp for every layer in ONE launch, both flavours, math in fp32.

    "tf":    ms = a ms + (1-a) g^2;  mom = m mom + lr g / sqrt(ms + eps);  p -= mom
    "torch": ms = a ms + (1-a) g^2;  avg = sqrt(ms) + eps;
             with momentum: buf = m buf + g / avg, p -= lr buf;  else p -= lr g / avg

Two layouts, one update helper:
- flat: every tensor is one contiguous buffer (an arena holding all layers as views); the
  kernel is a 1-D pass over it.
- table: a list of separate tensors; an int64 table holds each tensor's four addresses and
  size, and a block map says which tensor and offset each program owns. Still one launch.
Params may be fp32/bf16/fp16 (grads the same or fp32); state is fp32. sqrt and division are
the correctly rounded ones (``sqrt_rn``/``div_rn``) so that the "torch" flavour tracks
``torch.optim.RMSprop`` to the last bits rather than to the approximate instructions'.
"""
import torch
import triton
import triton.language as tl

from ._launch import launch

# 1024 elements per program: 4 KB of fp32 per stream, enough bytes in flight per SM on the
# GPU for a bandwidth-bound update, and few enough programs for the interpreter.
BLOCK = 1024

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
def _update(p_ptr, g_ptr, ms_ptr, buf_ptr, offs, mask, lr, alpha, one_minus_alpha, eps,
            momentum, STYLE_TF: tl.constexpr, HAS_MOM: tl.constexpr):
    """Load, update and store one block of (param, grad, square_avg, momentum_buf)."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ms = tl.load(ms_ptr + offs, mask=mask, other=1.0)
    ms = alpha * ms + one_minus_alpha * (g * g)
    tl.store(ms_ptr + offs, ms, mask=mask)
    if STYLE_TF:
        step = tl.div_rn(lr * g, tl.sqrt_rn(ms + eps))
    else:
        step = tl.div_rn(g, tl.sqrt_rn(ms) + eps)
    if HAS_MOM:
        step = momentum * tl.load(buf_ptr + offs, mask=mask, other=0.0) + step
        tl.store(buf_ptr + offs, step, mask=mask)
    if not STYLE_TF:
        step = lr * step
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(p_ptr + offs, (p - step).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsprop_flat_kernel(p_ptr, g_ptr, ms_ptr, buf_ptr, n, lr, alpha, one_minus_alpha, eps,
                         momentum, STYLE_TF: tl.constexpr, HAS_MOM: tl.constexpr,
                         LR_IS_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """Flat layout. Grid (cdiv(n, BLOCK),)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _update(p_ptr, g_ptr, ms_ptr, buf_ptr, offs, offs < n, _scalar(lr, LR_IS_PTR), alpha,
            one_minus_alpha, eps, momentum, STYLE_TF, HAS_MOM)


@triton.jit
def _rmsprop_table_kernel(table_ptr, blocks_ptr, lr, alpha, one_minus_alpha, eps, momentum,
                          P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                          STYLE_TF: tl.constexpr, HAS_MOM: tl.constexpr,
                          LR_IS_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """Table layout. table: int64 (T, 5) = addresses of p, g, ms, buf and numel per tensor;
    blocks: int64 (n_blocks, 2) = (tensor index, first element). Grid (n_blocks,)."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(blocks_ptr + 2 * pid)
    start = tl.load(blocks_ptr + 2 * pid + 1)
    row = table_ptr + 5 * t
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    ms_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    buf_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 4)
    offs = start + tl.arange(0, BLOCK)
    _update(p_ptr, g_ptr, ms_ptr, buf_ptr, offs, offs < n, _scalar(lr, LR_IS_PTR), alpha,
            one_minus_alpha, eps, momentum, STYLE_TF, HAS_MOM)


def _scalars(lr, alpha, eps, momentum):
    # 1 - alpha is formed in float64 and then rounded once, as torch does with its scalars.
    # lr may be a one-element fp32 device tensor, read by the kernel (CUDA-graph replay).
    lr = lr if isinstance(lr, torch.Tensor) else float(lr)
    return lr, float(alpha), float(1.0 - alpha), float(eps), float(momentum)


def rmsprop_step_(params, grads, square_avgs, momentum_bufs, *, lr, alpha, eps, momentum,
                  style) -> None:
    """Update every tensor in place with one launch per (param dtype, grad dtype) group.
    ``lr`` is a float or a one-element fp32 tensor on the params' device.

    Lists of equal length; ``momentum_bufs`` empty means no momentum buffer. A single
    contiguous tensor per list (an arena) takes the flat kernel, anything else the table.
    """
    style_tf = style == "tf"
    has_mom = len(momentum_bufs) > 0 and (style_tf or momentum != 0.0)
    scalars = _scalars(lr, alpha, eps, momentum)
    if len(params) == 1 and all(t.is_contiguous() for t in (params[0], grads[0], square_avgs[0])):
        p, g, ms = params[0], grads[0], square_avgs[0]
        buf = momentum_bufs[0] if has_mom else ms
        launch(_rmsprop_flat_kernel, (triton.cdiv(p.numel(), BLOCK),), p, g, ms, buf,
               p.numel(), *scalars, STYLE_TF=style_tf, HAS_MOM=has_mom,
               LR_IS_PTR=isinstance(lr, torch.Tensor), BLOCK=BLOCK)
        return
    groups = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        groups.setdefault((p.dtype, g.dtype), []).append(i)
    for (p_dtype, g_dtype), idx in groups.items():
        rows, blocks = [], []
        for j, i in enumerate(idx):
            ms = square_avgs[i]
            buf = momentum_bufs[i] if has_mom else ms
            n = params[i].numel()
            rows.append([params[i].data_ptr(), grads[i].data_ptr(), ms.data_ptr(),
                         buf.data_ptr(), n])
            blocks.extend([j, s] for s in range(0, n, BLOCK))
        device = params[idx[0]].device
        table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        block_map = torch.tensor(blocks, dtype=torch.int64).to(device, non_blocking=True)
        launch(_rmsprop_table_kernel, (len(blocks),), table, block_map, *scalars,
               P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], STYLE_TF=style_tf,
               HAS_MOM=has_mom, LR_IS_PTR=isinstance(lr, torch.Tensor), BLOCK=BLOCK)
