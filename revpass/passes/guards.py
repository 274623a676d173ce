"""Guards for what a traced graph assumed about its inputs.

A time loop over a sequence input (``for x in x_seq``, ``for t in range(x.shape[0])``) unrolls
while tracing into as many steps as the example input has: the graph then reads steps 0 to T-1
of that input and no others. Run at another T it would silently drop steps or fail deep inside.
:func:`guard_time_steps` puts a check at the start of the graph, for every input the graph
indexes step by step, that raises a :class:`revpass.errors.TimeStepsError` naming the T the model
was converted at.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, Sequence

import torch
from torch import fx

from revpass.errors import ShapeAssumedError, TimeStepsError


def check_time_steps(x: Any, steps: int, name: str) -> None:
    """Raise when input ``name`` does not have ``steps`` steps along its first dimension."""
    if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] != steps:
        raise TimeStepsError(
            f"input '{name}' has {x.shape[0]} time steps, but this model was converted with example inputs of "
            f"{steps}: its time loop was unrolled over {steps} steps. Convert it again with an example of "
            f"{x.shape[0]} steps (revpass.convert(model, example_inputs))"
        )


def check_shape(x: Any, shape: tuple, name: str) -> None:
    """Raise when input ``name`` does not have the ``shape`` the graph was traced with."""
    if isinstance(x, torch.Tensor) and tuple(x.shape) != tuple(shape):
        raise ShapeAssumedError(
            f"input '{name}' has shape {tuple(x.shape)}, but this model's forward reads its inputs' shapes "
            f"as numbers (x.shape, x.ndim, range(x.shape[0])), so it was traced at the example's {tuple(shape)}. "
            "Convert it again with an example of this shape (revpass.convert(model, example_inputs))"
        )


def guard_time_steps(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Dict[str, Any]:
    """Check, at the start of ``gm``'s graph, the number of steps of every input whose steps the
    graph reads one by one (integer indexing or unbinding along the first dimension), or, when
    the trace read the inputs' shapes as numbers (``gm.revpass_shapes_assumed``), every tensor
    input's whole shape. Returns {input name: steps or shape} for the inputs guarded."""
    if getattr(gm, "revpass_shapes_assumed", False):
        shapes = {p.name: tuple(x.shape) for p, x in zip([n for n in gm.graph.nodes if n.op == "placeholder"],
                                                           example_inputs) if isinstance(x, torch.Tensor)}
        _insert(gm, check_shape, shapes)
        return dict(shapes)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    guarded: Dict[str, int] = {}
    for p, x in zip(placeholders, example_inputs):
        if not isinstance(x, torch.Tensor) or not x.dim():
            continue
        stepwise = any(
            (u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int))
            or (u.op == "call_function" and u.target is torch.unbind and (u.args[1:] or (0,))[0] == 0)
            or (u.op == "call_method" and u.target == "unbind" and (u.args[1:] or (0,))[0] == 0)
            for u in p.users)
        if stepwise:
            guarded[p.name] = int(x.shape[0])
    _insert(gm, check_time_steps, guarded)
    return guarded


def _insert(gm: fx.GraphModule, check, expected: Dict[str, Any]) -> None:
    """``check(input, expected, name)`` after the placeholders, for each input in ``expected``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not expected or not placeholders:
        return
    for p in reversed(placeholders):
        if p.name in expected:
            with gm.graph.inserting_after(placeholders[-1]):
                gm.graph.call_function(check, (p, expected[p.name], p.name))
    gm.recompile()
