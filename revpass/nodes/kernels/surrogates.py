"""The built-in surrogates' derivatives inside the kernels (revpass.neurons.surrogate.BUILTIN
gives each its id). Ids 0-6 are SpikingJelly's own Triton table (spikingjelly/_ops/
triton_surrogate.py), written with the same operations, so that an exact node's gradient
matches SpikingJelly's CUDA neuron; the others repeat snnTorch's and norse's formulas."""

import triton
import triton.language as tl


@triton.jit
def div(a, b):
    """a / b rounded to nearest, as PyTorch divides (tl.div_rn is float32 only; a float64
    division is correctly rounded as it is)."""
    if b.dtype == tl.float64:
        out = a / b
    else:
        out = tl.div_rn(a, b)
    return out


@triton.jit
def surrogate_grad(x, alpha, SURR: tl.constexpr):
    """The surrogate derivative at ``x`` (the membrane less the threshold); ``alpha`` is the
    framework's alpha, slope or threshold, in ``x``'s dtype."""
    if SURR == 0:  # SpikingJelly Sigmoid
        s = div(1.0, 1.0 + tl.exp(-alpha * x))
        return (1.0 - s) * s * alpha
    elif SURR == 1:  # SpikingJelly ATan
        z = x * (1.5707963267948966 * alpha)
        return (0.5 * alpha) / (1.0 + z * z)
    elif SURR == 2:  # SpikingJelly PiecewiseQuadratic
        return tl.maximum(0.0, alpha - alpha * alpha * tl.abs(x))
    elif SURR == 3:  # SpikingJelly PiecewiseExp
        return (0.5 * alpha) * tl.exp(-alpha * tl.abs(x))
    elif SURR == 4:  # SpikingJelly SoftSign
        z = div(1.0, alpha) + tl.abs(x)
        return div(1.0, 2.0 * alpha * z * z)
    elif SURR == 5:  # SpikingJelly SuperSpike
        z = 1.0 + tl.abs(x)
        return div(alpha, z * z)
    elif SURR == 6:  # SpikingJelly Erf
        z = alpha * x
        return (0.5641895835477563 * alpha) * tl.exp(-z * z)
    elif SURR == 7:  # snnTorch atan
        z = 1.5707963267948966 * alpha * x
        return div(0.5 * alpha, 1.0 + z * z)
    elif SURR == 8:  # snnTorch fast_sigmoid (alpha = slope)
        z = alpha * tl.abs(x) + 1.0
        return div(1.0, z * z)
    elif SURR == 9:  # snnTorch sigmoid (alpha = slope)
        e = tl.exp(-alpha * x)
        return div(alpha * e, (e + 1.0) * (e + 1.0))
    elif SURR == 10:  # snnTorch triangular (alpha = threshold), as snnTorch writes it
        return tl.where(x >= 0, -alpha + tl.zeros_like(x), alpha + tl.zeros_like(x))
    else:  # norse SuperSpike (its alpha is unused in norse 1.1.0)
        z = tl.abs(x) + 1.0
        return div(1.0, z * z)
