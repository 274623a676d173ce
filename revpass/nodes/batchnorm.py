"""A batch norm folded into the reversible node that reads it: its input is not kept.

In training, a batch norm keeps its input (the convolution's output) for backward: one float per
element, as much as everything the reversible node keeps. But its backward needs only the
normalized input x^ = (z - beta) / gamma, and its output z is the reversible node's input, which
the node's backward rebuilds anyway (docs/method.md section 4). So a batch norm whose only reader is
a reversible node is folded into it (revpass/passes/fold.py): the node runs the batch norm
itself, keeps the batch's per-channel mean and 1/std and nothing per element, and in backward
computes the batch norm's gradients from the rebuilt z:

    x^ = (z - beta) / gamma
    dbeta = sum(gz),  dgamma = sum(gz * x^)                      (over all dims but channels)
    gc = gamma / std * (gz - dbeta / M - x^ * dgamma / M)        (M elements per channel)

which is torch's batch-norm backward with x^ rebuilt instead of stored. The rebuilt z is within a
rounding step of the true one, so x^ is within a rounding step divided by |gamma|: a channel with
|gamma| < GAMMA_MIN would amplify that, and then the batch norm's input is kept instead, as if
unfolded. The forward is the batch norm module's own (running statistics, momentum,
num_batches_tracked), so outputs equal the unfolded conversion's bit for bit.

It applies to SpikingJelly's multi-step batch norms (step_mode='m': statistics over every dim of
a (T, B, C, ...) sequence but C) before a SpikingJelly neuron (spikes of 0 and 1), in training
mode, under autograd, in float32 or float64, with an even channel count and the optimized
backward; anywhere else the node runs ``bn(x)`` and then itself, the same function.

The backward runs in two passes over the node's slices (revpass.nodes.slicing.slices): the node's
own backward, which hands over each slice's rebuilt z, gives dL/dz, the per-channel sums and
the spikes Y - z (packed 8 per byte, for the second pass); then, slice by slice,
z = Y - spikes again (the same values) and the batch norm's input gradient, written over dL/dz.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from revpass.neurons import family_of, multi_step_batch_norm
from revpass.nodes import bits, kernels, reversible, slicing
from revpass.nodes.layout import init_state

Tensor = torch.Tensor

GAMMA_MIN = 1e-2  # below this |gamma| the batch norm keeps its input (x^ would lose accuracy)


def foldable(bn: nn.Module) -> bool:
    """A batch norm that the node can fold: a multi-step one (its framework's adapter says)."""
    return multi_step_batch_norm(bn)


def foldable_into(node, bn: nn.Module) -> bool:
    """Whether ``bn`` folds into ``node``: a multi-step batch norm, and for an exact node a family
    that rebuilds the node's input from what it keeps (Family.input_step)."""
    if not foldable(bn):
        return False
    return node.kind != "exact" or family_of(node.spec).rebuilds_input(node.spec)


def applies(node, bn: nn.Module, x: Tensor, residual: Optional[Tensor] = None) -> bool:
    """Whether this call runs folded (see the module docstring); a ``residual`` (added to the
    batch norm's output before an exact node) of the batch norm's output's shape and dtype."""
    if residual is not None and (node.kind != "exact" or not isinstance(residual, Tensor)
                                 or residual.shape != x.shape or residual.dtype != x.dtype):
        return False
    if not (bn.training and torch.is_grad_enabled() and not node.plain and node.backward_mode == "optimized"
            and node.step_mode == "m" and x.dtype in (torch.float32, torch.float64) and x.dim() >= 3
            and x.shape[2] == bn.num_features and x.shape[0] > 0):
        return False
    if node.kind == "exact":
        return family_of(node.spec).rebuilds_input(node.spec)
    return x.shape[2] % 2 == 0 and family_of(node.spec).binary_spikes  # spikes of 0 and 1: X = Y - spikes


def per_channel(v: Tensor, like: Tensor) -> Tensor:
    """A (C,) vector shaped to broadcast over a (T, B, C, ...) sequence."""
    return v.reshape((1, 1, -1) + (1,) * (like.dim() - 3))


def run(node, bn: nn.Module, x: Tensor, state0: Optional[tuple], residual: Optional[Tensor] = None
        ) -> Tuple[Tensor, tuple]:
    """y, final state = node(bn(x) [+ residual]), folded (:class:`FoldedBatchNorm` into a
    reversible node, :class:`FoldedExact` into an exact one).

    The batch norm's weight and bias are inputs of the autograd Function: autograd takes their
    gradients to them, and the backward reads them from there. Under FSDP2, a batch norm that is
    an FSDP unit apart from its node's (``fully_shard(bn)``) holds sharded parameters outside its
    own forward, and that forward runs inside the Function, without autograd, where FSDP registers
    no backward hooks. So the Function runs inside bn's FSDP forward, as
    ``register_fsdp_forward_method`` runs a module's other methods: FSDP unshards bn first (the
    Function gets the unsharded parameters, whose gradients FSDP reduce-scatters), registers its
    post-backward (that reduce-scatter) on the node's inputs and its pre-backward (the all-gather
    again, which the backward reads gamma and beta from) on the node's outputs, and reshards after.
    bn's own call inside runs its hooks again: they gather nothing, and reshard as it returns.
    """
    P = node.params()
    need = tuple(k for k, p in P.items() if p.requires_grad)

    def apply(x: Tensor, *state0: Tensor) -> tuple:
        if node.kind == "exact":
            return FoldedExact.apply(node, bn, len(state0), need, x, residual, *state0, *P.values(), bn.weight,
                                     bn.bias)
        return FoldedBatchNorm.apply(node, bn, len(state0), need, x, *state0, *P.values(), bn.weight, bn.bias)

    fsdp = _own_fsdp_state(node, bn)
    if fsdp is None:
        out = apply(x, *(state0 or ()))
    else:
        # FSDPState's forward hooks, called as register_fsdp_forward_method's wrapper calls them
        args, _ = fsdp._pre_forward(bn, (x, *(state0 or ())), {})
        out = fsdp._post_forward(bn, args, apply(*args))
    return out[0], tuple(out[1:])


def _own_fsdp_state(node, bn: nn.Module):
    """bn's FSDP2 state (torch.distributed.fsdp.fully_shard) if bn is an FSDP unit apart from
    ``node``'s, else None: in its node's unit (``fully_shard([bn, node])``) or in an enclosing
    one, bn is unsharded through the node's forward and, from the node's outputs, its backward."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: FSDP2 was torch.distributed._composable.fsdp
        return None
    if not isinstance(bn, FSDPModule):
        return None
    state = bn._get_fsdp_state()
    return None if isinstance(node, FSDPModule) and node._get_fsdp_state() is state else state


def statistics(c: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """The batch's per-channel mean and 1/std of a (T, B, C, ...) sequence, as training uses."""
    var, mean = torch.var_mean(c, dim=[d for d in range(c.dim()) if d != 2], correction=0)
    return mean, (var + eps).rsqrt()


class FoldedBatchNorm(torch.autograd.Function):
    """y, *final state = node(bn(c)), keeping y, F's bits, the node's initial state and the batch
    norm's per-channel statistics (or, for a small gamma, its input c). Its backward reads gamma
    and beta from its inputs, not from the module (under FSDP2 the module's are shards then)."""

    @staticmethod
    def forward(ctx, node, bn, n_state: int, need: Sequence[str], c: Tensor, *rest):
        state0 = tuple(rest[:n_state]) or None
        *params, gamma, beta = rest[n_state:]  # the node's, the batch norm's (None without affine)
        P = dict(zip(node._param_attr, params))
        # before bn runs: under FSDP2 its forward hook frees the unsharded gamma (run's docstring)
        keep_input = gamma is not None and bool((gamma.detach().abs() < GAMMA_MIN).any())
        with torch.no_grad():
            z = bn(c)  # the module's own forward: running statistics and all
            mean, invstd = statistics(c, bn.eps)
            backend = kernels.choose(z, node.spec, P)
            y, packed_f, kept, stateT = kernels.reversible_forward(backend, node.spec, z, state0, P, need)
        del z
        ctx.node, ctx.n_state, ctx.need, ctx.keep_input = node, n_state, tuple(need), keep_input
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y, packed_f, kept, mean, invstd, c if keep_input else c.new_empty(0),
                              *(state0 or ()), *params, gamma, beta)
        return (y, *stateT)

    @staticmethod
    def backward(ctx, gy: Optional[Tensor], *g_stateT):
        y, packed_f, kept, mean, invstd, c, *rest = ctx.saved_tensors
        node = ctx.node
        state0 = tuple(rest[: ctx.n_state]) or None
        *params, gamma, beta = rest[ctx.n_state:]
        P = dict(zip(node._param_attr, params))
        if gy is None:
            gy = torch.zeros_like(y)
        g_state = None if all(g is None for g in g_stateT) else tuple(
            g if g is not None else y.new_zeros(y.shape[1:]) for g in g_stateT)

        def normalized(sl, z: Tensor) -> Tensor:
            """x^ over a slice, in z's buffer: rebuilt from z, or from the kept input."""
            if ctx.keep_input:
                cs = sl(c)
                return torch.sub(cs, per_channel(mean, cs), out=z).mul_(per_channel(invstd, cs))
            if beta is not None:
                z.sub_(per_channel(beta, z))
            return z.div_(per_channel(gamma, z)) if gamma is not None else z

        if ctx.backend == "triton":
            from revpass.nodes.kernels import batchnorm as K

            gc, g0, gP, dgamma, dbeta = K.backward(node.spec, gy.contiguous(), g_state, y, packed_f, kept, state0,
                                                   P, ctx.need, gamma, beta, c if ctx.keep_input else None, mean,
                                                   invstd)
            return _grads(ctx, gc, g0, gP, dgamma, dbeta, state0, params)
        dims = [d for d in range(y.dim()) if d != 2]
        sums = []  # per slice: (sum gz, sum gz * x^) per channel
        spikes = []  # per slice, Y - X (0 or 1) packed 8 per byte

        def on_slice(sl, z, gz):  # the first pass: the node's gradient, its spikes and the sums
            spikes.append(bits.pack_bits(sl(y) - z > 0.5))
            xhat = normalized(sl, z)
            sums.append((gz.sum(dim=dims), (gz * xhat).sum(dim=dims)))

        min_elems = getattr(node, "slice_min_elems", None)
        gz, g0, gP = reversible.reversible_backward(node.spec, gy.contiguous(), g_state, y, packed_f, kept, state0,
                                                    P, ctx.need, on_slice=on_slice, min_elems=min_elems)
        M = y.numel() // y.shape[2]
        dbeta = sum(a for a, _ in sums)
        dgamma = sum(b for _, b in sums)
        scale = invstd if gamma is None else gamma * invstd
        # the second pass: x^ again, slice by slice, from X = Y - spikes (the same values the
        # first pass rebuilt), and the batch norm's input gradient written over the node's
        for sl, packed in zip(slicing.slices(y.shape, P, min_elems), spikes):
            ys, g = sl(y), sl(gz)
            z = torch.sub(ys, bits.unpack_bits(packed, ys.shape).to(ys.dtype))
            g.sub_(per_channel(dbeta / M, g)).addcmul_(normalized(sl, z), per_channel(-dgamma / M, g))
            g.mul_(per_channel(scale, g))
            del z
        return _grads(ctx, gz, g0, gP, dgamma, dbeta, state0, params)


def _grads(ctx, gc, g0, gP, dgamma, dbeta, state0, params):
    """The autograd Function's gradients, in the order of its inputs."""
    node = ctx.node
    g_state0 = [None] * ctx.n_state if g0 is None else [
        g if s.requires_grad else None for g, s in zip(g0, state0)]
    g_params = [gP[k].reshape(p.shape) if k in gP else None for k, p in zip(node._param_attr, params)]
    g_affine = [dgamma if ctx.needs_input_grad[-2] else None, dbeta if ctx.needs_input_grad[-1] else None]
    return (None, None, None, None, gc, *g_state0, *g_params, *g_affine)


class FoldedExact(torch.autograd.Function):
    """s, *final state = exact node(bn(c)), keeping the node's records H (one float per element
    and step), its initial state and the batch norm's per-channel statistics (for a small gamma,
    its input c too). The forward is the batch norm's and the exact node's own, bit for bit; the
    backward is the exact node's, then the batch norm's from z rebuilt step by step from H and
    the state before each step (Family.input_step: the charge solved for its input, within a
    rounding step of z), in two passes over the steps: with step-sized temporaries on the
    PyTorch path, in one kernel launched twice on the Triton one (kernels/batchnorm.py)."""

    @staticmethod
    def forward(ctx, node, bn, n_state: int, need: Sequence[str], c: Tensor, r: Optional[Tensor], *rest):
        state0 = tuple(rest[:n_state]) or None
        *params, gamma, beta = rest[n_state:]
        P = dict(zip(node._param_attr, params))
        keep_input = gamma is not None and bool((gamma.detach().abs() < GAMMA_MIN).any())
        with torch.no_grad():
            z = bn(c)
            if r is not None:
                z = z + r  # the model's own addition: bn(c) + r
            mean, invstd = statistics(c, bn.eps)
            backend = kernels.choose(z, node.spec, P)
            s, kept, stateT = kernels.exact_forward(backend, node.spec, z, state0, P, need)
        del z
        ctx.node, ctx.n_state, ctx.need, ctx.keep_input, ctx.backend = node, n_state, tuple(need), keep_input, backend
        ctx.set_materialize_grads(False)
        # the residual: spikes as bits (a block's input, 1 bit per element), anything else as it is
        ctx.residual = None if r is None else ("bits" if bits.is_binary(r) else "tensor")
        kept_r = c.new_empty(0) if r is None else (
            bits.pack_flat(r) if ctx.residual == "bits" else r)
        ctx.save_for_backward(kept, mean, invstd, c if keep_input else c.new_empty(0), kept_r,
                              *(state0 or ()), *params, gamma, beta)
        return (s, *stateT)

    @staticmethod
    def backward(ctx, gs: Optional[Tensor], *g_stateT):
        kept, mean, invstd, c, kept_r, *rest = ctx.saved_tensors
        node, spec = ctx.node, ctx.node.spec
        state0 = tuple(rest[: ctx.n_state]) or None
        *params, gamma, beta = rest[ctx.n_state:]
        P = dict(zip(node._param_attr, params))
        if gs is None:
            gs = kept.new_zeros(kept.shape[1:])
        g_state = None if all(g is None for g in g_stateT) else tuple(
            g if g is not None else gs.new_zeros(gs.shape[1:]) for g in g_stateT)
        gz, g0, gP = kernels.exact_backward(ctx.backend, spec, gs.contiguous(), g_state, kept, state0, P, ctx.need,
                                            node.slice_min_elems)
        g_r = gz.clone() if ctx.residual is not None and ctx.needs_input_grad[5] else None
        args = (spec, gz, kept, state0, P, gamma, beta, c if ctx.keep_input else None, mean, invstd,
                kept_r if ctx.residual is not None else None, ctx.residual == "bits")
        if ctx.backend == "triton":
            from revpass.nodes.kernels import batchnorm as K

            dgamma, dbeta = K.exact_backward(*args)
        else:
            dgamma, dbeta = _exact_bn_backward(*args, ctx.need, node.slice_min_elems)
        out = _grads(ctx, gz, g0, gP, dgamma, dbeta, state0, params)
        return (*out[:5], g_r, *out[5:])


def _exact_bn_backward(spec, gz: Tensor, kept: Tensor, state0, P, gamma: Optional[Tensor], beta: Optional[Tensor],
                       c: Optional[Tensor], mean: Tensor, invstd: Tensor, residual: Optional[Tensor],
                       residual_bits: bool, need: Sequence[str], min_elems: Optional[int]) -> Tuple[Tensor, Tensor]:
    """:class:`FoldedExact`'s batch-norm backward on the PyTorch path, as the kernel's
    (revpass.nodes.kernels.batchnorm.exact_backward, the same arguments) but for ``need`` (the
    node's parameters with gradients: what it keeps) and ``min_elems`` (the node's slicing):
    ``gz`` overwritten with the batch norm's input gradient; returns (dgamma, dbeta)."""
    fam = family_of(spec)
    keep = fam.exact_keep(spec, need)
    Pp = fam.prepare(spec, P)
    T = gz.shape[0]
    dims = [d for d in range(gz.dim()) if d != 2]  # all but channels
    # steps at a time: enough for min_elems elements per piece (one at a time where the
    # node sets the peak: convert gives it slicing.CHUNK_MIN_ELEMS_FINE), as the slices do
    step = gz[0].numel()
    n = max(1, min(T, (min_elems or slicing.CHUNK_MIN_ELEMS) // max(1, step)))
    pieces = [(t, min(T, t + n)) for t in range(0, T, n)]

    def normalized():
        """x^ of each piece of steps in turn: from z rebuilt from H, or from the kept input."""
        if c is not None:
            for a, b in pieces:
                yield (c[a:b] - per_channel(mean, c)).mul_(per_channel(invstd, c))
            return
        state = state0 if state0 is not None else init_state(spec, gz, P)
        for a, b in pieces:
            z, state = fam.input_steps(spec, {k: kept[i][a:b] for i, k in enumerate(keep)}, state, Pp)
            if residual is not None and not residual_bits:
                z.sub_(residual[a:b])  # the batch norm's output: the node's input less the residual
            elif residual is not None:
                z.sub_(bits.unpack_flat(residual, gz.shape, z.dtype, (a, b)))
            if beta is not None:
                z.sub_(per_channel(beta, z))  # z is the piece's own fresh tensor
            yield z.div_(per_channel(gamma, z)) if gamma is not None else z

    # one piece (the whole sequence): x^ is rebuilt once and serves both passes
    whole = list(normalized()) if len(pieces) == 1 else None
    dbeta = dgamma = 0  # summed in float64, as torch's batch-norm backward does on the CPU
    for (a, b), xhat in zip(pieces, whole or normalized()):
        dbeta = dbeta + gz[a:b].sum(dim=dims, dtype=torch.float64)
        dgamma = dgamma + (xhat * gz[a:b] if whole else xhat.mul_(gz[a:b])).sum(dim=dims, dtype=torch.float64)
    dbeta, dgamma = dbeta.to(gz.dtype), dgamma.to(gz.dtype)
    M = gz.numel() // gz.shape[2]
    scale = invstd if gamma is None else gamma * invstd
    for (a, b), xhat in zip(pieces, whole or normalized()):  # the batch norm's input gradient, over dL/dz
        g = gz[a:b]
        g.sub_(per_channel(dbeta / M, g)).addcmul_(xhat, per_channel(-dgamma / M, g))
        g.mul_(per_channel(scale, g))
    return dgamma, dbeta
