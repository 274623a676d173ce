"""Neuron specs: what a neuron is, read from any supported framework or registered by the user.

Framework adapters (spikingjelly.py, snntorch.py, norse.py) are imported only when a module of
that framework is looked at: ``import revpass`` imports none of the SNN frameworks.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List, Optional, Tuple, Type

from torch import nn

from revpass.errors import UnsupportedNeuronError
from revpass.neurons import families as _families  # noqa: F401  (registers the families)
from revpass.neurons.adapter import Adapter, Registered
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
    "Adapter",
    "run_library",
    "is_neuron",
    "step_mode",
]

# framework package name -> revpass adapter module (each defines ADAPTER)
_ADAPTERS = {
    "spikingjelly": "revpass.neurons.spikingjelly",
    "snntorch": "revpass.neurons.snntorch",
    "norse": "revpass.neurons.norse",
}

_REGISTRY: Dict[Type[nn.Module], Callable[[nn.Module], NeuronSpec]] = {}
_STATE: Dict[Type[nn.Module], str] = {}  # how a registered class's state behaves: "carried" | "restart"
STATES = ("carried", "restart")


def framework_adapter(m: nn.Module) -> Optional[Adapter]:
    """The adapter of ``m``'s framework, or None (imports the adapter only then; the framework
    is already imported, since ``m`` is one of its modules). A user's subclass of a framework's
    class belongs to that framework (its adapter says whether it converts)."""
    for cls in type(m).__mro__:
        root = cls.__module__.split(".")[0]
        name = _ADAPTERS.get(root)
        if name is not None and root in sys.modules:
            return importlib.import_module(name).ADAPTER
    return None


def adapter_for(m: nn.Module) -> Optional[Adapter]:
    """The adapter that knows ``m``: a registered class's first, then its framework's; None
    for a module of no supported framework."""
    for cls in type(m).__mro__:
        if cls in _REGISTRY:
            return Registered(_REGISTRY[cls], _STATE[cls])
    return framework_adapter(m)


def loaded_adapters() -> List[Adapter]:
    """The adapters of the frameworks imported in this process (their patches, caches)."""
    return [importlib.import_module(name).ADAPTER for root, name in _ADAPTERS.items() if root in sys.modules]


def step_mode(m: nn.Module) -> str:
    """``"m"`` if one call of neuron ``m`` takes a whole (T, ...) sequence, ``"s"`` if it takes
    one step (a module no adapter knows: its ``step_mode`` attribute, else ``"m"``)."""
    ad = adapter_for(m)
    return ad.step_mode(m) if ad is not None else getattr(m, "step_mode", "m")


def carries_state(m: nn.Module) -> bool:
    """Whether neuron ``m`` keeps its state from one forward call to the next."""
    ad = adapter_for(m)
    return bool(ad is not None and ad.carries_state(m))


def returns_state(m: nn.Module) -> bool:
    """Whether a multi-step call of ``m`` returns ``(spikes, state)``."""
    ad = adapter_for(m)
    return bool(ad is not None and ad.returns_state(m))


def is_leaf(m: nn.Module) -> bool:
    """Whether the tracer keeps ``m`` as one node (neurons and the frameworks' stateful modules)."""
    ad = adapter_for(m)
    return bool(ad is not None and (ad.is_leaf(m) or ad.is_neuron(m)))


def site_rule(m: nn.Module, n_calls: int) -> Tuple[Optional[str], str]:
    """(why neuron ``m`` called ``n_calls`` times per forward cannot be converted, or None; a
    note for its reason when it is): the framework's own rules."""
    ad = adapter_for(m)
    return ad.site_rule(m, n_calls) if ad is not None else (None, "")


def multi_step_batch_norm(bn: nn.Module) -> bool:
    """A batch norm whose statistics run over a whole (T, B, C, ...) sequence."""
    ad = framework_adapter(bn)
    return bool(ad is not None and ad.multi_step_batch_norm(bn))


def folds_time(m: nn.Module) -> Optional[bool]:
    """How a framework's subclass of a torch layer runs (Adapter.folds_time); False for a
    module of no framework whose forward is its torch class's own, None otherwise."""
    ad = framework_adapter(m)
    if ad is not None:
        return ad.folds_time(m)
    own = [c for c in type(m).__mro__ if "forward" in vars(c)]
    return False if own and own[0].__module__.startswith("torch.nn") else None


def invalidate_reset_caches(model: nn.Module) -> None:
    """Tell every loaded framework that ``model``'s module tree changed."""
    for ad in loaded_adapters():
        ad.invalidate_reset_cache(model)


def set_step_mode(model: nn.Module, mode: str) -> List[str]:
    """Set the step mode of the modules of every loaded framework that has one; returns the
    frameworks that did."""
    return [ad.package for ad in loaded_adapters() if ad.set_step_mode(model, mode)]


def register_neuron(
    cls: Type[nn.Module],
    to_spec: Callable[[nn.Module], NeuronSpec],
    *,
    state: Optional[str] = None,
) -> None:
    """Teach revpass a neuron class of your own.

    ``to_spec(module)`` returns the :class:`NeuronSpec` of an instance: usually
    :func:`lif_spec` with the module's constants, or any spec of a built-in family. Instances
    of ``cls`` (and subclasses) are then converted like library neurons::

        class MyLIF(nn.Module):
            def __init__(self, tau=2.0):
                ...
        revpass.register_neuron(MyLIF, lambda m: revpass.lif_spec(tau=m.tau, v_threshold=1.0))

    ``state`` says how the module's state behaves from one forward call to the next, and the
    node that replaces it does the same: ``"restart"`` (every call starts from rest, as a
    forward that begins with ``v = zeros``), or ``"carried"`` (the final state of one call is
    the initial state of the next until ``reset()``, as SpikingJelly's neurons). Default: carried
    if the class has a ``reset()`` method, restart if it has none.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_neuron expects an nn.Module subclass, got {cls!r}")
    if not callable(to_spec):
        raise TypeError("register_neuron: to_spec must be callable: to_spec(module) -> NeuronSpec")
    if state is None:
        state = "carried" if callable(getattr(cls, "reset", None)) else "restart"
    if state not in STATES:
        raise ValueError(f"register_neuron({cls.__name__}): state must be one of {STATES}, got {state!r}")
    _REGISTRY[cls] = to_spec
    _STATE[cls] = state


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
    ad = adapter_for(m)
    return bool(ad is not None and ad.is_neuron(m))


def run_library(m: nn.Module, x_seq):
    """Run a library (or registered) neuron itself over a (T, ...) sequence from its reset
    state, the way its framework's documentation drives it: the reference the nodes match."""
    ad = adapter_for(m)
    return ad.run_library(m, x_seq) if ad is not None else m(x_seq)


def spec_from_module(m: nn.Module, where: str = "") -> NeuronSpec:
    """Read a neuron module into a :class:`NeuronSpec`, or raise UnsupportedNeuronError."""
    where = where or type(m).__name__
    ad = adapter_for(m)
    if ad is None:
        raise UnsupportedNeuronError(
            f"{where}: {type(m).__module__}.{type(m).__name__} is not a neuron revpass knows. "
            "Register it with revpass.register_neuron(cls, to_spec)."
        )
    return ad.to_spec(m, where)
