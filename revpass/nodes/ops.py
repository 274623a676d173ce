"""The nodes as torch.library custom ops: one graph node each, with a registered autograd.

``revpass::reversible`` and ``revpass::exact`` run a whole sequence; their backward is another
custom op (``*_backward``) that computes gradients directly (METHOD.md section 5) or, for the
baseline, by reconstruction and re-running the forward under autograd. Everything the backward
needs goes through ``ctx.save_for_backward``, so saved_tensors_hooks see it all.

Non-tensor configuration (the neuron spec) lives in a registry keyed by an int, which is what the
op receives.
"""

from __future__ import annotations

import contextlib

import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from revpass.neurons.spec import NeuronSpec, family_of
from revpass.nodes import core

Tensor = torch.Tensor

BACKWARD_MODES = {"optimized": 0, "recompute": 1}
_MODE_NAMES = {v: k for k, v in BACKWARD_MODES.items()}


@dataclass
class OpConfig:
    spec: NeuronSpec
    param_names: Tuple[str, ...]
    mode: str = "optimized"
    slice_min_elems: Optional[int] = None  # the backward's slices (core.chunks); None: the default

    @property
    def n_state(self) -> int:
        fam = family_of(self.spec)
        P = {k: v.detach().cpu() for k, v in self.spec.params.items()}
        return len(fam.init_state(self.spec, torch.zeros(1), fam.prepare(self.spec, P)))


_CONFIGS: Dict[int, OpConfig] = {}
_N_STATE: Dict[int, int] = {}
_ids = itertools.count(1)


def register_config(cfg: OpConfig) -> int:
    i = next(_ids)
    _CONFIGS[i] = cfg
    _N_STATE[i] = cfg.n_state
    return i


def _P(cfg: OpConfig, params: List[Tensor]) -> Dict[str, Tensor]:
    return dict(zip(cfg.param_names, params))


def _need(cfg: OpConfig, mask: int) -> Tuple[str, ...]:
    return tuple(n for i, n in enumerate(cfg.param_names) if mask >> i & 1)


_VISIBLE = [False]


@contextlib.contextmanager
def visible_internals():
    """Run the nodes' backward kernels as plain Python, not through their custom ops, so that a
    TorchDispatchMode (torch's MemTracker) sees the tensors they allocate inside: a dispatch mode
    is not active within the op it intercepts, and would miss the backward's workspace. Results
    are the same; revpass.memory.step_peak measures under it."""
    _VISIBLE[0], old = True, _VISIBLE[0]
    try:
        yield
    finally:
        _VISIBLE[0] = old


def _call(op, *args):
    return op._init_fn(*args) if _VISIBLE[0] else op(*args)


def _state(state: List[Tensor]):
    return tuple(state) if len(state) else None


# ---------------------------------------------------------------------------------------------
# reversible
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("revpass::reversible", mutates_args=())
def reversible_op(
    x: Tensor, state0: List[Tensor], params: List[Tensor], cfg: int, need: int
) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    c = _CONFIGS[cfg]
    y, bits, kept, stateT = core.reversible_forward(
        c.spec, x, _state(state0), _P(c, params), _need(c, need)
    )
    return y, bits, kept, [s.clone() if s.data_ptr() == x.data_ptr() else s for s in stateT]


def _step_shape(x):
    return tuple(x.shape[1:])


@reversible_op.register_fake
def _(x, state0, params, cfg, need):
    c = _CONFIGS[cfg]
    L = core.Layout(x.shape)
    fam = family_of(c.spec)
    nb = fam.n_bits(c.spec)
    n = 1
    for d in core._bits_shape(L, nb, x)[1:]:
        n *= d
    keep = fam.exact_keep(c.spec, _need(c, need))
    rem = L.seq(x, "r")
    return (
        torch.empty_like(x),
        x.new_empty(core.n_packed_bytes(x.shape[0], n), dtype=torch.uint8),
        x.new_empty((len(keep),) + tuple(rem.shape)),
        [x.new_empty(_step_shape(x)) for _ in range(_N_STATE[cfg])],
    )


@torch.library.custom_op("revpass::reversible_backward", mutates_args=())
def reversible_backward_op(
    gy: Tensor,
    g_state: List[Tensor],
    y: Tensor,
    bits: Tensor,
    kept: Tensor,
    state0: List[Tensor],
    params: List[Tensor],
    cfg: int,
    need: int,
    mode: int,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    c = _CONFIGS[cfg]
    need_names = _need(c, need)
    P = _P(c, params)
    gx, g0, gP = core.reversible_backward(
        c.spec, gy, _state(g_state), y, bits, kept, _state(state0), P, need_names, _MODE_NAMES[mode],
        min_elems=c.slice_min_elems,
    )
    g0 = list(g0) if g0 is not None else []
    return gx, g0, [gP[n].reshape(P[n].shape).clone() for n in need_names]


@reversible_backward_op.register_fake
def _(gy, g_state, y, bits, kept, state0, params, cfg, need, mode):
    c = _CONFIGS[cfg]
    need_names = _need(c, need)
    P = _P(c, params)
    return (
        torch.empty_like(gy),
        [gy.new_empty(_step_shape(gy)) for _ in state0],
        [torch.empty_like(P[n]) for n in need_names],
    )


def _rev_setup(ctx, inputs, output):
    x, state0, params, cfg, need = inputs
    y, bits, kept, _ = output
    ctx.cfg = cfg
    ctx.need = need
    ctx.n_state = len(state0)
    ctx.n_params = len(params)
    ctx.state_grad = [s.requires_grad for s in state0]
    ctx.set_materialize_grads(False)  # unused final states arrive as None: a cheaper sweep
    ctx.save_for_backward(y, bits, kept, *state0, *params)


def _rev_backward(ctx, gy, _g_bits, _g_kept, g_stateT):
    y, bits, kept, *rest = ctx.saved_tensors
    state0 = list(rest[: ctx.n_state])
    params = list(rest[ctx.n_state :])
    if gy is None:
        gy = torch.zeros_like(y)
    g_state = _g_state(g_stateT, y)
    mode = BACKWARD_MODES[_CONFIGS[ctx.cfg].mode]
    if mode == BACKWARD_MODES["recompute"]:
        # the baseline re-runs the forward under autograd, which a custom op's kernel (below the
        # autograd dispatch key) cannot do: it runs here, in the autograd Function's backward
        gx, g0, gP = _backward_eager(ctx, gy, g_state, y, bits, kept, state0, params)
    else:
        gx, g0, gP = _call(reversible_backward_op,
                           gy.contiguous(), g_state, y, bits, kept, state0, params, ctx.cfg, ctx.need, mode)
    return gx, _state_grads(ctx, g0), _param_grads(ctx, gP), None, None


def _backward_eager(ctx, gy, g_state, y, bits, kept, state0, params):
    c = _CONFIGS[ctx.cfg]
    need_names = _need(c, ctx.need)
    P = _P(c, params)
    gx, g0, gP = core.reversible_backward(
        c.spec, gy, _state(g_state), y, bits, kept, _state(state0), P, need_names, "recompute"
    )
    return gx, (list(g0) if g0 is not None else []), [gP[n].reshape(P[n].shape) for n in need_names]


def _g_state(g_stateT, like):
    """Gradients of the final state, or [] when nothing used it (the sweep skips the state term)."""
    if all(g is None for g in g_stateT):
        return []
    return [g if g is not None else like.new_zeros(like.shape[1:]) for g in g_stateT]


def _state_grads(ctx, g0):
    if not ctx.n_state:
        return []
    return [g if need else None for g, need in zip(g0, ctx.state_grad)]


def _param_grads(ctx, gP):
    it = iter(gP)
    return [next(it) if ctx.need >> i & 1 else None for i in range(ctx.n_params)]


reversible_op.register_autograd(_rev_backward, setup_context=_rev_setup)


# ---------------------------------------------------------------------------------------------
# exact
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("revpass::exact", mutates_args=())
def exact_op(
    x: Tensor, state0: List[Tensor], params: List[Tensor], cfg: int, need: int
) -> Tuple[Tensor, Tensor, List[Tensor]]:
    c = _CONFIGS[cfg]
    s, kept, stateT = core.exact_forward(c.spec, x, _state(state0), _P(c, params), _need(c, need))
    return s, kept, [t.clone() if t.data_ptr() == x.data_ptr() else t for t in stateT]


@exact_op.register_fake
def _(x, state0, params, cfg, need):
    c = _CONFIGS[cfg]
    keep = family_of(c.spec).exact_keep(c.spec, _need(c, need))
    return (
        torch.empty_like(x),
        x.new_empty((len(keep),) + tuple(x.shape)),
        [x.new_empty(_step_shape(x)) for _ in range(_N_STATE[cfg])],
    )


@torch.library.custom_op("revpass::exact_backward", mutates_args=())
def exact_backward_op(
    gs: Tensor,
    g_state: List[Tensor],
    kept: Tensor,
    state0: List[Tensor],
    params: List[Tensor],
    cfg: int,
    need: int,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    c = _CONFIGS[cfg]
    need_names = _need(c, need)
    P = _P(c, params)
    gx, g0, gP = core.exact_backward(
        c.spec, gs, _state(g_state), kept, _state(state0), P, need_names, min_elems=c.slice_min_elems
    )
    g0 = list(g0) if g0 is not None else []
    return gx, g0, [gP[n].reshape(P[n].shape).clone() for n in need_names]


@exact_backward_op.register_fake
def _(gs, g_state, kept, state0, params, cfg, need):
    c = _CONFIGS[cfg]
    P = _P(c, params)
    return (
        torch.empty_like(gs),
        [gs.new_empty(_step_shape(gs)) for _ in state0],
        [torch.empty_like(P[n]) for n in _need(c, need)],
    )


def _exact_setup(ctx, inputs, output):
    x, state0, params, cfg, need = inputs
    _, kept, _ = output
    ctx.cfg = cfg
    ctx.need = need
    ctx.n_state = len(state0)
    ctx.n_params = len(params)
    ctx.state_grad = [s.requires_grad for s in state0]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(kept, *state0, *params)


def _exact_backward(ctx, gs, _g_kept, g_stateT):
    kept, *rest = ctx.saved_tensors
    state0 = list(rest[: ctx.n_state])
    params = list(rest[ctx.n_state :])
    if gs is None:
        gs = kept.new_zeros(kept.shape[1:])
    g_state = _g_state(g_stateT, gs)
    gx, g0, gP = _call(exact_backward_op, gs.contiguous(), g_state, kept, state0, params, ctx.cfg, ctx.need)
    return gx, _state_grads(ctx, g0), _param_grads(ctx, gP), None, None


exact_op.register_autograd(_exact_backward, setup_context=_exact_setup)
