"""The nodes as torch.library custom ops: one graph node each, with a registered autograd.

``revpass::reversible`` and ``revpass::exact`` run a whole sequence; their backward is another
custom op (``*_backward``) that computes gradients directly (docs/method.md) or, for the
baseline, by reconstruction and re-running the forward under autograd. Everything the backward
needs goes through ``ctx.save_for_backward``, so saved_tensors_hooks see it all.

Each op takes its node's configuration as an argument, a JSON text (:func:`node_config`): the
neuron family, its constants, its surrogate by key, the parameter names, the backward mode. So a
traced, compiled or exported program carries its configuration with it and runs in any process
(a user's own surrogate, a Python function, is the exception: see
:func:`revpass.neurons.spec.spec_from_config`).

Each op has a PyTorch implementation for the CPU and one registered for CUDA; both run the backend
that :func:`revpass.nodes.kernels.choose` picks (Triton kernels on CUDA by default), and the
backward op is told which backend its forward ran.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from revpass.neurons.spec import NeuronSpec, config_json, family_of, spec_from_config, spec_to_config
from revpass.nodes import kernels, layout, reversible
from revpass.nodes.bits import packed_planes_shape

Tensor = torch.Tensor

BACKWARD_MODES = ("optimized", "recompute")


def node_config(spec: NeuronSpec, param_names: Sequence[str], mode: str = "optimized",
                slice_min_elems: Optional[int] = None, site: str = "") -> str:
    """A node's configuration as the text its ops take."""
    data = spec_to_config(spec, site)
    data.update(params=list(param_names), mode=mode, slice=slice_min_elems)
    return config_json(data)


@functools.lru_cache(maxsize=None)
def _decode(config: str):
    spec, data = spec_from_config(config)
    return spec, tuple(data["params"]), data["mode"], data["slice"], family_of(spec).n_state(spec)


def _P(names, params: List[Tensor]) -> Dict[str, Tensor]:
    return dict(zip(names, params))


def _need(names, mask: int) -> Tuple[str, ...]:
    return tuple(n for i, n in enumerate(names) if mask >> i & 1)


_VISIBLE = [False]


@contextlib.contextmanager
def visible_internals():
    """Run the nodes' forward and backward as plain Python, not through their custom ops, so that
    a TorchDispatchMode (torch's MemTracker) sees the tensors they allocate inside: a dispatch
    mode is not active within the op it intercepts, and would miss the forward's step
    temporaries and the backward's workspace. Results are the same; revpass.memory.step_peak
    measures under it."""
    _VISIBLE[0], old = True, _VISIBLE[0]
    try:
        yield
    finally:
        _VISIBLE[0] = old


def _call(op, *args):
    return op._init_fn(*args) if _VISIBLE[0] else op(*args)


def _state(state: List[Tensor]):
    return tuple(state) if len(state) else None


def _own(ts, x: Tensor) -> List[Tensor]:
    """Outputs of a custom op may not alias its inputs."""
    return [t.clone() if t.data_ptr() == x.data_ptr() else t for t in ts]


def _step_shape(x):
    return tuple(x.shape[1:])


def _both_devices(op, impl):
    """``impl`` as the op's CPU (default) implementation and as its CUDA kernel: each runs the
    backend the configuration and the tensors select (revpass.nodes.kernels.choose)."""
    op.register_kernel("cuda")(impl)


# ---------------------------------------------------------------------------------------------
# reversible
# ---------------------------------------------------------------------------------------------


def _rev_forward(x, state0, params, config, need):
    spec, names, _, _, _ = _decode(config)
    P = _P(names, params)
    y, bits, kept, stateT = kernels.reversible_forward(kernels.choose(x, spec, P), spec, x, _state(state0), P,
                                                       _need(names, need))
    return y, bits, kept, _own(stateT, x)


@torch.library.custom_op("revpass::reversible", mutates_args=())
def reversible_op(
    x: Tensor, state0: List[Tensor], params: List[Tensor], config: str, need: int
) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    return _rev_forward(x, state0, params, config, need)


_both_devices(reversible_op, _rev_forward)


@reversible_op.register_fake
def _(x, state0, params, config, need):
    spec, names, _, _, n_state = _decode(config)
    L = layout.Layout(x.shape)
    fam = family_of(spec)
    keep = fam.exact_keep(spec, _need(names, need))
    rem = L.seq(x, "r")
    return (
        torch.empty_like(x),
        x.new_empty(packed_planes_shape(layout.bits_shape(L, fam.n_bits(spec), x)), dtype=torch.uint8),
        x.new_empty((len(keep),) + tuple(rem.shape)),
        [x.new_empty(_step_shape(x)) for _ in range(n_state)],
    )


def _rev_backward_impl(gy, g_state, y, bits, kept, state0, params, config, need, backend):
    spec, names, _, min_elems, _ = _decode(config)
    P = _P(names, params)
    need_names = _need(names, need)
    if backend == "triton":
        from revpass.nodes.kernels import reversible as K

        gx, g0, gP = K.backward(spec, gy, _state(g_state), y, bits, kept, _state(state0), P, need_names)
    else:
        gx, g0, gP = reversible.reversible_backward(spec, gy, _state(g_state), y, bits, kept, _state(state0), P,
                                                    need_names, "optimized", min_elems=min_elems)
    g0 = list(g0) if g0 is not None else []
    return gx, g0, [gP[n].reshape(P[n].shape).clone() for n in need_names]


@torch.library.custom_op("revpass::reversible_backward", mutates_args=())
def reversible_backward_op(
    gy: Tensor,
    g_state: List[Tensor],
    y: Tensor,
    bits: Tensor,
    kept: Tensor,
    state0: List[Tensor],
    params: List[Tensor],
    config: str,
    need: int,
    backend: str,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    return _rev_backward_impl(gy, g_state, y, bits, kept, state0, params, config, need, backend)


_both_devices(reversible_backward_op, _rev_backward_impl)


@reversible_backward_op.register_fake
def _(gy, g_state, y, bits, kept, state0, params, config, need, backend):
    _, names, _, _, _ = _decode(config)
    P = _P(names, params)
    return (
        torch.empty_like(gy),
        [gy.new_empty(_step_shape(gy)) for _ in state0],
        [torch.empty_like(P[n]) for n in _need(names, need)],
    )


def _setup(ctx, inputs, x):
    _, state0, params, config, need = inputs
    spec, names, mode, _, _ = _decode(config)
    ctx.config, ctx.need, ctx.mode = config, need, mode
    ctx.backend = kernels.choose(x, spec, _P(names, params))  # as the forward chose
    ctx.n_state = len(state0)
    ctx.n_params = len(params)
    ctx.state_grad = [s.requires_grad for s in state0]
    ctx.set_materialize_grads(False)  # unused final states arrive as None: a cheaper sweep


def _rev_setup(ctx, inputs, output):
    x, state0, params, _, _ = inputs
    y, bits, kept, _ = output
    _setup(ctx, inputs, x)
    ctx.save_for_backward(y, bits, kept, *state0, *params)


def _rev_backward(ctx, gy, _g_bits, _g_kept, g_stateT):
    y, bits, kept, *rest = ctx.saved_tensors
    state0 = list(rest[: ctx.n_state])
    params = list(rest[ctx.n_state :])
    if gy is None:
        gy = torch.zeros_like(y)
    g_state = _g_state(g_stateT, y)
    if ctx.mode == "recompute":
        # the baseline re-runs the forward under autograd, which a custom op's kernel (below the
        # autograd dispatch key) cannot do: it runs here, in the autograd Function's backward
        gx, g0, gP = _backward_eager(ctx, gy, g_state, y, bits, kept, state0, params)
    else:
        gx, g0, gP = _call(reversible_backward_op, gy.contiguous(), g_state, y, bits, kept, state0, params,
                           ctx.config, ctx.need, ctx.backend)
    return gx, _state_grads(ctx, g0), _param_grads(ctx, gP), None, None


def _backward_eager(ctx, gy, g_state, y, bits, kept, state0, params):
    spec, names, _, _, _ = _decode(ctx.config)
    need_names = _need(names, ctx.need)
    P = _P(names, params)
    gx, g0, gP = reversible.reversible_backward(
        spec, gy, _state(g_state), y, bits, kept, _state(state0), P, need_names, "recompute"
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


def _exact_forward(x, state0, params, config, need):
    spec, names, _, _, _ = _decode(config)
    P = _P(names, params)
    s, kept, stateT = kernels.exact_forward(kernels.choose(x, spec, P), spec, x, _state(state0), P,
                                            _need(names, need))
    return s, kept, _own(stateT, x)


@torch.library.custom_op("revpass::exact", mutates_args=())
def exact_op(
    x: Tensor, state0: List[Tensor], params: List[Tensor], config: str, need: int
) -> Tuple[Tensor, Tensor, List[Tensor]]:
    return _exact_forward(x, state0, params, config, need)


_both_devices(exact_op, _exact_forward)


@exact_op.register_fake
def _(x, state0, params, config, need):
    spec, names, _, _, n_state = _decode(config)
    keep = family_of(spec).exact_keep(spec, _need(names, need))
    return (
        torch.empty_like(x),
        x.new_empty((len(keep),) + tuple(x.shape)),
        [x.new_empty(_step_shape(x)) for _ in range(n_state)],
    )


def _exact_backward_impl(gs, g_state, kept, state0, params, config, need, backend):
    spec, names, _, min_elems, _ = _decode(config)
    P = _P(names, params)
    need_names = _need(names, need)
    gx, g0, gP = kernels.exact_backward(backend, spec, gs, _state(g_state), kept, _state(state0), P, need_names,
                                        min_elems)
    g0 = list(g0) if g0 is not None else []
    return gx, g0, [gP[n].reshape(P[n].shape).clone() for n in need_names]


@torch.library.custom_op("revpass::exact_backward", mutates_args=())
def exact_backward_op(
    gs: Tensor,
    g_state: List[Tensor],
    kept: Tensor,
    state0: List[Tensor],
    params: List[Tensor],
    config: str,
    need: int,
    backend: str,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    return _exact_backward_impl(gs, g_state, kept, state0, params, config, need, backend)


_both_devices(exact_backward_op, _exact_backward_impl)


@exact_backward_op.register_fake
def _(gs, g_state, kept, state0, params, config, need, backend):
    _, names, _, _, _ = _decode(config)
    P = _P(names, params)
    return (
        torch.empty_like(gs),
        [gs.new_empty(_step_shape(gs)) for _ in state0],
        [torch.empty_like(P[n]) for n in _need(names, need)],
    )


def _exact_setup(ctx, inputs, output):
    x, state0, params, _, _ = inputs
    _, kept, _ = output
    _setup(ctx, inputs, x)
    ctx.save_for_backward(kept, *state0, *params)


def _exact_backward(ctx, gs, _g_kept, g_stateT):
    kept, *rest = ctx.saved_tensors
    state0 = list(rest[: ctx.n_state])
    params = list(rest[ctx.n_state :])
    if gs is None:
        gs = kept.new_zeros(kept.shape[1:])
    g_state = _g_state(g_stateT, gs)
    gx, g0, gP = _call(exact_backward_op, gs.contiguous(), g_state, kept, state0, params, ctx.config, ctx.need,
                       ctx.backend)
    return gx, _state_grads(ctx, g0), _param_grads(ctx, gP), None, None


exact_op.register_autograd(_exact_backward, setup_context=_exact_setup)


# ---------------------------------------------------------------------------------------------
# the forward ops, visible to a TorchDispatchMode (revpass.memory measures under it)
# ---------------------------------------------------------------------------------------------


class _Visible(torch.autograd.Function):
    """One node op's forward run as Python under visible_internals, so that a memory tracker
    sees its temporaries (inside a custom op a dispatch mode sees only its outputs), with the
    op's own setup_context and backward: the same values and gradients as the op."""

    @staticmethod
    def forward(ctx, kind, n_state, config, need, x, *rest):
        state0, params = list(rest[:n_state]), list(rest[n_state:])
        impl, setup = (_exact_forward, _exact_setup) if kind == "exact" else (_rev_forward, _rev_setup)
        out = impl(x, state0, params, config, need)
        setup(ctx, (x, state0, params, config, need), out)
        ctx.kind = kind
        *head, stateT = out
        return (*head, *stateT)

    @staticmethod
    def backward(ctx, *grads):
        n_head = 2 if ctx.kind == "exact" else 3  # (s, kept) or (y, bits, kept), then the final state
        backward = _exact_backward if ctx.kind == "exact" else _rev_backward
        gx, g_state0, g_params, _, _ = backward(ctx, *grads[:n_head], list(grads[n_head:]))
        g_state0 = list(g_state0) if g_state0 else [None] * ctx.n_state
        return (None, None, None, None, gx, *g_state0, *g_params)


def run_op(kind: str, x: Tensor, state0: List[Tensor], params: List[Tensor], config: str, need: int):
    """``revpass::exact`` or ``revpass::reversible`` on these arguments: the custom op, or under
    :func:`visible_internals` the same computation as Python (:class:`_Visible`)."""
    op = exact_op if kind == "exact" else reversible_op
    if not _VISIBLE[0]:
        return op(x, state0, params, config, need)
    out = _Visible.apply(kind, len(state0), config, need, x, *state0, *params)
    n_head = 2 if kind == "exact" else 3
    return (*out[:n_head], list(out[n_head:]))
