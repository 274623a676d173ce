"""The one protocol through which revpass knows a framework.

Everything outside ``revpass/neurons/`` asks an :class:`Adapter` about a module (is it a neuron,
a leaf for the tracer, single- or multi-step, how to reset it, what its spec is) and never
imports a framework or compares a value with a framework's name. There is one adapter per
framework (spikingjelly.py, snntorch.py, norse.py, each importing its framework, and imported
only when a model holds a module of that framework) and one for the classes users register
(:class:`Registered`). docs/frameworks/ says what each framework's adapter does and why.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from revpass.neurons.spec import NeuronSpec
from revpass.utils import safe_deepcopy

#: ``patch(obj, name, new)``: replace an attribute for the duration of a trace (undone after it)
Patch = Callable[[Any, str, Any], None]


class Adapter:
    """What revpass needs to know about one framework's modules. Defaults suit a framework
    whose neurons are stateless single-step modules; each framework overrides what differs."""

    #: the framework's top-level package name (what ``type(m).__module__`` starts with)
    package: str = ""

    # -- recognising modules ----------------------------------------------------------------------
    def is_neuron(self, m: nn.Module) -> bool:
        """A spiking neuron of this framework (converted, or reported as not supported)."""
        return False

    def is_leaf(self, m: nn.Module) -> bool:
        """A module the tracer keeps as one node (neurons, and stateful modules around them)."""
        return self.is_neuron(m)

    def step_mode(self, m: nn.Module) -> str:
        """``"m"``: one call takes a whole (T, ...) sequence; ``"s"``: one call per time step."""
        return "s"

    def to_spec(self, m: nn.Module, where: str) -> NeuronSpec:
        """The neuron's equations and parameters, or UnsupportedNeuronError naming ``where``."""
        raise NotImplementedError

    # -- running and state ------------------------------------------------------------------------
    def run_library(self, m: nn.Module, x_seq: torch.Tensor) -> torch.Tensor:
        """The neuron itself over a (T, ...) sequence from its reset state (the reference)."""
        raise NotImplementedError

    def carries_state(self, m: nn.Module) -> bool:
        """Whether the neuron keeps its state from one forward call to the next (a node built
        from it does the same, ``carry_state``)."""
        return False

    def returns_state(self, m: nn.Module) -> bool:
        """Whether a multi-step call returns ``(spikes, state)`` rather than the spikes."""
        return False

    def reset(self, m: nn.Module) -> None:
        """Put ``m`` back in its reset state (any module of the framework; nothing if stateless)."""

    def invalidate_reset_cache(self, model: nn.Module) -> None:
        """Forget whatever the framework caches about ``model``'s stateful modules (its module
        tree changed under it)."""

    # -- tracing ----------------------------------------------------------------------------------
    def trace_patches(self, patch: Patch, make_node: Callable[..., Any]) -> None:
        """Replace the framework's functions that would misbehave while tracing.
        ``make_node(op, target, args)`` adds a node to the graph being traced; ``patch`` undoes
        itself after the trace."""

    def concrete_args(self, model: nn.Module, args: Dict[str, Any]) -> None:
        """Bind forward arguments the tracer cannot take symbolically (in place)."""

    # -- converting -------------------------------------------------------------------------------
    def site_rule(self, m: nn.Module, n_calls: int) -> Tuple[Optional[str], str]:
        """(why this neuron, called ``n_calls`` times per forward, cannot be converted, or None;
        a note added to the reason when it is converted)."""
        return None, ""

    def multi_step_batch_norm(self, bn: nn.Module) -> bool:
        """A batch norm of this framework whose statistics run over a whole (T, B, C, ...)
        sequence (what a reversible node can fold: revpass/nodes/batchnorm.py)."""
        return False

    def folds_time(self, m: nn.Module) -> Optional[bool]:
        """For a stateless layer of this framework that subclasses a torch layer: True when its
        forward runs the torch layer over ``x.flatten(0, 1)`` of a (T, B, ...) input and
        unflattens the result, False when its forward is the torch layer's own; None when it
        is neither (revpass/passes/spikes.py then leaves it as it is)."""
        return None

    def set_step_mode(self, model: nn.Module, mode: str) -> bool:
        """Set the step mode of every module of this framework in ``model``; False if the
        framework has no such setting."""
        return False

    # -- verifying --------------------------------------------------------------------------------
    def on_channels(self, m: nn.Module, lo: int = 0, hi: Optional[int] = None, channel_dim: int = 1) -> nn.Module:
        """Neuron ``m`` restricted to channels ``[lo, hi)`` (all of them if ``hi`` is None) along
        ``channel_dim`` of its input, with a state of its own: what revpass.verify runs as the
        halves F and G of a reversible node's coupling (and its unpaired channel).

        The returned module is called with that slice of the input alone, as ``m`` is called in
        its step mode (one step, or a whole (T, ...) sequence), and returns what ``m`` returns:
        its spikes (the tensor, or the first item of a tuple), then its state, if any, for those
        channels. Its state starts from the reset state and carries from call to call (a
        single-step neuron's state is never passed in). Its parameters are views of ``m``'s:
        sliced to the channel range where they are per channel (a dimension that lines up with
        the input's channel dimension, of size > 1, as revpass.nodes.layout slices them),
        shared where they are scalar; gradients reach ``m``'s own tensors.

        The default runs a copy of ``m`` with :meth:`neuron_tensors` replaced by those views
        (``torch.func.functional_call``)."""
        return ChannelPart(m, lo, hi, channel_dim, self.neuron_tensors(m), self.reset)

    def neuron_tensors(self, m: nn.Module) -> Dict[str, torch.Tensor]:
        """``m``'s tensors that are the neuron's parameters (not its state), by their names in
        ``m``: what :meth:`on_channels` slices per channel. By default its parameters."""
        return dict(m.named_parameters())


class Registered(Adapter):
    """Neuron classes registered with :func:`revpass.register_neuron`: the function given there
    reads the spec; the module is run as it is."""

    package = "registered"

    def __init__(self, to_spec: Callable[[nn.Module], NeuronSpec], state: str = "carried"):
        self._to_spec = to_spec
        self.state = state  # "carried" | "restart" (revpass.register_neuron)

    def is_neuron(self, m: nn.Module) -> bool:
        return True

    def step_mode(self, m: nn.Module) -> str:
        return getattr(m, "step_mode", "m")

    def to_spec(self, m: nn.Module, where: str) -> NeuronSpec:
        spec = self._to_spec(m)
        if not isinstance(spec, NeuronSpec):
            raise TypeError(
                f"{where}: the function registered for {type(m).__name__} returned "
                f"{type(spec).__name__}, not a revpass NeuronSpec"
            )
        return spec

    def run_library(self, m: nn.Module, x_seq: torch.Tensor) -> torch.Tensor:
        self.reset(m)
        if self.step_mode(m) == "m":
            return m(x_seq)
        return torch.stack([m(x) for x in x_seq])

    def carries_state(self, m: nn.Module) -> bool:
        return self.state == "carried"

    def reset(self, m: nn.Module) -> None:
        fn = getattr(m, "reset", None)
        if callable(fn):
            fn()

    def on_channels(self, m: nn.Module, lo: int = 0, hi: Optional[int] = None, channel_dim: int = 1) -> nn.Module:
        part = super().on_channels(m, lo, hi, channel_dim)
        part.remedy = (
            f"make {type(m).__name__}'s forward work on any number of channels (give per-channel "
            "parameters a shape that lines up with the input's channel dimension, e.g. (C, 1, 1) for "
            "(T, B, C, H, W), so that they are sliced per half), or convert this site with mode='exact'"
        )
        return part


def channel_slice(t: Any, lo: int, hi: Optional[int], channel_dim: int, x_ndim: int) -> Any:
    """``t`` (a neuron's parameter) for channels ``[lo, hi)`` of an input of ``x_ndim`` dims
    whose channels are dim ``channel_dim``: narrowed where ``t`` is per channel (its dimension
    that lines up with the channel dimension, broadcasting from the right, has size > 1), else
    ``t`` itself (shared). revpass.nodes.layout.Layout.param slices a node's parameters the same
    way."""
    if hi is None or not isinstance(t, torch.Tensor):
        return t
    axis = t.dim() - (x_ndim - channel_dim)
    if 0 <= axis < t.dim() and t.shape[axis] > 1:
        return t.narrow(axis, lo, hi - lo)
    return t


class ChannelPart(nn.Module):
    """A neuron on a range of its input's channels, with its own state (see
    :meth:`Adapter.on_channels`): a reset copy of the neuron, called with its neuron tensors
    replaced by :func:`channel_slice` views of the original's. ``remedy`` says what to change
    when the neuron cannot run on a part of its channels (revpass.verify adds it to the error)."""

    def __init__(self, m: nn.Module, lo: int, hi: Optional[int], channel_dim: int,
                 tensors: Dict[str, torch.Tensor], reset: Callable[[nn.Module], None]):
        super().__init__()
        self.lo, self.hi, self.channel_dim = lo, hi, channel_dim
        self.remedy = ""
        object.__setattr__(self, "_tensors", dict(tensors))  # the original's: not this module's own
        object.__setattr__(self, "neuron", safe_deepcopy(m))  # not a child: nothing of it is a parameter here
        reset(self.neuron)

    def views(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The neuron tensors for this part, for an input like ``x``."""
        return {k: channel_slice(t, self.lo, self.hi, self.channel_dim, x.dim()) for k, t in self._tensors.items()}

    def forward(self, x: torch.Tensor) -> Any:
        views = self.views(x)
        if not views:
            return self.neuron(x)
        return torch.func.functional_call(self.neuron, views, (x,))

    def extra_repr(self) -> str:
        hi = "all" if self.hi is None else self.hi
        return f"{type(self.neuron).__name__}, channels [{self.lo}, {hi}) of dim {self.channel_dim}"
