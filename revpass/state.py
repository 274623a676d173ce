"""Neuron state: resetting every stateful module of a model, and the node that does it at a
point of a traced forward (what ``reset_net(self)`` did in the original)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from revpass.neurons import adapter_for, invalidate_reset_caches

__all__ = ["reset_states", "StateReset", "invalidate_reset_caches"]


def reset_states(model: nn.Module) -> None:
    """Reset every stateful module of ``model``: the frameworks' modules through their adapters
    (SpikingJelly's ``reset``, snnTorch's ``reset_mem``), anything else with a ``reset()``
    method (revpass nodes, registered neurons)."""
    for m in model.modules():
        if m is model or isinstance(m, StateReset):
            continue
        ad = adapter_for(m)
        if ad is not None:
            ad.reset(m)
            continue
        fn = getattr(m, "reset", None)
        if callable(fn) and not isinstance(fn, torch.Tensor):
            try:
                fn()
            except TypeError:
                pass


class StateReset(nn.Module):
    """Resets every stateful module of the model it belongs to (what ``reset_net(self)`` did in
    the original forward). Holds its model by weak reference; set by :func:`revpass.trace.trace`."""

    def __init__(self):
        super().__init__()
        self._owner: Callable[[], Optional[nn.Module]] = lambda: None

    def forward(self) -> None:
        owner = self._owner()
        if owner is not None:
            reset_states(owner)

    def __deepcopy__(self, memo):
        return StateReset()
