"""Spike-typed edges: layers that read an exact node's spikes keep them as bits.

The graph knows which values are spikes: the output of an exact node whose family fires 0 or 1
(``Family.binary_spikes``), and what a max pool or a reshape makes of one. A convolution, linear
layer or max pool called on such a value keeps that input for backward as a float per element;
:func:`keep_spike_inputs_as_bits` puts revpass/nodes/spike_input.py's ``LayerOnSpikes`` in its
place, which computes the same output and keeps the input as bits, 32 times less for float32,
with gradients bit for bit autograd's (docs/method.md section 11).

Only an exact node's spikes: a reversible node keeps its own output for backward, which its
readers share, so bits there would save nothing. ``LayerOnSpikes`` holds the layer's very
parameters under their names (state_dict keys unchanged), and is a module so that what wraps
modules (FSDP) finds it; only a layer whose every call reads spikes is replaced. A layer whose
forward is neither torch's own nor one its framework's adapter vouches for
(``Adapter.folds_time``), a convolution with a ``padding_mode`` other than zeros or a string
padding, a max pool returning indices: left as they are.
"""

from __future__ import annotations

import operator
from typing import Callable, Collection, List, Optional, Set, Tuple

import torch
from torch import fx, nn
from torch.nn.modules.utils import _ntuple

from revpass import meta
from revpass.neurons import folds_time
from revpass.neurons.spec import family_of
from revpass.nodes import ExactNode
from revpass.passes.decide import written_in_place
from revpass.passes.graph import module_calls
from revpass.nodes.segment import RecomputeSegment
from revpass.nodes.spike_input import LayerOnSpikes, conv_on_spikes, linear_on_spikes, max_pool_on_spikes
from revpass.utils import set_module

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
#: ops that keep spikes spikes: shape only
_SHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze", "unsqueeze"}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze}


def spike_values(gm: fx.GraphModule, given: Collection[fx.Node] = ()) -> Set[fx.Node]:
    """The values of ``gm``'s graph that are 0/1 spikes (module docstring), in graph order; a
    value something modifies in place (``s.mul_(2)``) is not, nor what is made from it.
    ``given``: placeholders known to be spikes (a recomputed segment's inputs)."""
    spikes = _Spikes()
    for n in gm.graph.nodes:
        if n in given:
            spikes.add(n)
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, ExactNode) and family_of(m.spec).binary_spikes and m.step_mode == "m":
                if not m.return_state:
                    spikes.add(n)
            elif src in spikes and (isinstance(m, (nn.Flatten, *_POOLS)) and not getattr(m, "return_indices", False)
                                    or isinstance(m, LayerOnSpikes) and m.fn is max_pool_on_spikes):
                spikes.add(n)
            elif isinstance(m, RecomputeSegment) and _returns_spikes(m.body):
                spikes.add(n)  # a recomputed segment ending at an exact node (or a pooling of its spikes)
        elif n.op == "call_function":
            if n.target is operator.getitem and src is not None and src.op == "call_module" and n.args[1] == 0:
                m = gm.get_submodule(src.target)
                if isinstance(m, ExactNode) and m.return_state and family_of(m.spec).binary_spikes:
                    spikes.add(n)  # (spikes, state): the spikes
            elif (n.target in _SHAPE_FUNCTIONS or n.target is torch.unbind) and src in spikes:
                spikes.add(n)  # a rolled node's (T, ...) spikes unbound into steps, too
            elif n.target is operator.getitem and src in spikes and src.target is torch.unbind:
                spikes.add(n)
        elif n.op == "call_method" and n.target in _SHAPE_METHODS and src in spikes:
            spikes.add(n)
    return spikes


def _returns_spikes(body: fx.GraphModule) -> bool:
    out = next(n for n in body.graph.nodes if n.op == "output").args[0]
    return isinstance(out, fx.Node) and out in spike_values(body)


def on_spikes(m: nn.Module) -> bool:
    """Whether layer ``m`` has a :class:`LayerOnSpikes` form (:func:`keep_spike_inputs_as_bits`
    puts it in m's place where every call of m reads spikes)."""
    return _replacement(m) is not None


class _Spikes(set):
    """A set that takes no value modified in place (decide.written_in_place: through views)."""

    def add(self, n: fx.Node) -> None:
        if written_in_place(n) is None:
            super().add(n)


def _conv(m: nn.Module, folds: bool) -> Optional[Tuple[Callable, tuple]]:
    dims = next((d for c, d in _CONVS.items() if isinstance(m, c)), None)
    if dims is None or m.padding_mode != "zeros" or isinstance(m.padding, str):
        return None
    return conv_on_spikes, (dims, tuple(m.stride), tuple(m.padding), tuple(m.dilation), m.groups, folds)


def _pool(m: nn.Module, folds: bool) -> Optional[Tuple[Callable, tuple]]:
    dims = next((d for c, d in _POOLS.items() if isinstance(m, c)), None)
    if dims is None or m.return_indices:
        return None
    tup = _ntuple(dims)
    stride = m.stride if m.stride is not None else m.kernel_size
    return max_pool_on_spikes, (dims, tup(m.kernel_size), tup(stride), tup(m.padding), tup(m.dilation),
                                bool(m.ceil_mode), folds)


def _replacement(m: nn.Module) -> Optional[Tuple[Callable, List[str], tuple]]:
    """(function, the names of the parameters it takes, constant arguments) for layer ``m``."""
    folds = folds_time(m)
    if folds is None:
        return None
    if isinstance(m, nn.Linear):
        return linear_on_spikes, ["weight", "bias"], ()
    conv = _conv(m, folds)
    if conv is not None:
        return conv[0], ["weight", "bias"], conv[1]
    pool = _pool(m, folds)
    if pool is not None:
        return pool[0], [], pool[1]
    return None


def keep_spike_inputs_as_bits(gm: fx.GraphModule, given: Collection[fx.Node] = (),
                              checked: Collection[fx.Node] = ()) -> List[str]:
    """Put a :class:`LayerOnSpikes` in the place of every convolution, linear layer and max pool
    whose every call reads an exact node's spikes (module docstring; ``given``: placeholders known
    to be spikes); returns their paths. ``checked``: calls whose input was 0 or 1 on the example
    inputs without being spikes by construction (revpass/passes/segments.py names them where a
    segment of their own would keep the same bits at the cost of running again): their layer's
    ``LayerOnSpikes`` checks each call's input (``checked=True``)."""
    spikes = spike_values(gm, given)
    checked = set(checked)
    done: List[str] = []
    for target, ns in module_calls(gm).items():
        if not all(len(n.args) == 1 and not n.kwargs and (n.args[0] in spikes or n in checked) for n in ns):
            continue
        m = gm.get_submodule(target)
        how = _replacement(m)
        if how is None:
            continue
        check = any(n.args[0] not in spikes for n in ns)
        set_module(gm, target, LayerOnSpikes(m, *how, checked=check))
        for n in ns:
            meta.set_strategy(n, "bits", f"{type(m).__name__} '{target}' keeps its spike input as bits"
                              + (" (0 or 1 on the example inputs: checked at every call)" if check else ""))
        done.append(str(target))
    return done
