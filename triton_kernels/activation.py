"""Triton device helpers for the activation table (``locoprop_kernels/activations.py``).

The one place in the Triton kernels that lists activations: adding one is a code below and a
branch in ``apply_elementwise``. A code may reach a helper as a ``tl.constexpr`` (the
per-layer kernels: compiled once per activation, the branches fold away) or as a run-time
scalar read from a table (the grouped kernels: one compiled kernel; the branch is uniform
across a program, so only the taken one runs). Softmax is row-wise: its loop (online max/sum over the
row's column tiles) is ``_common.softmax_rows``; here it only has its code.
"""
import triton
import triton.language as tl

IDENTITY: tl.constexpr = tl.constexpr(0)
TANH: tl.constexpr = tl.constexpr(1)
SIGMOID: tl.constexpr = tl.constexpr(2)
SOFTMAX: tl.constexpr = tl.constexpr(3)
RELU: tl.constexpr = tl.constexpr(4)
LEAKY_RELU: tl.constexpr = tl.constexpr(5)
GELU: tl.constexpr = tl.constexpr(6)
GELU_TANH: tl.constexpr = tl.constexpr(7)
SILU: tl.constexpr = tl.constexpr(8)

#: 1/sqrt(2) (GELU's erf argument) and sqrt(2/pi), 0.044715 (its tanh form, as torch's).
INV_SQRT2: tl.constexpr = tl.constexpr(0.7071067811865476)
SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
GELU_TANH_CUBIC: tl.constexpr = tl.constexpr(0.044715)

#: leaky_relu's slope for z <= 0 (torch.nn.LeakyReLU's default).
LEAKY_RELU_SLOPE: tl.constexpr = tl.constexpr(0.01)

# Below this |z| tanh comes from its odd Taylor series: the exp form 1 - 2/(e^{2z}+1) loses
# ~eps/|z| relative precision to cancellation near 0 (libdevice.tanh does not run under the
# interpreter). At 0.2 the first dropped term (z^11) is ~1e-9 relative, and the exp form's
# cancellation error above it is ~2e-7.
TANH_SERIES_BELOW: tl.constexpr = tl.constexpr(0.2)


@triton.jit
def _tanh(z):
    a = tl.abs(z)
    t = tl.exp(-2.0 * a)
    far = (1.0 - t) / (1.0 + t)
    z2 = a * a
    # tanh a = a (1 - a^2/3 + 2a^4/15 - 17a^6/315 + 62a^8/2835), Horner form.
    near = a * (1.0 + z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + z2 * (-17.0 / 315.0 + z2 * (62.0 / 2835.0)))))
    r = tl.where(a < TANH_SERIES_BELOW, near, far)
    return tl.where(z < 0, -r, r)


@triton.jit
def apply_elementwise(z, act):
    """f(z) in fp32 for the element-wise activations (every code but SOFTMAX; SOFTMAX and
    unknown codes give z). ``act``: a constexpr or a run-time scalar code."""
    f = z
    if act == TANH:
        f = _tanh(z)
    elif act == SIGMOID:
        f = 1.0 / (1.0 + tl.exp(-z))
    elif act == RELU:
        # Not tl.maximum: it drops a NaN operand (fmax), and relu(NaN) must stay NaN.
        f = tl.where(z < 0.0, 0.0, z)
    elif act == LEAKY_RELU:
        # NaN > 0 is false: NaN takes the slope branch and stays NaN.
        f = tl.where(z > 0.0, z, z * LEAKY_RELU_SLOPE)
    elif act == GELU:
        # libdevice's erf on the GPU, numpy's under the interpreter: both ~1 ulp in fp32.
        f = 0.5 * z * (1.0 + tl.math.erf(z * INV_SQRT2))
    elif act == GELU_TANH:
        u = z * (1.0 + GELU_TANH_CUBIC * z * z)
        u = u * SQRT_2_OVER_PI
        f = 0.5 * z * (1.0 + _tanh(u))
    elif act == SILU:
        f = z / (1.0 + tl.exp(-z))
    return f

