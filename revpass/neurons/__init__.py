"""Neuron specs: what a neuron is, read from any supported framework or registered by the user.

Framework adapters (spikingjelly.py, snntorch.py, norse.py) are imported only when a module of
that framework is looked at: ``import revpass`` imports none of the SNN frameworks.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, Optional, Type

from torch import nn

from revpass.errors import UnsupportedNeuronError
from revpass.neurons import families as _families  # noqa: F401  (registers the families)
from revpass.neurons.spec import FAMILIES, Family, NeuronSpec, family_of, run_sequence
from revpass.neurons.surrogate import Surrogate, builtin, derivative_from_function

__all__ = [
    "NeuronSpec",
    "Surrogate",
    "Family",
    "FAMILIES",
    "family_of",
    "run_sequence",
    "spec_from_module",
    "register_neuron",
    "lif_spec",
    "adapter_for",
    "run_library",
]

# framework package name -> revpass adapter module
_ADAPTERS = {
    "spikingjelly": "revpass.neurons.spikingjelly",
    "snntorch": "revpass.neurons.snntorch",
    "norse": "revpass.neurons.norse",
}

_REGISTRY: Dict[Type[nn.Module], Callable[[nn.Module], NeuronSpec]] = {}


def adapter_for(m: nn.Module):
    """The adapter module for ``m``'s framework, or None (imports the framework only then)."""
    root = type(m).__module__.split(".")[0]
    name = _ADAPTERS.get(root)
    if name is None or root not in sys.modules:
        return None
    return importlib.import_module(name)


def register_neuron(cls: Type[nn.Module], to_spec: Callable[[nn.Module], NeuronSpec]) -> None:
    """Teach revpass a neuron class of your own.

    ``to_spec(module)`` returns the :class:`NeuronSpec` of an instance: usually
    :func:`lif_spec` with the module's constants, or any spec of a built-in family. Instances
    of ``cls`` (and subclasses) are then converted like library neurons::

        class MyLIF(nn.Module):
            def __init__(self, tau=2.0):
                ...
        revpass.register_neuron(MyLIF, lambda m: revpass.lif_spec(tau=m.tau, v_threshold=1.0))
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_neuron expects an nn.Module subclass, got {cls!r}")
    if not callable(to_spec):
        raise TypeError("register_neuron: to_spec must be callable: to_spec(module) -> NeuronSpec")
    _REGISTRY[cls] = to_spec


def registered(m: nn.Module) -> Optional[Callable[[nn.Module], NeuronSpec]]:
    for cls in type(m).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def lif_spec(
    *,
    tau: Optional[float] = 2.0,
    decay_input: bool = True,
    v_threshold: float = 1.0,
    v_reset: Optional[float] = 0.0,
    detach_reset: bool = False,
    surrogate: Optional[Surrogate | Callable] = None,
    fires_at_threshold: bool = True,
    origin: str = "custom",
) -> NeuronSpec:
    """A LIF (or, with ``tau=None``, IF) neuron in SpikingJelly's form.

    H = V + (X - (V - v_reset)) / tau (decay_input) or V - (V - v_reset) / tau + X;
    S = Theta(H - v_threshold) (``>=`` if fires_at_threshold else ``>``);
    V = hard reset to v_reset, or soft reset (V = H - S v_threshold) when v_reset is None.
    ``surrogate`` is a :class:`Surrogate` or any elementwise spike function with a gradient
    (default: sigmoid surrogate with alpha = 4).
    """
    if surrogate is None:
        surrogate = builtin("spikingjelly.Sigmoid", 4.0, fires_at_threshold)
    elif not isinstance(surrogate, Surrogate):
        surrogate = Surrogate(
            getattr(surrogate, "__name__", type(surrogate).__name__),
            derivative_from_function(surrogate),
            fires_at_threshold,
        )
    if tau is not None and not float(tau) > 1.0:
        raise UnsupportedNeuronError(f"{origin}: tau={tau} must be > 1 (use tau=None for IF).")
    return NeuronSpec(
        family="spikingjelly",
        consts=dict(
            kind="if" if tau is None else "lif",
            tau=None if tau is None else float(tau),
            decay_input=bool(decay_input),
            v_threshold=float(v_threshold),
            v_reset=None if v_reset is None else float(v_reset),
            detach_reset=bool(detach_reset),
        ),
        params={},
        surrogate=surrogate,
        origin=origin,
    )


def is_neuron(m: nn.Module) -> bool:
    """True if ``m`` is a neuron of a supported framework or a registered class."""
    if registered(m) is not None:
        return True
    ad = adapter_for(m)
    return bool(ad is not None and ad.is_neuron(m))


def run_library(m: nn.Module, x_seq):
    """Run a library (or registered) neuron itself over a (T, ...) sequence from its reset
    state, the way its framework's documentation drives it: the reference the nodes match."""
    ad = adapter_for(m)
    if ad is not None and registered(m) is None:
        return ad.run_library(m, x_seq)
    return m(x_seq)


def spec_from_module(m: nn.Module, where: str = "") -> NeuronSpec:
    """Read a neuron module into a :class:`NeuronSpec`, or raise UnsupportedNeuronError."""
    where = where or type(m).__name__
    fn = registered(m)
    if fn is not None:
        spec = fn(m)
        if not isinstance(spec, NeuronSpec):
            raise TypeError(
                f"{where}: the function registered for {type(m).__name__} returned "
                f"{type(spec).__name__}, not a revpass NeuronSpec"
            )
        return spec
    ad = adapter_for(m)
    if ad is None:
        raise UnsupportedNeuronError(
            f"{where}: {type(m).__module__}.{type(m).__name__} is not a neuron revpass knows. "
            "Register it with revpass.register_neuron(cls, to_spec)."
        )
    return ad.to_spec(m, where)
