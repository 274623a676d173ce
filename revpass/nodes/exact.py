"""The exact node's algorithms, framework-free (docs/method.md, "The exact node"): the original
neuron's function bit for bit, keeping the pre-spike membrane, with the analytic backward."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from revpass.neurons.spec import NeuronSpec, Params, State, family_of, run_sequence
from revpass.nodes.layout import init_state
from revpass.nodes.slicing import in_chunks

Tensor = torch.Tensor


def exact_forward(
    spec: NeuronSpec, x: Tensor, state0: Optional[State], P: Params, need_params: Sequence[str]
) -> Tuple[Tensor, Tensor, State]:
    """Forward without autograd: (spikes, kept (K, T, ...), final state)."""
    fam = family_of(spec)
    keep = fam.exact_keep(spec, need_params)
    kept = x.new_empty((len(keep),) + x.shape)
    s, stateT, _, _ = run_sequence(spec, x, state0, P, record_into={k: kept[i] for i, k in enumerate(keep)})
    if stateT is None or len(stateT) == 0:
        stateT = init_state(spec, x, P)
    return s, kept, stateT


def exact_backward(
    spec: NeuronSpec,
    gs: Tensor,
    g_state: Optional[State],
    kept: Tensor,
    state0: Optional[State],
    P: Params,
    need_params: Sequence[str],
    min_elems: Optional[int] = None,
) -> Tuple[Tensor, Optional[State], Dict[str, Tensor]]:
    """Gradients of the exact node from its kept records: the family's
    :meth:`~revpass.neurons.spec.Family.exact_stream` where it has one (the framework's own
    backward, bit for bit), else its ``vjp`` in slices as :func:`reversible_backward`
    (``min_elems``: elements per step of a slice, default CHUNK_MIN_ELEMS)."""

    fam = family_of(spec)
    keep = fam.exact_keep(spec, need_params)
    streamed = fam.exact_stream(spec, dict(zip(keep, kept)), gs, g_state, fam.prepare(spec, P), need_params)
    if streamed is not None:  # the framework's own backward, step by step: no slices
        return _state_grad_or_none(gs, state0, *streamed)

    def run(sl, out):
        return _exact_backward(spec, sl(gs), sl.state(g_state), sl.inner(kept), sl.state(state0), P,
                               need_params)

    return in_chunks(run, gs, state0, P, min_elems)


def _exact_backward(spec, gs, g_state, kept, state0, P, need_params):
    fam = family_of(spec)
    given = state0
    if state0 is None:
        state0 = init_state(spec, gs, P)
    keep = fam.exact_keep(spec, need_params)
    Pp = fam.prepare(spec, P)
    recs = fam.recs_from_kept(spec, dict(zip(keep, kept)), state0, Pp)
    return _state_grad_or_none(gs, given, *fam.vjp(spec, recs, gs, g_state, Pp, need_params))


def _state_grad_or_none(gs, state0, gx, g0, gP):
    """The initial state's gradient where a state was given (zeros for a part the backward left
    None), None where the node started from its reset state."""
    if state0 is not None:
        x0 = gs[0] if gs.shape[0] else gs.new_empty(gs.shape[1:])
        g0 = tuple(
            torch.zeros_like(s.expand_as(x0)) if g0 is None or g0[i] is None else g0[i]
            for i, s in enumerate(state0)
        )
    else:
        g0 = None
    return gx, g0, gP
