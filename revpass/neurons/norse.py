"""norse 1.1.0 adapter: LIFCell, LIF and LIFBoxCell -> NeuronSpec; ``SequentialState``'s state
argument bound while tracing; multi-step neurons return (spikes, state) (docs/frameworks/norse.md).

Imported only when a model contains a norse module.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import torch
from torch import nn

from norse.torch.functional.lif import LIFFeedForwardState  # noqa: E402
from norse.torch.functional.lif_box import LIFBoxFeedForwardState  # noqa: E402
from norse.torch.functional.reset import reset_subtract, reset_value  # noqa: E402
from norse.torch.functional.threshold import threshold  # noqa: E402
from norse.torch.module.lif import LIF, LIFCell  # noqa: E402
from norse.torch.module.lif_box import LIFBoxCell  # noqa: E402
from norse.torch.module.sequential import SequentialState  # noqa: E402
from norse.torch.module.snn import SNN, SNNCell, SNNRecurrent, SNNRecurrentCell  # noqa: E402

from revpass.errors import UnsupportedNeuronError
from revpass.neurons.adapter import Adapter, ChannelPart, channel_slice
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


class NorseAdapter(Adapter):
    package = "norse"
    # the module's functions above are the protocol's methods of the same names
    is_neuron = staticmethod(is_neuron)
    step_mode = staticmethod(step_mode)
    to_spec = staticmethod(to_spec)
    run_library = staticmethod(run_library)

    def returns_state(self, m: nn.Module) -> bool:
        return isinstance(m, LIF)  # norse's multi-step neurons return (spikes, state)

    def concrete_args(self, model: nn.Module, args: Dict[str, Any]) -> None:
        if isinstance(model, SequentialState):
            args.setdefault("state", None)

    def on_channels(self, m: nn.Module, lo: int = 0, hi: Optional[int] = None, channel_dim: int = 1) -> nn.Module:
        """norse keeps its constants in ``m.p`` (a named tuple of tensors, not parameters) and a
        cell's state in the caller's hands: the part slices ``p``'s tensors per call and threads a
        cell's state itself; a multi-step ``LIF`` starts each call from the reset state, as
        norse's does."""
        return _NorsePart(m, lo, hi, channel_dim)


class _NorsePart(ChannelPart):
    """A norse neuron on a channel range (see :meth:`NorseAdapter.on_channels`)."""

    def __init__(self, m: nn.Module, lo: int, hi: Optional[int], channel_dim: int):
        super().__init__(m, lo, hi, channel_dim, {}, lambda _: None)
        object.__setattr__(self, "_source", m)  # its p holds the tensors the views are taken of
        self.state = None

    def forward(self, x: torch.Tensor) -> Any:
        p = self._source.p
        self.neuron.p = p._replace(**{k: channel_slice(v, self.lo, self.hi, self.channel_dim, x.dim())
                                      for k, v in p._asdict().items() if isinstance(v, torch.Tensor)})
        if isinstance(self.neuron, SNN):  # multi-step: (spikes, final state), from the reset state
            return self.neuron(x)
        z, self.state = self.neuron(x, self.state)
        return z, self.state


ADAPTER = NorseAdapter()
