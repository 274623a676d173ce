"""SpikingJelly 2.0.0 adapter: LIFNode, IFNode, ParametricLIFNode -> NeuronSpec; its stateful
modules kept whole by the tracer, ``functional.reset_net`` traced as a node, its reset cache and
step modes (docs/frameworks/spikingjelly.md).

Imported only when a model contains a SpikingJelly module.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from revpass.errors import UnsupportedNeuronError
from revpass.neurons.spec import NeuronSpec
from revpass.neurons.surrogate import BUILTIN, Surrogate, builtin, check_derivative, derivative_from_function

from spikingjelly.activation_based import base as sj_base  # noqa: E402
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402
from spikingjelly.activation_based import layer as sj_layer  # noqa: E402
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402

from revpass.neurons.adapter import Adapter, Patch

SUPPORTED = (sj_neuron.LIFNode, sj_neuron.IFNode, sj_neuron.ParametricLIFNode)


def is_neuron(m: nn.Module) -> bool:
    """A SpikingJelly spiking neuron: a class of spikingjelly.activation_based.neuron, or a
    subclass of its BaseNode defined elsewhere (a model zoo's own LIFNode variant)."""
    return isinstance(m, sj_base.MemoryModule) and (
        type(m).__module__.startswith(sj_neuron.__name__) or isinstance(m, sj_neuron.BaseNode))


def _overrides(m: nn.Module) -> list:
    """The methods a subclass of a supported class defines itself, besides ``__init__``."""
    base = next(c for c in type(m).__mro__ if c in SUPPORTED)
    own = set()
    for c in type(m).__mro__:
        if c is base:
            break
        own |= {k for k, v in vars(c).items() if callable(v) and k != "__init__"}
    return sorted(own)


def is_leaf(m: nn.Module) -> bool:
    return isinstance(m, (sj_base.MemoryModule, sj_base.StepModule))


def surrogate_of(fn: nn.Module, where: str) -> Surrogate:
    name = type(fn).__name__
    if getattr(fn, "spiking", True) is False:
        raise UnsupportedNeuronError(
            f"{where}: surrogate_function={name}(spiking=False) is not a spike function. "
            "Set spiking=True, or exclude this module from conversion."
        )
    alpha = getattr(fn, "alpha", None)
    kind = f"spikingjelly.{name}"
    # the closed forms SpikingJelly's fused multi-step ops use (its _ops/surrogate.py), built in
    if kind in BUILTIN and type(fn).__module__.startswith("spikingjelly") and isinstance(alpha, (int, float)) \
            and not isinstance(alpha, bool):
        return builtin(kind, float(alpha), True)
    deriv = derivative_from_function(fn)
    check_derivative(deriv, where, f"surrogate_function={name}")
    return Surrogate(f"{name} (own derivative)", deriv, True)


def to_spec(m: nn.Module, where: str = "") -> NeuronSpec:
    where = where or type(m).__name__
    if type(m) not in SUPPORTED and isinstance(m, SUPPORTED) and _overrides(m):
        base = next(c for c in type(m).__mro__ if c in SUPPORTED).__name__
        raise UnsupportedNeuronError(
            f"{where}: {type(m).__name__} (from {type(m).__module__}) subclasses SpikingJelly's {base} and "
            f"defines its own {', '.join(_overrides(m))}: revpass cannot tell that it computes what {base} "
            "does, and what its own step keeps (attributes it sets) would be lost; it is left as it is "
            "(exclude it to silence this)"
        )
    if not isinstance(m, SUPPORTED):
        raise UnsupportedNeuronError(
            f"{where}: SpikingJelly {type(m).__name__} is not supported; revpass converts "
            "LIFNode, IFNode and ParametricLIFNode. Register it with revpass.register_neuron "
            "or exclude it."
        )
    if getattr(m, "store_v_seq", False):
        raise UnsupportedNeuronError(
            f"{where}: store_v_seq=True records every step's membrane in .v_seq, which a revpass node "
            "does not keep (it would hold what the node saves memory by dropping). Set "
            "store_v_seq=False, or exclude this module to keep recording it."
        )
    if getattr(m, "_neuron_precision", None) is not None:
        raise UnsupportedNeuronError(
            f"{where}: mixed neuron precision (set_neuron_precision) is not supported; "
            "remove it or exclude this module."
        )
    consts = dict(
        v_threshold=float(m.v_threshold),
        v_reset=None if m.v_reset is None else float(m.v_reset),
        detach_reset=bool(m.detach_reset),
    )
    params = {}
    attr = {}
    if isinstance(m, sj_neuron.ParametricLIFNode):
        consts.update(kind="plif", tau=None, decay_input=bool(m.decay_input))
        params["w"] = m.w
        attr["w"] = "w"
    elif isinstance(m, sj_neuron.LIFNode):
        consts.update(kind="lif", tau=float(m.tau), decay_input=bool(m.decay_input))
    else:
        consts.update(kind="if", tau=None, decay_input=True)
    return NeuronSpec(
        family="spikingjelly",
        consts=consts,
        params=params,
        surrogate=surrogate_of(m.surrogate_function, where),
        origin=f"spikingjelly.{type(m).__name__}",
        attr_names=attr,
    )


def step_mode(m: nn.Module) -> str:
    return getattr(m, "step_mode", "s")


def run_library(m: nn.Module, x_seq: torch.Tensor) -> torch.Tensor:
    """The neuron itself over a (T, ...) sequence, from its reset state."""
    m.reset()
    if step_mode(m) == "m":
        return m(x_seq)
    return torch.stack([m(x) for x in x_seq])


class SpikingJellyAdapter(Adapter):
    package = "spikingjelly"
    # the module's functions above are the protocol's methods of the same names
    is_neuron = staticmethod(is_neuron)
    is_leaf = staticmethod(is_leaf)
    step_mode = staticmethod(step_mode)
    to_spec = staticmethod(to_spec)
    run_library = staticmethod(run_library)

    def carries_state(self, m: nn.Module) -> bool:
        return True  # v stays from one call to the next until reset_net

    def reset(self, m: nn.Module) -> None:
        fn = getattr(m, "reset", None)
        if callable(fn):  # MemoryModule.reset, and any stateful module of the framework
            fn()

    def invalidate_reset_cache(self, model: nn.Module) -> None:
        # every module's: a part kept whole by the tracer may call reset_net(self) in its own
        # forward, with itself as the cache's key, and its neurons were swapped for nodes
        fn = getattr(sj_functional, "invalidate_reset_cache", None)
        if fn is not None:
            for m in model.modules():
                fn(m)

    def trace_patches(self, patch: Patch, make_node: Callable[..., Any]) -> None:
        # reset_net(self) inside forward would run once at trace time: it becomes a node
        def reset_net(net):
            make_node("reset")

        patch(sj_functional, "reset_net", reset_net)
        try:
            from spikingjelly.activation_based.functional import net_config

            patch(net_config, "reset_net", reset_net)
        except ImportError:  # pragma: no cover
            pass

    def multi_step_batch_norm(self, bn: nn.Module) -> bool:
        return isinstance(bn, nn.modules.batchnorm._BatchNorm) and getattr(bn, "step_mode", "s") == "m"

    def folds_time(self, m: nn.Module) -> Optional[bool]:
        # layer.Conv2d, layer.MaxPool2d & co.: seq_to_ann_forward in step mode 'm'; layer.Linear
        # has no forward of its own (nn.Linear's runs over any leading dimensions)
        if not type(m).__module__.startswith(sj_layer.__name__) or isinstance(m, sj_base.MemoryModule):
            return None
        if "forward" not in vars(type(m)):
            return False
        return getattr(m, "step_mode", "s") == "m"

    def set_step_mode(self, model: nn.Module, mode: str) -> bool:
        sj_functional.set_step_mode(model, mode)
        return True


ADAPTER = SpikingJellyAdapter()
