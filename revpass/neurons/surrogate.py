"""Surrogate spike functions: a Heaviside forward and the derivative its backward uses.

A :class:`Surrogate` is what a neuron spec carries instead of a framework object. It knows

* where the step fires (``x >= 0`` for SpikingJelly, ``x > 0`` for snnTorch and norse);
* its derivative ``deriv(x)``, evaluated by the optimized backward.

The frameworks' own surrogates are *built in*: a table (:data:`BUILTIN`) of closed forms that
repeat the framework's formula op for op, each named by a key ``(kind, alpha)`` that travels as
plain data (in a custom op's configuration, in an exported program) and selects the same formula
inside the fused kernels (revpass/nodes/kernels/surrogates.py). Any other elementwise surrogate
(a user's own function) is differentiated through its own backward with
:func:`derivative_from_function`; it has no key, so its nodes run the PyTorch path.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from revpass.errors import UnsupportedNeuronError

Tensor = torch.Tensor


class Surrogate:
    """A spike nonlinearity: Heaviside forward, ``deriv`` backward.

    Args:
        name: human-readable description, used in reports and errors.
        deriv: elementwise derivative of the surrogate, ``deriv(x) -> Tensor``.
        fires_at_zero: ``True`` if the forward is ``x >= 0`` (SpikingJelly), ``False`` for ``x > 0``.
        deriv_: the same derivative computed in place, where there is such a form.
        key: ``(kind, alpha)`` of a built-in surrogate (:func:`builtin`), None for any other.
    """

    def __init__(
        self,
        name: str,
        deriv: Callable[[Tensor], Tensor],
        fires_at_zero: bool,
        deriv_: Optional[Callable[[Tensor], Tensor]] = None,
        key: Optional[Tuple[str, float]] = None,
    ):
        self.name = name
        self.deriv = deriv
        self.fires_at_zero = fires_at_zero
        self._deriv_ = deriv_
        self.key = key

    def __setstate__(self, d):  # objects pickled before ``key`` existed
        self.__dict__.update(d)
        self.__dict__.setdefault("key", None)

    def deriv_(self, x: Tensor) -> Tensor:
        """``deriv(x)``, overwriting ``x`` where the surrogate has an in-place form (the
        optimized backward evaluates it over whole sequences: fewer large temporaries)."""
        return self._deriv_(x) if self._deriv_ is not None else self.deriv(x)

    def fire(self, x: Tensor) -> Tensor:
        """Heaviside forward in ``x``'s dtype, without autograd."""
        if x.dim() == 0:
            return (x >= 0).to(x.dtype) if self.fires_at_zero else (x > 0).to(x.dtype)
        zero = _zero(x)
        return (torch.ge(x, zero) if self.fires_at_zero else torch.gt(x, zero)).to(x.dtype)

    def spike(self, x: Tensor) -> Tensor:
        """Heaviside forward with this surrogate's derivative in backward (autograd-aware)."""
        return _SurrogateSpike.apply(x, self)

    @property
    def kernel_id(self) -> Optional[int]:
        """The formula's index in the fused kernels' table, None for a user's own function."""
        return None if self.key is None else BUILTIN[self.key[0]].kernel_id

    def __repr__(self) -> str:
        return f"Surrogate({self.name})"


_ZEROS = {}


def _zero(x: Tensor) -> Tensor:
    """A cached 0-d zero of ``x``'s dtype and device (a comparison with it converts nothing)."""
    key = (x.dtype, x.device)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros((), dtype=x.dtype, device=x.device)
    return z


class _SurrogateSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, surrogate: Surrogate) -> Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        return surrogate.fire(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return grad * ctx.surrogate.deriv(x), None


def derivative_from_function(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Derivative of an elementwise spike function, taken through its own backward.

    The function is called once on the whole argument with a gradient of ones; this is exact for
    any surrogate whose backward multiplies the incoming gradient elementwise. The result pickles
    when ``fn`` does.
    """
    return functools.partial(_derivative_through, fn)


def _derivative_through(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        y = fn(xx)
        (g,) = torch.autograd.grad(y, xx, torch.ones_like(y), allow_unused=True)
    if g is None:
        raise RuntimeError("the spike function has no gradient with respect to its input")
    return g.to(x.dtype)


def check_derivative(
    deriv: Callable[[Tensor], Tensor], where: str, setting: str, fn: Optional[Callable] = None
) -> None:
    """Probe a surrogate derivative; raise a clear error if it is missing or identically zero."""
    probe = torch.linspace(-1.0, 1.0, 9)
    try:
        g = deriv(probe)
    except Exception as exc:  # noqa: BLE001 - any failure means there is no usable derivative
        raise UnsupportedNeuronError(
            f"{where}: the surrogate ({setting}) has no derivative revpass can use ({exc}). "
            "Use a surrogate with a gradient (for example SpikingJelly surrogate.Sigmoid or "
            "snnTorch surrogate.atan), or exclude this module from conversion."
        ) from exc
    if not torch.isfinite(g).all() or bool((g == 0).all()):
        raise UnsupportedNeuronError(
            f"{where}: the surrogate ({setting}) has a zero or non-finite derivative, so no "
            "gradient can flow through the spike. Use a surrogate with a gradient, or exclude "
            "this module from conversion."
        )


# ---------------------------------------------------------------------------------------------
# the built-in surrogates: each framework's formula, op for op, with the argument ``alpha`` (the
# framework's alpha, slope or threshold). Module-level functions bound with functools.partial,
# so that a spec, and a converted model with it, pickles (torch.save) and copies.
# ---------------------------------------------------------------------------------------------


def sigmoid_deriv(alpha: float, x: Tensor) -> Tensor:
    """alpha * s * (1 - s), s = sigmoid(alpha x) (SpikingJelly Sigmoid; revpass's default)."""
    s = torch.sigmoid(alpha * x)
    return (1 - s) * s * alpha


def _sigmoid_deriv_inplace(alpha: float, x: Tensor) -> Tensor:
    t = x.mul_(alpha).sigmoid_()
    return t.mul_(torch.rsub(t, 1.0)).mul_(alpha)


def sj_atan_deriv(alpha: float, x: Tensor) -> Tensor:
    """(alpha / 2) / (1 + z z), z = x (pi / 2 alpha) (SpikingJelly ATan)."""
    z = x * (math.pi / 2 * alpha)
    return (alpha / 2) / (1 + z * z)


def _atan_deriv_inplace(alpha: float, x: Tensor) -> Tensor:
    x.mul_(math.pi / 2 * alpha)
    return x.mul_(x).add_(1.0).reciprocal_().mul_(alpha / 2)


def piecewise_quadratic_deriv(alpha: float, x: Tensor) -> Tensor:
    """max(0, alpha - alpha^2 |x|) (SpikingJelly PiecewiseQuadratic)."""
    return (alpha - alpha * alpha * x.abs()).clamp_min(0)


def piecewise_exp_deriv(alpha: float, x: Tensor) -> Tensor:
    """(alpha / 2) exp(-alpha |x|) (SpikingJelly PiecewiseExp)."""
    return (alpha / 2) * torch.exp(-alpha * x.abs())


def soft_sign_deriv(alpha: float, x: Tensor) -> Tensor:
    """1 / (2 alpha (1 / alpha + |x|)^2) (SpikingJelly SoftSign)."""
    z = 1 / alpha + x.abs()
    return 1 / (2 * alpha * z * z)


def sj_super_spike_deriv(alpha: float, x: Tensor) -> Tensor:
    """alpha / (1 + |x|)^2 (SpikingJelly SuperSpike)."""
    z = 1 + x.abs()
    return alpha / (z * z)


def erf_deriv(alpha: float, x: Tensor) -> Tensor:
    """(alpha / sqrt(pi)) exp(-(alpha x)^2) (SpikingJelly Erf)."""
    z = alpha * x
    return (alpha / math.sqrt(math.pi)) * torch.exp(-z * z)


def atan_deriv(alpha: float, x: Tensor) -> Tensor:
    """(alpha / 2) / (1 + (pi / 2 alpha x)^2), as snnTorch's atan backward computes it."""
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * x).pow(2))


def fast_sigmoid_deriv(slope: float, x: Tensor) -> Tensor:
    """1 / (slope |x| + 1)^2 (snnTorch fast_sigmoid)."""
    return 1.0 / (slope * torch.abs(x) + 1.0) ** 2


def snn_sigmoid_deriv(slope: float, x: Tensor) -> Tensor:
    """slope exp(-slope x) / (exp(-slope x) + 1)^2 (snnTorch sigmoid)."""
    e = torch.exp(-slope * x)
    return slope * e / ((e + 1) ** 2)


def triangular_deriv(threshold: float, x: Tensor) -> Tensor:
    """threshold where x < 0, -threshold where x >= 0 (snnTorch triangular, as it is written)."""
    return torch.where(x >= 0, -threshold, threshold).to(x.dtype)


def superspike_deriv(alpha: float, x: Tensor) -> Tensor:
    """1 / (|x| + 1)^2 (norse SuperSpike.backward with a unit gradient; alpha unused in 1.1.0)."""
    return 1.0 / (torch.abs(x) + 1.0).pow(2)


def _superspike_deriv_inplace(alpha: float, x: Tensor) -> Tensor:
    return x.abs_().add_(1.0).square_().reciprocal_()


class Builtin(NamedTuple):
    """One built-in surrogate: its formula, an in-place form, its index in the kernels' table,
    and how reports name its argument."""

    deriv: Callable[[float, Tensor], Tensor]
    deriv_: Optional[Callable[[float, Tensor], Tensor]]
    kernel_id: int
    label: str


#: kind -> formula. The kernel ids index the table in revpass/nodes/kernels/surrogates.py; the
#: first seven are SpikingJelly's own Triton table's, in its order.
BUILTIN: Dict[str, Builtin] = {
    "spikingjelly.Sigmoid": Builtin(sigmoid_deriv, _sigmoid_deriv_inplace, 0, "Sigmoid(alpha={:g})"),
    "spikingjelly.ATan": Builtin(sj_atan_deriv, _atan_deriv_inplace, 1, "ATan(alpha={:g})"),
    "spikingjelly.PiecewiseQuadratic": Builtin(piecewise_quadratic_deriv, None, 2, "PiecewiseQuadratic(alpha={:g})"),
    "spikingjelly.PiecewiseExp": Builtin(piecewise_exp_deriv, None, 3, "PiecewiseExp(alpha={:g})"),
    "spikingjelly.SoftSign": Builtin(soft_sign_deriv, None, 4, "SoftSign(alpha={:g})"),
    "spikingjelly.SuperSpike": Builtin(sj_super_spike_deriv, None, 5, "SuperSpike(alpha={:g})"),
    "spikingjelly.Erf": Builtin(erf_deriv, None, 6, "Erf(alpha={:g})"),
    "snntorch.atan": Builtin(atan_deriv, _atan_deriv_inplace, 7, "atan(alpha={:g})"),
    "snntorch.fast_sigmoid": Builtin(fast_sigmoid_deriv, None, 8, "fast_sigmoid(slope={:g})"),
    "snntorch.sigmoid": Builtin(snn_sigmoid_deriv, None, 9, "sigmoid(slope={:g})"),
    "snntorch.triangular": Builtin(triangular_deriv, None, 10, "triangular(threshold={:g})"),
    "norse.super": Builtin(superspike_deriv, _superspike_deriv_inplace, 11, "SuperSpike"),
}


def builtin(kind: str, alpha: float, fires_at_zero: bool) -> Surrogate:
    """The built-in surrogate ``kind`` (a key of :data:`BUILTIN`) with argument ``alpha``."""
    b = BUILTIN[kind]
    a = float(alpha)
    return Surrogate(
        b.label.format(a),
        functools.partial(b.deriv, a),
        fires_at_zero,
        None if b.deriv_ is None else functools.partial(b.deriv_, a),
        key=(kind, a),
    )


def default() -> Surrogate:
    """SpikingJelly's default, Sigmoid(alpha=4), firing at the threshold."""
    return builtin("spikingjelly.Sigmoid", 4.0, True)
