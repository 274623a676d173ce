"""The optimized backwards run in slices of the batch or a spatial dim: each element's neuron
depends on no other element, so slices are independent, and the transient records and factors of
a node's backward are those of one slice, not of the whole sequence."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from revpass.neurons.spec import Params, State

Tensor = torch.Tensor

#: the optimized backwards run in at most CHUNK_MAX slices of at least CHUNK_MIN_ELEMS elements
#: of a step each. A slice costs a fixed number of kernel launches per step (a few dozen small
#: ops), and its work grows with its elements per step, so the bound is per step and holds at any
#: T. By default slices are large enough that the launches cost little (2^18 elements: on a CPU,
#: slices of 2^15 elements per step made a node's backward 1.5x slower); revpass.convert gives its
#: nodes CHUNK_MIN_ELEMS_FINE, memory first (:meth:`revpass.nodes.modules.Node.set_slicing`).
#: Set CHUNK_MAX = 1 to run whole sequences.
CHUNK_MAX = 8
CHUNK_MIN_ELEMS = 1 << 18
CHUNK_MIN_ELEMS_FINE = 1 << 12


def chunks(shape: Sequence[int], P: Params, min_elems: Optional[int] = None
           ) -> Optional[Tuple[int, List[Tuple[int, int]]]]:
    """How a (T, B, C, ...) sequence's backward is sliced: (dim, [(lo, hi), ...]) or None (whole).

    The slices run along the batch dim or a spatial dim (never T, which the sweep runs along,
    nor the channel dim, which the reversible node pairs) along which no parameter varies; the
    dim allowing the most slices is taken: the batch dim on a tie, else the outermost."""
    per_step = 1
    for s in shape[1:]:
        per_step *= s
    n = min(CHUNK_MAX, per_step // max(1, CHUNK_MIN_ELEMS if min_elems is None else min_elems))
    if n < 2 or len(shape) < 2:
        return None
    step_ndim = len(shape) - 1

    def free(d):
        j = d - 1  # the dim in a step's (B, C, ...) shape
        return all(not (0 <= p.dim() - step_ndim + j < p.dim()) or p.shape[p.dim() - step_ndim + j] == 1
                   for p in P.values())

    dims = [d for d in (1, *range(3, len(shape))) if free(d)]
    if not dims:
        return None
    d = max(dims, key=lambda d: (min(shape[d], n), d == 1, -d))
    k = min(n, shape[d])
    if k < 2:
        return None
    bounds = [i * shape[d] // k for i in range(k + 1)]
    return d, list(zip(bounds[:-1], bounds[1:]))


class Slice:
    """One slice [lo, hi) of a (T, B, C, ...) sequence's dim ``d``, applied to the tensors the
    backward reads: sequences (dim d), stacked records and bits (K, T, ..., dim d + 1) and
    per-step states (B, C, ..., dim d - 1, broadcast ones expanded first)."""

    def __init__(self, d: int, lo: int, hi: int, step_shape: Sequence[int]):
        self.d, self.lo, self.n, self.step_shape = d, lo, hi - lo, tuple(step_shape)

    def __call__(self, t: Tensor) -> Tensor:
        return t.narrow(self.d, self.lo, self.n)

    def inner(self, t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.narrow(self.d + 1, self.lo, self.n)

    def step(self, t: Tensor) -> Tensor:
        """A per-step (B, C, ...) tensor's slice."""
        return t.narrow(self.d - 1, self.lo, self.n)

    def state(self, state: Optional[State]) -> Optional[State]:
        if state is None:
            return None
        return tuple(self.step(s.expand(self.step_shape)) for s in state)


def slices(shape: Sequence[int], P: Params, min_elems: Optional[int] = None) -> List[Any]:
    """The slices a (T, B, C, ...) sequence's backward runs in (:func:`chunks`): one whole-sequence
    slice, or :class:`Slice` objects."""
    plan = chunks(shape, P, min_elems) if shape[0] else None
    if plan is None:
        return [Whole()]
    d, ranges = plan
    return [Slice(d, lo, hi, shape[1:]) for lo, hi in ranges]


def in_chunks(run, g: Tensor, state0: Optional[State], P: Params, min_elems: Optional[int] = None):
    """Run a node's backward ``run(slice, out)`` slice by slice (:func:`slices`), writing the
    input gradient into one tensor, the initial states' gradients into others, and summing the
    parameter gradients."""
    parts = slices(g.shape, P, min_elems)
    if isinstance(parts[0], Whole):
        return run(parts[0], None)
    gx = torch.empty_like(g)
    g0 = None if state0 is None else [torch.empty_like(g[0]) for _ in state0]
    gP: Dict[str, Tensor] = {}
    for sl in parts:
        out = sl(gx)
        gxc, g0c, gPc = run(sl, out)
        if gxc.data_ptr() != out.data_ptr() or gxc.stride() != out.stride():
            out.copy_(gxc)
        if g0 is not None:
            for full, part in zip(g0, g0c):
                sl.step(full).copy_(part)
        for k, v in gPc.items():
            gP[k] = v if k not in gP else gP[k] + v
        del gxc, g0c, gPc  # before the next slice allocates its own
    return gx, (None if g0 is None else tuple(g0)), gP


class Whole:
    """The identity slice: the whole sequence."""

    def __call__(self, t):
        return t

    def inner(self, t):
        return t

    def step(self, t):
        return t

    def state(self, state):
        return state

