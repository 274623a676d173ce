"""A recomputed segment's backward, a chunk of the batch at a time (docs/method.md section 13).

A recomputed segment (revpass/nodes/segment.py) rebuilds its layers in backward to differentiate
them: rebuilt whole, that holds the segment's largest activations over the whole batch and every
step at once, which is what sets the peak of a fully recomputed model (the stem's convolution,
batch norm and neuron). The samples of a batch are independent of each other except through a
training batch norm's statistics, so the rebuild can run a chunk of samples at a time, given:

* the batch norms' per-channel mean and 1/std, kept from the forward (a few floats per channel:
  the kernel's own, with which the chunk's formula rounds as the kernel did on the CPU).
  In a chunk each batch norm is then an elementwise affine map of its input; the batch coupling
  is its backward's two sums per channel, sum(gz) and sum(gz * x^), over the whole batch. So the
  rebuild runs in two passes: the first differentiates every chunk only as far as the batch
  norms' outputs, to sum those; the second differentiates every chunk whole, with the batch
  norms' input gradient gamma/std * (gz - sum(gz)/M - x^ sum(gz x^)/M) from the summed totals
  (torch's batch-norm backward, its sums taken over chunks, in float64). Where batch norms follow
  one another (a joined segment), each level of them takes a pass of its own, the deepest first,
  before the last pass;
* the neurons' spikes, kept from the forward as bits. A chunk's layers need not round exactly as
  the whole batch's did (a convolution may pick another algorithm for fewer samples, and the
  chunk's batch norm is a formula, not the module's kernel), and a membrane within a rounding
  step of the threshold could then spike differently than in the forward. Each chunk's rebuilt
  spikes are compared with the forward's; if any differs, the segment is rebuilt whole instead,
  as an unchunked segment is (the same function, more memory, once).

Which segments can: every value a ``(T, B, ...)`` sequence (SpikingJelly's multi-step layout, the
batch on dim 1), and the chunked rebuild
giving, on the example inputs at conversion, the forward's output bit for bit (an operation that
mixes samples, or draws random numbers, fails that and leaves the segment unchunked).
"""

from __future__ import annotations

import contextlib
import math
import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from revpass.neurons import multi_step_batch_norm
from revpass.nodes.batchnorm import per_channel, statistics
from revpass.nodes.bits import is_binary, pack_planes, unpack_bits, unpack_flat
from revpass.nodes.modules import Node

Tensor = torch.Tensor

#: the least elements a chunk of the segment's largest value holds, by device type (a chunk is at
#: least one step of one sample): smaller chunks cost more in launches and passes than they save
#: (a GPU runs few large chunks faster). Also the chunk where the conversion did not choose
#: (RecomputeSegment.chunk_elems None); a segment whose whole batch fits runs unchunked
CHUNK_ELEMS = {"cpu": 1 << 12, "cuda": 1 << 22}
#: the most chunks a segment's backward is rebuilt in (samples times parts of their steps)
CHUNKS_MAX = 32


class Unchunkable(ValueError):
    """This segment cannot rebuild a chunk of the batch at a time (the message says why)."""


class Plan:
    """How ``body`` runs a chunk of the batch: its batch norms, and what feeds them."""

    def __init__(self, body: fx.GraphModule):
        self.body = body
        nodes = list(body.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        self.result = next(n for n in nodes if n.op == "output").args[0]
        if not isinstance(self.result, fx.Node):
            raise Unchunkable("the segment returns more than one value")
        mods = dict(body.named_modules())
        self.bns = [n for n in nodes if n.op == "call_module" and multi_step_batch_norm(mods[n.target])]
        self.order = [n for n in nodes if n.op not in ("placeholder", "output")]
        # a batch norm's level: 1 + the most levels of batch norms upstream of it. The rebuild takes
        # one pass per level, the deepest first: a level's sums need the gradient of its outputs,
        # through the batch norms after it, whose sums the passes before have found
        level: Dict[fx.Node, int] = {}
        for n in nodes:
            below = max((level[a] for a in n.all_input_nodes if a in level), default=0)
            if n in self.bns:
                level[n] = below + 1
            elif below:
                level[n] = below  # the deepest batch norm upstream of n, carried along
        self.levels: List[List[fx.Node]] = [[b for b in self.bns if level[b] == k]
                                            for k in range(1, max((level[b] for b in self.bns), default=0) + 1)]
        #: per level (deepest last): the nodes upstream of its batch norms (rebuilt without
        #: gradients in its pass) and the rest
        self.upstream_of: List[List[fx.Node]] = []
        self.rest_of: List[List[fx.Node]] = []
        for bns in self.levels:
            upstream = set()
            stack = [a for n in bns for a in n.all_input_nodes]
            while stack:
                u = stack.pop()
                if u.op == "placeholder" or u in upstream:
                    continue
                upstream.add(u)
                stack.extend(u.all_input_nodes)
            self.upstream_of.append([n for n in self.order if n in upstream])
            self.rest_of.append([n for n in self.order if n not in upstream])
        self.neurons = [n for n in nodes if n.op == "call_module" and isinstance(mods[n.target], Node)]
        if not self.neurons:
            raise Unchunkable("no neuron in the segment")
        targets = [n.target for n in self.bns + self.neurons]
        if len(set(targets)) < len(targets):
            raise Unchunkable("a batch norm or neuron is called more than once")
        if any(m.folded_bn is not None for m in self.modules(self.neurons)):
            raise Unchunkable("a batch norm is folded into a neuron (it would take a chunk's statistics)")
        #: why the rebuild cannot also run a chunk of the time steps at a time (None: it can, if
        #: :func:`check` finds it reproduces the forward): each neuron must carry its state from
        #: one call to the next, the states at the chunks' boundaries being what links them
        self.why_not_in_time: Optional[str] = None
        for n, m in zip(self.neurons, self.modules(self.neurons)):
            if not m.carry_state or m.step_mode != "m" or len(n.args) != 1 or n.kwargs:
                self.why_not_in_time = f"{n.target} does not carry its state from one call to the next"
                break

    def modules(self, nodes) -> List[nn.Module]:
        return [self.body.get_submodule(n.target) for n in nodes]


def _run(body: fx.GraphModule, nodes: Sequence[fx.Node], env: Dict[fx.Node, Any], bn=None, seen=None,
         result: Optional[fx.Node] = None) -> None:
    """Run ``nodes`` of ``body`` into ``env``: ``bn(node, x)`` stands in for the batch norms,
    ``seen(node, value)`` is called with each value, and a value is dropped from ``env`` once
    every reader has run (``result`` is kept), as the body's own forward drops it."""
    for n in nodes:
        args = fx.node.map_arg(n.args, env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "call_module":
            m = body.get_submodule(n.target)
            env[n] = bn(n, *args) if bn is not None and multi_step_batch_norm(m) else m(*args, **kwargs)
        elif n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        elif n.op == "get_attr":
            env[n] = operator.attrgetter(n.target)(body)
        else:
            raise Unchunkable(f"cannot run {n.op} {n.target}")
        del args, kwargs
        if seen is not None:
            seen(n, env[n])
        for a in n.all_input_nodes:
            if a is not result and a in env and all(u in env or u.op == "output" for u in a.users):
                del env[a]


class Packed:
    """A (T, B, ...) input of 0s and 1s kept as one row of bits (revpass.nodes.bits.pack_flat),
    unpacked a chunk at a time: whole, it would be as large as the activation chunks avoid."""

    def __init__(self, packed: Tensor, shape, dtype: torch.dtype):
        self.packed, self.shape, self.dtype = packed, tuple(shape), dtype

    def whole(self) -> Tensor:
        return unpack_flat(self.packed, self.shape, self.dtype)

    def block(self, a: int, b: int, t0: int, t1: int) -> Tensor:
        """Samples a:b of steps t0:t1."""
        T, B = self.shape[:2]
        if b - a == B:
            return unpack_flat(self.packed, self.shape, self.dtype, (t0, t1))
        row = math.prod(self.shape[2:])  # elements of a sample's step
        if row % 8 == 0:  # each sample's step starts on a byte: one block of bytes
            part = self.packed.reshape(T, B, row // 8)[t0:t1, a:b]
            return unpack_bits(part.reshape(1, -1), (1, part.numel() * 8)).reshape(
                (t1 - t0, b - a, *self.shape[2:])).to(self.dtype)
        out = torch.empty((t1 - t0, b - a, *self.shape[2:]), dtype=self.dtype, device=self.packed.device)
        for t in range(t0, t1):  # samples a:b of a step: one run of bits
            out[t - t0] = unpack_flat(self.packed, (T * B, *self.shape[2:]), self.dtype, (t * B + a, t * B + b))
        return out

    def new_zeros(self, shape) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.packed.device)


def _batched(v: Any, B: int) -> bool:
    return isinstance(v, Packed) or isinstance(v, Tensor) and v.dim() >= 2 and v.shape[1] == B


def _slice(v: Any, B: int, a: int, b: int, t0: int = 0, t1: Optional[int] = None) -> Any:
    if isinstance(v, Packed):
        return v.block(a, b, t0, v.shape[0] if t1 is None else t1)
    return v[t0:t1, a:b] if _batched(v, B) else v


def _state_slice(state, B: int, a: int, b: int):
    """A node's carried state (tensors (B, ...) or broadcast ones) for samples a:b."""
    if state is None:
        return None
    return tuple(s[a:b] if isinstance(s, Tensor) and s.dim() >= 1 and s.shape[0] == B else s for s in state)


def chunks_of(B: int, per: int) -> List[Tuple[int, int]]:
    return [(a, min(B, a + per)) for a in range(0, B, per)]


class _Differs(Exception):
    """A chunk's rebuilt spikes differ from the forward's."""


#: whether a chunk whose rebuilt spikes differ from the forward's makes the segment rebuild whole
#: (False only inside :func:`measuring`)
_FALL_BACK = [True]
#: inside :func:`measuring`, whether each part of samples after the first runs only its first
#: time chunk of each pass (a test runs them all to hold the figures equal)
BRIEF_PARTS = True


@contextlib.contextmanager
def measuring():
    """Within it, a chunk whose spikes differ from the forward's is differentiated as it is, not
    rebuilt whole (its spikes are still compared, which takes the same memory): what a chunked
    rebuild allocates, measured on random inputs (revpass/analysis/workspace.py), is the chunks'
    and not a fallback's, however those inputs round (a convolution over fewer samples may round
    differently, and a membrane within a rounding step of the threshold then fires otherwise).
    And each part of samples after the first runs only the first of its time chunks in each pass
    (:data:`BRIEF_PARTS`): its later chunks allocate what the first part's did, with the same
    sums carried from chunk to chunk; its first differs from the first part's only by the sums
    carried from that part (the parameters' gradients, the batch norms' sums). The figure is the
    whole run's, at a part's chunks less."""
    _FALL_BACK.append(False)
    try:
        yield
    finally:
        _FALL_BACK.pop()


class _Sums:
    """A batch norm's backward sums over the whole batch: filled by the first pass, read by the second."""

    def __init__(self, M: int):
        self.M = M
        self.dbeta: Any = 0
        self.dgamma: Any = 0
        self.totals: Optional[Tuple[Tensor, Tensor]] = None
        self.given = False  # dgamma and dbeta handed to autograd (once, by the first chunk)
        self.collecting = False  # its level's pass runs: its backward adds to the sums


class _Normalize(torch.autograd.Function):
    """A chunk of a training batch norm with the whole batch's statistics: z = x^ gamma + beta."""

    @staticmethod
    def forward(ctx, x, mean, invstd, gamma, beta, sums: _Sums):
        a = invstd if gamma is None else invstd * gamma
        shift = -mean * a if beta is None else beta - mean * a
        ctx.save_for_backward(x, mean, invstd, gamma)
        ctx.sums, ctx.affine = sums, (gamma is not None, beta is not None)
        return torch.addcmul(per_channel(shift, x), x, per_channel(a, x))  # as torch's CPU kernel rounds

    @staticmethod
    def backward(ctx, gz):
        x, mean, invstd, gamma = ctx.saved_tensors
        sums = ctx.sums
        dims = [d for d in range(x.dim()) if d != 2]
        centred = x - per_channel(mean, x)  # the one chunk-sized temporary
        if sums.totals is None:  # its level's pass: the sums, nothing else
            if not sums.collecting:  # a deeper level's pass, where its gradient is not wanted
                return gz, None, None, None, None, None
            sums.dbeta = sums.dbeta + gz.sum(dim=dims, dtype=torch.float64)
            sums.dgamma = sums.dgamma + centred.mul_(gz).sum(dim=dims, dtype=torch.float64) * invstd
            return gz, None, None, None, None, None
        dbeta, dgamma = sums.totals
        scale = invstd if gamma is None else gamma * invstd
        # gamma/std (gz - dbeta/M - x^ dgamma/M), x^ = (x - mean)/std, in the temporary's buffer
        gx = centred.mul_(per_channel(-dgamma / sums.M * invstd, x)).add_(gz).sub_(per_channel(dbeta / sums.M, x))
        gx.mul_(per_channel(scale, x))
        first, sums.given = not sums.given, True
        has_gamma, has_beta = ctx.affine
        return (gx, None, None, dgamma if first and has_gamma else None, dbeta if first and has_beta else None,
                None)


class _KernelStatistics(TorchDispatchMode):
    """Keeps the per-channel mean and 1/std a batch-norm kernel computed (its second and third
    outputs), in ``got``: a chunk normalizes with these, and with them the elementwise formula
    is the kernel's output bit for bit on the CPU, where statistics found again (torch.var_mean)
    differ in the last bit of some channels, which moves a membrane near the threshold across
    it, and the chunk's spikes then differ from the forward's."""

    OPS = frozenset(getattr(getattr(torch.ops.aten, name), overload) for name, overload in (
        ("native_batch_norm", "default"), ("_native_batch_norm_legit", "default"),
        ("_native_batch_norm_legit", "no_stats"), ("_batch_norm_with_update", "default"),
        ("cudnn_batch_norm", "default"), ("miopen_batch_norm", "default")))

    def __init__(self):
        super().__init__()
        self.got: Optional[Tuple[Tensor, Tensor]] = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.OPS and out[1].numel() and out[1].shape == out[2].shape:
            self.got = (out[1], out[2])
        return out


def forward_hooks(plan: Plan, stats: Dict[fx.Node, Tuple[Tensor, Tensor]], spikes: Dict[fx.Node, Optional[Tensor]]):
    """Hooks that, while the segment's forward runs, keep each batch norm's statistics (the
    kernel's own, :class:`_KernelStatistics`; found again where no kernel gives them) and each
    neuron's spikes as bits (None where they are not all 0 or 1); returns their handles."""
    handles = []
    for n in plan.bns:
        bn = plan.body.get_submodule(n.target)
        watching: List[_KernelStatistics] = []

        def pre(m, args, watching=watching):
            watching.append(_KernelStatistics())
            watching[-1].__enter__()

        def post(m, args, out, n=n, watching=watching):  # also where the forward raised
            mode = watching.pop()
            mode.__exit__(None, None, None)
            got = mode.got
            if got is not None and args and got[0].shape == (args[0].shape[2],) and got[0].dtype == args[0].dtype:
                stats[n] = got
            elif args:
                stats[n] = statistics(args[0], m.eps)

        handles.append(bn.register_forward_pre_hook(pre))
        handles.append(bn.register_forward_hook(post, always_call=True))
    for n in plan.neurons:
        def post(m, args, out, n=n):
            spikes[n] = pack_planes(out != 0) if isinstance(out, Tensor) and out.dim() >= 2 and is_binary(out) else None

        handles.append(plan.body.get_submodule(n.target).register_forward_hook(post))
    return handles


def _as_leaves(state):
    """A neuron's state (a tuple), its floating-point tensors as new leaves requiring grad."""
    return tuple(t.detach().requires_grad_(True) if isinstance(t, Tensor) and t.is_floating_point() else t
                 for t in state)


def _halves(lo: int, hi: int, start, run):
    """Yields (k, the state at part k's start) for parts lo..hi-1, the last first, from the
    state at part lo's start: ``run(lo, mid, start)`` gives the state at part mid's start. A
    function of the module, not a closure of :func:`backward`: a closure that calls itself is a
    reference cycle, which would hold the backward's inputs (a segment's kept bits) until the
    garbage collector runs."""
    if hi - lo == 1:
        yield lo, start
        return
    mid = (lo + hi) // 2
    yield from _halves(mid, hi, run(lo, mid, start), run)
    yield from _halves(lo, mid, start, run)


def backward(plan: Plan, inputs: List[Any], wants: Sequence[int], params: Sequence[Tensor],
             grad_out: Tensor, stats, spikes, states0: Dict[nn.Module, Any], per: int, steps: Optional[int] = None
             ) -> Optional[Tuple[List[Optional[Tensor]], List[Optional[Tensor]]]]:
    """The segment's gradients (of ``inputs[i]`` for i in ``wants``, and of ``params``), rebuilt
    ``per`` samples at a time and, of each, ``steps`` time steps at a time (None: all); None when
    a chunk's spikes differ from the forward's (the caller then rebuilds the segment whole).

    In time, a sample chunk's steps are differentiated from the last chunk to the first: the
    neurons' states at each chunk's start are rebuilt by running the chunks before it without
    gradients (they are a step of one chunk of samples each), a chunk starts from them as
    leaves, and their gradients are the gradients of the previous chunk's final states."""
    if any(s is None for s in spikes.values()):
        return None
    T, B = grad_out.shape[:2]
    parts, times = chunks_of(B, per), chunks_of(T, steps or T)
    body = plan.body
    sums: Dict[fx.Node, _Sums] = {}
    neurons = set(plan.neurons)
    nodes = list(states0)

    def chunk_inputs(a: int, b: int, t0: int, t1: int, leaves: bool):
        env, leaf = {}, []
        for i, (p, x) in enumerate(zip(plan.placeholders, inputs)):
            v = _slice(x, B, a, b, t0, t1)
            if leaves and i in wants:
                v = v.detach().requires_grad_(True)
                leaf.append(v)
            env[p] = v
        return env, leaf

    def normalize(n, x):
        mean, invstd = stats[n]
        bn = body.get_submodule(n.target)
        if n not in sums:  # elements per channel over the whole batch and every step
            sums[n] = _Sums(x.numel() // x.shape[2] // x.shape[1] // x.shape[0] * B * T)
            sums[n].collecting = n in collecting
        return _Normalize.apply(x, mean, invstd, bn.weight, bn.bias, sums[n])

    def same_spikes(a: int, b: int, t0: int, t1: int):
        def seen(n, y):
            if n in neurons:
                kept = spikes[n].reshape(T, B, -1)[t0:t1, a:b].reshape(t1 - t0, -1)
                if not torch.equal(pack_planes(y.detach() != 0), kept):
                    if _FALL_BACK[-1]:
                        raise _Differs(n.name)

        return seen

    def starts(a: int, b: int):
        """Yields (k, the neurons' states at time part k's start) for samples a:b, from the last
        part to the first. The starts are rebuilt without gradients by bisection: a range's
        second half is done from the state at its middle, run from the range's start, before the
        first half, so that one state per level of halving is held at once (not one per part:
        at one step a part, those states are as large as a part's activations)."""
        for m, s in states0.items():
            m.state = _state_slice(s, B, a, b)

        def run(lo: int, hi: int, start):  # the states after parts lo..hi-1, from ``start``
            for m in nodes:
                m.state = start[m]
            with torch.no_grad():
                for t0, t1 in times[lo:hi]:
                    env, _ = chunk_inputs(a, b, t0, t1, leaves=False)
                    _run(body, plan.order, env, bn=normalize, result=plan.result)
            return {m: m.state for m in nodes}

        yield from _halves(0, len(times), {m: m.state for m in nodes}, run)

    def through_time(a: int, b: int, level: Optional[int]):
        """Differentiates samples a:b a time chunk at a time, from the last; yields each chunk's
        (t0, t1, gradients of its targets): in a level's pass, of that level's batch norms' inputs
        (their sums are what it is for); in the last (``level`` None), of the inputs in ``wants``
        and the parameters."""
        first = level is not None
        carried: Dict[nn.Module, Any] = {}
        for k, start in starts(a, b):
            t0, t1 = times[k]
            env, leaf = chunk_inputs(a, b, t0, t1, leaves=not first)
            # the states this chunk starts from, as leaves (the first chunk's are given); no loop
            # variable of this frame may hold a tensor past its use: the frame lives on while the
            # next chunk runs (a comprehension's variables are its own)
            held = {m: _as_leaves(start[m]) for m in nodes if k and start[m] is not None}
            for m in nodes:
                m.state = held.get(m, start[m])
            with torch.enable_grad():
                try:
                    if first:
                        # the deepest level's pass (the first) compares every neuron's spikes
                        seen = same_spikes(a, b, t0, t1) if level == len(plan.levels) - 1 else None
                        with torch.no_grad():
                            _run(body, plan.upstream_of[level], env, bn=normalize, seen=seen)
                        targets = []
                        for n in plan.levels[level]:  # its batch norms' inputs, as leaves the pass differentiates to
                            targets.append(env[n.args[0]].detach().requires_grad_(True))
                            env[n.args[0]] = targets[-1]
                        _run(body, plan.rest_of[level], env, bn=normalize, seen=seen, result=plan.result)
                    else:
                        # the first pass compared every neuron's spikes, and this pass computes
                        # them again the same way
                        _run(body, plan.order, env, bn=normalize, result=plan.result,
                             seen=None if plan.bns else same_spikes(a, b, t0, t1))
                        targets = [*leaf, *params]
                except _Differs:
                    yield None
                    return
                # this chunk's final states, with their gradients (from the chunk after it)
                finals = [(t, g) for m, gs in carried.items() for t, g in zip(m.state or (), gs)
                          if g is not None and isinstance(t, Tensor) and t.requires_grad]
                outs = [env.pop(plan.result), *(t for t, _ in finals)]
                gouts = [grad_out[t0:t1, a:b], *(g for _, g in finals)]
                del finals
                flat = [t for s in held.values() for t in s if isinstance(t, Tensor) and t.requires_grad]
                got = torch.autograd.grad(outs, [*targets, *flat], gouts, allow_unused=True)
            del env, outs, gouts
            state_grads = iter(got[len(targets):])
            carried = {m: tuple(next(state_grads) if isinstance(t, Tensor) and t.requires_grad else None for t in s)
                       for m, s in held.items()}
            # nothing of this chunk outlives its gradients but the carried ones: not its inputs,
            # start or final states while the next chunk's start is rebuilt and it runs (each
            # as large as the chunk's activations; the segment's backward restores the states)
            result = () if first else got[:len(targets)]  # the first pass wants its sums only
            for m in nodes:
                m.state = None
            del got, leaf, targets, held, flat, start, state_grads
            yield t0, t1, result
            del result

    # measuring, a part after the first runs its first time chunk only (:func:`measuring`)
    brief = not _FALL_BACK[-1] and BRIEF_PARTS
    collecting: set = set()
    for level in reversed(range(len(plan.levels))):  # a pass per level of batch norms, the deepest first
        collecting = set(plan.levels[level])
        for n, s in sums.items():
            s.collecting = n in collecting
        for p, (a, b) in enumerate(parts):
            for got in through_time(a, b, level):
                if got is None:
                    return None
                if brief and p:
                    break
        for n in plan.levels[level]:
            s = sums[n]
            s.totals = (s.dbeta.to(grad_out.dtype), s.dgamma.to(grad_out.dtype))
    for s in sums.values():  # the passes before used the deeper levels' sums: the last hands on their gradients
        s.given = False
    g_in: List[Optional[Tensor]] = [None] * len(inputs)
    g_par: List[Optional[Tensor]] = [None] * len(params)
    for p, (a, b) in enumerate(parts):  # the second pass: every gradient
        for got in through_time(a, b, None):
            if got is None:
                return None
            t0, t1, got = got
            for j, i in enumerate(wants):
                if got[j] is not None:
                    if g_in[i] is None:
                        g_in[i] = inputs[i].new_zeros(inputs[i].shape)
                    g_in[i][t0:t1, a:b] = got[j]
            g_par = [g if s is None else s if g is None else s.add_(g) for s, g in zip(g_par, got[len(wants):])]
            del got  # copied: not held while the next chunk runs
            if brief and p:
                break
    return g_in, g_par


def check(plan: Plan, inputs: Sequence[Any], per: int, steps: Optional[int] = None,
          samples: Optional[int] = None) -> Optional[str]:
    """Why ``plan``'s rebuild in chunks of ``per`` samples and ``steps`` time steps (None: all) is
    not the segment's forward on these inputs (None: it is), checked on the first ``samples``
    samples (None: all)."""
    body = plan.body
    B = next((x.shape[1] for x in inputs if isinstance(x, Tensor) and x.dim() >= 2), None)
    if B is None or not all(_batched(x, B) or not isinstance(x, Tensor) for x in inputs):
        return "its inputs are not (T, B, ...) sequences of one batch"
    T = next(x.shape[0] for x in inputs if isinstance(x, Tensor))
    if steps is not None:
        if plan.why_not_in_time is not None:
            return plan.why_not_in_time
        if any(isinstance(x, Tensor) and x.shape[0] != T for x in inputs):
            return "its inputs are not sequences of the same steps"
    nodes = plan.modules(plan.neurons)
    states0 = {m: m.state for m in nodes}
    buffers = [(t, t.clone()) for t in body.buffers()]
    stats: Dict[fx.Node, Tuple[Tensor, Tensor]] = {}
    hooks = forward_hooks(plan, stats, {})  # the whole batch's statistics, as the forward keeps them

    def normalize(n, x):
        mean, invstd = stats[n]
        bn = body.get_submodule(n.target)
        return _Normalize.apply(x, mean, invstd, bn.weight, bn.bias, _Sums(1))

    try:
        with torch.no_grad():
            try:
                whole = body(*inputs)
            finally:
                for h in hooks:
                    h.remove()
            # what the second pass computes, chunk by chunk, with the whole batch's statistics
            for a, b in chunks_of(B if samples is None else min(B, samples), per):
                for m in nodes:
                    m.state = _state_slice(states0[m], B, a, b)
                for t0, t1 in chunks_of(T, steps or T):  # the neurons carry their states from chunk to chunk
                    env = {p: _slice(x, B, a, b, t0, t1) for p, x in zip(plan.placeholders, inputs)}
                    _run(body, plan.order, env, bn=normalize, result=plan.result)
                    got = env[plan.result]
                    if (not isinstance(got, Tensor) or not isinstance(whole, Tensor)
                            or got.shape != whole[t0:t1, a:b].shape):
                        return "a chunk's output is not the matching part of the whole batch's"
                    if not torch.equal(got, whole[t0:t1, a:b]):
                        return ("a chunk's output differs from the whole batch's (its layers mix samples or steps, "
                                "or draw random numbers)" if steps else "a chunk's output differs from the whole "
                                "batch's (its layers mix samples or draw random numbers)")
    except Unchunkable as e:
        return str(e)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:  # shapes fixed at tracing, and the like
        return f"running a chunk failed: {type(e).__name__}: {e}"
    finally:
        for m in nodes:
            m.state = states0[m]
        with torch.no_grad():
            for t, v in buffers:
                t.copy_(v)
    return None
