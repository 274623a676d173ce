"""Surrogate spike functions: a Heaviside forward and the derivative its backward uses.

A :class:`Surrogate` is what a neuron spec carries instead of a framework object. It knows

* where the step fires (``x >= 0`` for SpikingJelly, ``x > 0`` for snnTorch and norse);
* its derivative ``deriv(x)``, evaluated once over a whole sequence by the optimized backward.

Closed forms are used where revpass knows the surrogate (they reproduce the framework's own
formula); any other elementwise surrogate is differentiated through its own backward with
:func:`derivative_from_function`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch

Tensor = torch.Tensor


class Surrogate:
    """A spike nonlinearity: Heaviside forward, ``deriv`` backward.

    Args:
        name: human-readable description, used in reports and errors.
        deriv: elementwise derivative of the surrogate, ``deriv(x) -> Tensor``.
        fires_at_zero: ``True`` if the forward is ``x >= 0`` (SpikingJelly), ``False`` for ``x > 0``.
    """

    def __init__(
        self,
        name: str,
        deriv: Callable[[Tensor], Tensor],
        fires_at_zero: bool,
        deriv_: Optional[Callable[[Tensor], Tensor]] = None,
    ):
        self.name = name
        self.deriv = deriv
        self.fires_at_zero = fires_at_zero
        self._deriv_ = deriv_

    def deriv_(self, x: Tensor) -> Tensor:
        """``deriv(x)``, overwriting ``x`` where the surrogate has an in-place form (the
        optimized backward evaluates it over whole sequences: fewer large temporaries)."""
        return self._deriv_(x) if self._deriv_ is not None else self.deriv(x)

    def fire(self, x: Tensor) -> Tensor:
        """Heaviside forward in ``x``'s dtype, without autograd."""
        return (x >= 0).to(x.dtype) if self.fires_at_zero else (x > 0).to(x.dtype)

    def spike(self, x: Tensor) -> Tensor:
        """Heaviside forward with this surrogate's derivative in backward (autograd-aware)."""
        return _SurrogateSpike.apply(x, self)

    def __repr__(self) -> str:
        return f"Surrogate({self.name})"


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
    from revpass.errors import UnsupportedNeuronError

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


# The surrogates' derivatives are module-level functions bound with functools.partial, so that a
# spec, and a converted model with it, pickles (torch.save) and copies.


def sigmoid_deriv(alpha: float, x: Tensor) -> Tensor:
    """alpha * s * (1 - s), s = sigmoid(alpha x) (SpikingJelly Sigmoid; revpass's default)."""
    s = torch.sigmoid(alpha * x)
    return (1 - s) * s * alpha


def _sigmoid_deriv_inplace(alpha: float, x: Tensor) -> Tensor:
    t = x.mul_(alpha).sigmoid_()
    return t.mul_(torch.rsub(t, 1.0)).mul_(alpha)


def sigmoid_deriv_(alpha: float) -> Callable[[Tensor], Tensor]:
    """In place: alpha * s * (1 - s), s = sigmoid(alpha x) (SpikingJelly Sigmoid)."""
    return functools.partial(_sigmoid_deriv_inplace, alpha)


def _atan_deriv_inplace(alpha: float, x: Tensor) -> Tensor:
    x.mul_(math.pi / 2 * alpha)
    return x.mul_(x).add_(1.0).reciprocal_().mul_(alpha / 2)


def atan_deriv_(alpha: float) -> Callable[[Tensor], Tensor]:
    """In place: (alpha / 2) / (1 + (pi / 2 alpha x)^2) (SpikingJelly ATan, snnTorch atan)."""
    return functools.partial(_atan_deriv_inplace, alpha)


def atan_deriv(alpha: float, x: Tensor) -> Tensor:
    """(alpha / 2) / (1 + (pi / 2 alpha x)^2), as snnTorch's atan backward computes it."""
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * x).pow(2))


def superspike_deriv(x: Tensor) -> Tensor:
    """1 / (|x| + 1)^2 (norse SuperSpike.backward with a unit gradient)."""
    return 1.0 / (torch.abs(x) + 1.0).pow(2)


def superspike_deriv_(x: Tensor) -> Tensor:
    """In place: 1 / (|x| + 1)^2 (norse SuperSpike)."""
    return x.abs_().add_(1.0).square_().reciprocal_()
