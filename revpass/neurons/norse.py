"""norse 1.1.0 adapter: LIFCell, LIF and LIFBoxCell -> NeuronSpec.

Imported only when a model contains a norse module.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from norse.torch.functional.lif import LIFFeedForwardState  # noqa: E402
from norse.torch.functional.lif_box import LIFBoxFeedForwardState  # noqa: E402
from norse.torch.functional.reset import reset_subtract, reset_value  # noqa: E402
from norse.torch.functional.threshold import threshold  # noqa: E402
from norse.torch.module.lif import LIF, LIFCell  # noqa: E402
from norse.torch.module.lif_box import LIFBoxCell  # noqa: E402
from norse.torch.module.snn import SNN, SNNCell, SNNRecurrent, SNNRecurrentCell  # noqa: E402

from revpass.errors import UnsupportedNeuronError
from revpass.neurons.spec import NeuronSpec
from revpass.neurons.surrogate import Surrogate, builtin, check_derivative, derivative_from_function

SUPPORTED = (LIF, LIFCell, LIFBoxCell)


def is_neuron(m: nn.Module) -> bool:
    return isinstance(m, (SNN, SNNCell, SNNRecurrent, SNNRecurrentCell))


is_leaf = is_neuron


def _threshold(method: str, alpha: float, x):
    return threshold(x, method, alpha)


def surrogate_of(p, where: str) -> Surrogate:
    method = p.method
    if method == "super":  # norse SuperSpike.backward with a unit gradient (alpha unused in 1.1.0)
        return builtin("norse.super", float(p.alpha), False)
    if method in ("heaviside", "adjoint"):
        raise UnsupportedNeuronError(
            f"{where}: p.method={method!r} has no surrogate gradient revpass can use. "
            "Use method='super' (or 'tanh', 'triangle', 'circ', 'heavi_erfc'), or exclude it."
        )
    alpha = float(p.alpha)
    deriv = derivative_from_function(functools.partial(_threshold, method, alpha))
    check_derivative(deriv, where, f"p.method={method!r}")
    return Surrogate(f"{method}(alpha={alpha:g}) (own derivative)", deriv, False)


def _t(v) -> torch.Tensor:
    return torch.as_tensor(v)


def to_spec(m: nn.Module, where: str = "") -> NeuronSpec:
    where = where or type(m).__name__
    if type(m) not in SUPPORTED:
        raise UnsupportedNeuronError(
            f"{where}: norse {type(m).__name__} is not supported; revpass converts LIF, LIFCell "
            "and LIFBoxCell. Recurrent cells feed themselves and are left as they are."
        )
    p = m.p
    if isinstance(m, LIFBoxCell):
        if p.reset_method is reset_value:
            reset = "value"
        elif p.reset_method is reset_subtract:
            reset = "subtract"
        else:
            raise UnsupportedNeuronError(
                f"{where}: p.reset_method={getattr(p.reset_method, '__name__', p.reset_method)} "
                "is not supported; use reset_value or reset_subtract."
            )
        params = {k: _t(getattr(p, k)) for k in ("tau_mem_inv", "v_leak", "v_th", "v_reset")}
        return NeuronSpec(
            family="norse_lif_box",
            consts=dict(dt=float(m.dt), reset=reset),
            params=params,
            surrogate=surrogate_of(p, where),
            origin=f"norse.{type(m).__name__}",
            make_state=LIFBoxFeedForwardState,
        )
    params = {
        k: _t(getattr(p, k)) for k in ("tau_syn_inv", "tau_mem_inv", "v_leak", "v_th", "v_reset")
    }
    return NeuronSpec(
        family="norse_lif",
        consts=dict(dt=float(m.dt)),
        params=params,
        surrogate=surrogate_of(p, where),
        origin=f"norse.{type(m).__name__}",
        make_state=LIFFeedForwardState,
    )


def step_mode(m: nn.Module) -> str:
    return "m" if isinstance(m, LIF) else "s"


def run_library(m: nn.Module, x_seq: torch.Tensor) -> torch.Tensor:
    """The neuron itself over a (T, ...) sequence, from its reset state."""
    if isinstance(m, LIF):
        return m(x_seq)[0]
    state, out = None, []
    for x in x_seq:
        z, state = m(x, state)
        out.append(z)
    return torch.stack(out)
