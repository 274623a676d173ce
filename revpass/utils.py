"""Small helpers every stage uses: a leaf module (imports torch only)."""

from __future__ import annotations

import copy
from typing import Any, List, Optional

import torch
from torch import nn


def as_tuple(inputs: Any) -> tuple:
    """Example inputs as a tuple: a tuple or list as it is, anything else as one argument."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def flatten(out: Any) -> List[torch.Tensor]:
    """The tensors in ``out`` (nested tuples, lists and dicts, dicts by sorted key), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten(out[k])]
    return []


def time_steps(example_inputs: Any) -> Optional[int]:
    """The leading dimension of the first example input: how many steps a loop over a sequence
    tensor (``for x in x_seq``) unrolls into while tracing."""
    first = example_inputs[0] if isinstance(example_inputs, (tuple, list)) and example_inputs else example_inputs
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else None


def safe_deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works after a forward: state tensors that are part of an
    autograd graph (SpikingJelly's v, snnTorch's mem) are copied detached. The model is not
    touched."""
    return copy.deepcopy(model, detached_memo(model))


def scratch_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to run once and throw away (a check of a trace, a shape pass): as
    :func:`safe_deepcopy`, but with ``model``'s own parameters, which a forward does not write,
    rather than clones of them (a large model's classifier alone can take seconds to clone);
    buffers and states are copies, as a run in training mode writes them."""
    memo = detached_memo(model)
    for p in model.parameters():
        memo.setdefault(id(p), p)
    return copy.deepcopy(model, memo)


def detached_memo(model: nn.Module) -> dict:
    """A deepcopy memo that maps every non-leaf tensor held in ``model``'s modules (attributes,
    buffers, a framework's state dict such as SpikingJelly's ``_memories``, nested in tuples,
    lists and dicts) to a detached copy."""
    memo = {}
    for m in model.modules():
        pools = [vars(m), m._buffers]
        pools += [v for v in vars(m).values() if isinstance(v, dict)]
        for pool in pools:
            stack = list(pool.values())
            while stack:
                v = stack.pop()
                if isinstance(v, torch.Tensor):
                    if not v.is_leaf:
                        memo[id(v)] = v.detach().clone()
                elif isinstance(v, (tuple, list)):
                    stack.extend(v)
                elif isinstance(v, dict):
                    stack.extend(v.values())
    return memo


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``root`` (its parent's ``setattr``)."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
