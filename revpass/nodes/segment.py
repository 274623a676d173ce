"""A recomputed segment: layers between spiking neurons, run without keeping their activations.

:class:`RecomputeSegment` runs a piece of a converted graph (for example conv -> batch norm ->
exact neuron node) under ``no_grad`` in the forward and keeps only its inputs: an input whose
values are all 0 or 1 (spikes, and what pooling or indexing makes of them) is kept as packed
bits, 1 bit per element instead of 32; any other input is kept as it is. The backward rebuilds
the segment's activations by running it again under autograd and differentiates that: gradient
checkpointing with spike compression, as SpikingJelly's memopt does, with the segments found from
the graph (revpass/passes/segments.py) rather than by module type.

The recomputation sees what the forward saw:

* revpass nodes inside start from the state they started from in the forward, and after it get
  back whatever state they hold when the backward runs (a ``reset_net`` in between is kept);
* buffers of the segment's modules (batch norm's running statistics) are restored after the
  recomputation, which would otherwise update them twice;
* the random number generator is replayed (dropout draws the same mask).

The segment's modules stay where they were in the model (state_dict keys do not change): the
segment holds its graph outside the module tree.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from revpass.nodes import chunks
from revpass.nodes.bits import is_binary, pack_flat
from revpass.nodes.modules import Node

Tensor = torch.Tensor


class RecomputeSegment(nn.Module):
    """Runs ``body`` (a GraphModule over modules of the converted model) as one recomputed node."""

    kind = "recompute"

    def __init__(self, body: fx.GraphModule, name: str = "", sites: Tuple[str, ...] = ()):
        super().__init__()
        object.__setattr__(self, "_body", body)  # not a child: its modules belong to the model
        self.name = name
        self.sites = tuple(sites)
        self.plain = False  # run the layers as they are, nothing saved (revpass.export_onnx sets it)
        #: the rebuild a chunk of the batch at a time (revpass/nodes/chunks.py): its plan, set by
        #: :meth:`try_chunks` where the chunks reproduce the forward; elements of the largest value
        #: per sample and the steps they were counted over (the example inputs'); whether a chunk
        #: may also be a part of a sample's steps; elements per chunk (None: chunks.CHUNK_ELEMS
        #: for the device)
        self.chunking: Optional[chunks.Plan] = None
        self.sample_elems = 0
        self.sample_steps = 1
        self.in_time = False
        self.chunk_elems: Optional[int] = None
        #: bytes of the states its neurons carry after a forward (one step of each one's output),
        #: measured when formed; None: not known (estimated from its output)
        self.state_bytes: Optional[int] = None
        self.whole_rebuilds = 0  # backwards rebuilt whole because a chunk's spikes differed

    @property
    def body(self) -> fx.GraphModule:
        return self._body

    def _stateful(self) -> List[nn.Module]:
        return [m for m in self._body.modules() if isinstance(m, Node)]

    def forward(self, *inputs):
        if self.plain or not torch.is_grad_enabled():
            return self._body(*inputs)
        params = [p for p in self._body.parameters() if p.requires_grad]
        return _Recompute.apply(self, len(inputs), *inputs, *params)

    def extra_repr(self) -> str:
        names = [n.target for n in self._body.graph.nodes if n.op == "call_module"]
        what = ""
        if self.chunking is not None and self.chunk_elems:
            per, steps = self.chunk_shape(self.sample_steps, max(1, self.chunk_elems // self.sample_elems))
            what = f", {per} samples a chunk at most" + (
                f" ({steps} of {self.sample_steps} steps of one)" if steps < self.sample_steps else "")
        return f"recomputes {' -> '.join(map(str, names))}" + what

    def try_chunks(self, inputs: Sequence[Any], sample_elems: int,
                   checked: Optional[Tuple[Optional[str], bool]] = None) -> Optional[str]:
        """Let the backward rebuild a chunk of the batch at a time if, on these (example)
        inputs, the chunks give the forward's output bit for bit; returns why not (None: it does).
        ``checked``: (why, in time too) as an earlier check of the same layers on the same
        inputs found (the planner's conversions), taken instead of checking again."""
        try:
            plan = chunks.Plan(self._body)
        except chunks.Unchunkable as e:
            return str(e)
        if checked is not None:
            why, in_time = checked
        else:
            why = chunks.check(plan, inputs, 1)  # every sample alone
            # and a step at a time (on one sample: the layers act on each step alone or not at
            # all; the backward compares each chunk's spikes with the forward's anyway)
            in_time = (why is None and plan.why_not_in_time is None
                       and chunks.check(plan, inputs, 1, 1, samples=1) is None)
        if why is None:
            self.chunking, self.sample_elems, self.in_time = plan, max(1, int(sample_elems)), in_time
            T, B = next(x.shape[:2] for x in inputs if isinstance(x, Tensor) and x.dim() >= 2)
            self.sample_steps = max(1, T)
            self.chunk_elems = B * self.sample_elems  # unchunked until chosen (refine_where_it_sets_the_peak)
        return why

    @property
    def step_elems(self) -> int:
        """Elements of the largest value per sample and step."""
        return max(1, self.sample_elems // self.sample_steps)

    def chunk_shape(self, T: int, B: int, elems: Optional[int] = None) -> Tuple[int, int]:
        """(samples, steps) of each chunk the backward rebuilds for a (T, B, ...) sequence, its
        largest value at most ``elems`` elements a chunk (default: :attr:`chunk_elems`); (B, T):
        unchunked. A chunk is a part of one sample's steps only where it must be, to fit."""
        if self.chunking is None:
            return B, T
        elems = elems or self.chunk_elems or chunks.CHUNK_ELEMS["cuda"]
        step = self.step_elems
        per = max(1, min(B, elems // (step * T)))
        steps = max(1, min(T, elems // step)) if per == 1 and self.in_time else T
        return per, steps

    def chunk_elems_of(self, per: int, steps: int) -> int:
        """The :attr:`chunk_elems` whose chunks are ``per`` samples (``steps`` of the example's steps)."""
        step = self.step_elems
        return per * step * (steps if per == 1 and steps < self.sample_steps else self.sample_steps)

    def samples_per_chunk(self, x: Tensor) -> int:
        """Samples of each chunk the backward rebuilds for a batch like ``x``'s (all: unchunked)."""
        return self._shape_for(x)[0]

    def _shape_for(self, x: Tensor) -> Tuple[int, int]:
        if x.dim() < 2:
            return 1, 1
        elems = None if self.chunk_elems else chunks.CHUNK_ELEMS.get(x.device.type, chunks.CHUNK_ELEMS["cuda"])
        return self.chunk_shape(x.shape[0], x.shape[1], elems)


def _rng_state(inputs) -> Tuple[Tensor, Optional[Tuple[int, Tensor]]]:
    dev = next((x.device for x in inputs if isinstance(x, Tensor) and x.device.type == "cuda"), None)
    cuda = (dev, torch.cuda.get_rng_state(dev)) if dev is not None else None
    return torch.get_rng_state(), cuda


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seg: RecomputeSegment, n_in: int, *args):
        inputs = args[:n_in]
        ctx.seg, ctx.n_in = seg, n_in
        ctx.states = {m: m.state for m in seg._stateful()}
        ctx.rng = _rng_state(inputs)
        ctx.per, stats, spikes = _chunked(seg, inputs), {}, {}
        hooks = chunks.forward_hooks(seg.chunking, stats, spikes) if ctx.per else []
        try:
            with torch.no_grad():  # on detached inputs: a view of an input would still require grad
                out = seg._body(*(x.detach() if isinstance(x, Tensor) else x for x in inputs))
        finally:
            for h in hooks:
                h.remove()
        if ctx.per and any(s is None for s in spikes.values()):
            ctx.per = None  # a neuron's output is not spikes of 0 and 1: nothing to check a chunk by
        if not isinstance(out, Tensor):
            raise TypeError(f"{seg.name}: a recomputed segment must return one tensor, got {type(out).__name__}")
        saved, layout = [], []
        for x in inputs:
            if not isinstance(x, Tensor):
                if any(isinstance(t, Tensor) for t in tree_leaves(x)):
                    raise TypeError(f"{seg.name}: input {type(x).__name__} holds tensors; a recomputed "
                                    "segment takes tensors (gradients could not reach these)")
                layout.append(("value", x))
            elif is_binary(x):
                saved.append(pack_flat(x))
                layout.append(("bits", (tuple(x.shape), x.dtype)))
            else:
                saved.append(x)
                layout.append(("tensor", None))
        ctx.layout = layout
        if ctx.per:  # the batch norms' statistics and the neurons' spikes, for the chunks
            plan = seg.chunking
            ctx.n_bns, ctx.n_spikes = len(plan.bns), len(plan.neurons)
            saved += [t for n in plan.bns for t in stats[n]] + [spikes[n] for n in plan.neurons]
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        seg, n_in = ctx.seg, ctx.n_in
        saved = iter(ctx.saved_tensors)
        if ctx.per:
            plan = seg.chunking
            tail = ctx.saved_tensors[len(ctx.saved_tensors) - 2 * ctx.n_bns - ctx.n_spikes:]
            stats = {n: (tail[2 * k], tail[2 * k + 1]) for k, n in enumerate(plan.bns)}
            spikes = dict(zip(plan.neurons, tail[2 * ctx.n_bns:]))
        inputs: List[Any] = []
        for how, info in ctx.layout:
            if how == "value":
                inputs.append(info)
            elif how == "bits":  # unpacked a chunk at a time where the rebuild runs in chunks
                shape, dtype = info
                packed = chunks.Packed(next(saved), shape, dtype)
                inputs.append(packed if ctx.per else packed.whole())
            else:
                inputs.append(next(saved).detach())
        wants = [i for i in range(n_in) if ctx.needs_input_grad[2 + i]
                 and isinstance(inputs[i], (Tensor, chunks.Packed))]
        params = [p for p in seg._body.parameters() if p.requires_grad]
        p_wants = [j for j in range(len(params)) if ctx.needs_input_grad[2 + n_in + j]]
        now = {m: m.state for m in ctx.states}
        buffers = [(b, b.clone()) for b in seg._body.buffers()]
        try:
            grads = None
            if ctx.per:
                got = chunks.backward(plan, inputs, wants, [params[j] for j in p_wants], grad_out, stats, spikes,
                                      ctx.states, *ctx.per)
                if got is not None:
                    grads = [got[0][i] for i in wants] + got[1]
                else:
                    seg.whole_rebuilds += 1  # a chunk's spikes differed from the forward's
                    if seg.whole_rebuilds == 1:
                        warnings.warn(
                            f"revpass: recomputed segment {seg.name or '(unnamed)'}: a chunk's rebuilt spikes "
                            "differ from the forward's (a layer over fewer samples rounded otherwise, and a "
                            "membrane within a rounding step of the threshold fired otherwise), so its backward "
                            "was rebuilt whole: the same gradients, with the memory of an unchunked rebuild "
                            "for this step (docs/method.md section 13). RecomputeSegment.whole_rebuilds counts "
                            "these; this warning is given once per segment.", RuntimeWarning, stacklevel=2)
                    inputs = [x.whole() if isinstance(x, chunks.Packed) else x for x in inputs]
            if grads is None:
                grads = _rebuild_whole(ctx, seg, inputs, wants, params, p_wants, grad_out)
        finally:  # the buffers after the grad: batch norm's backward reads its running statistics
            for m, s in now.items():
                m.state = s
            with torch.no_grad():
                for b, v in buffers:
                    b.copy_(v)
        result: List[Optional[Tensor]] = [None] * (n_in + len(params))
        for k, i in enumerate(wants):
            result[i] = grads[k]
        for k, j in enumerate(p_wants):
            result[n_in + j] = grads[len(wants) + k]
        return (None, None, *result)



def _chunked(seg: RecomputeSegment, inputs) -> Optional[Tuple[int, Optional[int]]]:
    """(samples, steps or None: all) per chunk for this call's backward (revpass/nodes/chunks.py);
    None: rebuilt whole."""
    plan = seg.chunking
    if plan is None:
        return None
    xs = [x for x in inputs if isinstance(x, Tensor)]
    if not xs or xs[0].dim() < 2 or any(x.dim() < 2 or x.shape[:2] != xs[0].shape[:2] for x in xs):
        return None
    if not all(bn.training for bn in plan.modules(plan.bns)):
        return None  # a batch norm in eval mode: running statistics, no batch sums to take
    T, B = xs[0].shape[:2]
    per, steps = seg._shape_for(xs[0])
    return (per, steps if steps < T else None) if per < B or steps < T else None


def _rebuild_whole(ctx, seg: RecomputeSegment, inputs, wants, params, p_wants, grad_out) -> List[Optional[Tensor]]:
    """The segment rebuilt whole under autograd (the random number generator replayed) and
    differentiated: the gradients of inputs[wants] and params[p_wants]."""
    for i in wants:
        inputs[i].requires_grad_(True)
    cpu_rng, cuda_rng = ctx.rng
    devices = [cuda_rng[0]] if cuda_rng is not None else []
    targets = [inputs[i] for i in wants] + [params[j] for j in p_wants]
    for m, s in ctx.states.items():
        m.state = s
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng[1], cuda_rng[0])
        kept = set()  # the storages the rebuilt graph saves for its backward

        def pack(t):
            kept.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = seg._body(*inputs)
    if out.grad_fn is not None and out.untyped_storage().data_ptr() not in kept:
        # the rebuilt output's values are not needed, only its graph: free them now
        # rather than while the segment's gradients are computed (one output's worth)
        out.untyped_storage().resize_(0)
    return list(torch.autograd.grad(out, targets, grad_out, allow_unused=True)) if targets else []
