"""Which parameters a module's backward produces, and what its backward allocates.

One home for both questions about a revpass node or a recomputed segment: :func:`owners` (the
modules whose parameters and buffers it uses: a segment's body, folded batch norms),
:func:`trained_params` (the parameters whose gradients its backward makes; :func:`trained_bytes`
their bytes) and
:func:`workspace` (its backward's transient memory, measured), :func:`measure_kept` and
:func:`kept_in_chunks` (what its forward keeps for backward).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, List

import torch
from torch import fx, nn

from revpass.memory import StorageTracker
from revpass.nodes import Node, chunks
from revpass.nodes.ops import visible_internals
from revpass.nodes.segment import RecomputeSegment


def owners(module) -> List[Any]:
    """The modules whose parameters and buffers ``module``'s forward and backward use: a
    recomputed segment's body (held outside the module tree) or the module itself, then every
    batch norm folded into a node inside it (not its child either)."""
    body = module.body if isinstance(module, RecomputeSegment) else module
    return [body] + [m.folded_bn for m in body.modules() if getattr(m, "folded_bn", None) is not None]


def trained_params(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters whose gradients ``module``'s backward makes (:func:`owners`: a recomputed
    segment's layers and a batch norm folded into a node included), each once."""
    seen = set()
    for o in owners(module):
        for p in o.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield p


def trained_bytes(module: nn.Module) -> int:
    """The bytes of the parameters' gradients ``module``'s backward makes (:func:`trained_params`)."""
    return sum(p.numel() * p.element_size() for p in trained_params(module))


def node_workspace(node, shape, dtype, device="cpu") -> int:
    """:func:`workspace` of a revpass node on one random (non-spike) input of ``shape``."""
    return workspace(node, [(shape, dtype, False)], device)


#: measured workspaces of revpass nodes by everything the measure depends on (:func:`node_key`):
#: the planner converts a model several times, and every conversion measures its nodes again
_NODE_WORKSPACE: Dict[tuple, int] = {}
_CACHE_LIMIT = 4096


def node_key(node, inputs, device) -> tuple:
    """What a revpass node's backward workspace depends on: its op configuration (family,
    constants, surrogate, parameters, backward, slicing), how it is called, a folded batch
    norm, its parameters, the inputs, the device and the kernel backend chosen by the
    environment (docs/method.md section 8)."""
    bn = node.folded_bn
    return (type(node), node._config, node.step_mode, node.carry_state, node.return_state, node.plain,
            node.backward_mode, None if bn is None else (type(bn), bn.num_features, bn.affine, bn.training,
                                                          bn.track_running_stats, str(bn.weight.dtype)
                                                          if bn.weight is not None else None),
            tuple((n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in node.named_parameters()),
            tuple((tuple(s), str(d), b) for s, d, b in inputs), str(device),
            os.environ.get("REVPASS_KERNELS"), os.environ.get("TRITON_INTERPRET"))


def segment_key(seg: RecomputeSegment, inputs, device) -> tuple:
    """What a recomputed segment's backward workspace depends on: its layers in order (each
    node's operation and target, each module's type, configuration, parameters' and buffers'
    shapes, and for a revpass node :func:`node_key`), and the inputs."""
    parts = []
    index = {n: i for i, n in enumerate(seg.body.graph.nodes)}  # names differ between conversions

    def arg(a):
        return ("node", index[a]) if isinstance(a, fx.Node) else str(a)

    for n in seg.body.graph.nodes:
        part = (n.op, "placeholder" if n.op == "placeholder" else str(getattr(n.target, "__name__", n.target)),
                tuple(map(arg, n.args)), tuple(sorted((k, arg(v)) for k, v in n.kwargs.items())))
        if n.op == "call_module":
            m = seg.body.get_submodule(n.target)
            part += ((node_key(m, (), device),) if isinstance(m, Node) else
                     (type(m).__qualname__, m.extra_repr(), m.training,
                      tuple((k, tuple(t.shape), str(t.dtype), t.requires_grad) for k, t in m.named_parameters()),
                      tuple((k, tuple(t.shape), str(t.dtype)) for k, t in m.named_buffers())))
        parts.append(part)
    chunked = (seg.chunking is not None, seg.sample_elems, seg.chunk_elems)  # rebuilt in chunks of the batch
    return ("segment", tuple(parts), chunked, tuple((tuple(s), str(d), b) for s, d, b in inputs), str(device),
            os.environ.get("REVPASS_KERNELS"), os.environ.get("TRITON_INTERPRET"))


def workspace(module, inputs, device="cpu") -> int:
    """:func:`measure_workspace`, remembered for a revpass node (:func:`node_key`) and a
    recomputed segment (:func:`segment_key`; measured on :func:`two_chunks` of its inputs): the
    same layers on the same inputs allocate the same in every conversion of a model (the planner
    converts it several times)."""
    if isinstance(module, RecomputeSegment):
        cut = two_chunks(module, inputs)
        return _remembered(segment_key(module, cut, device), lambda: measure_workspace(module, cut, device))
    if isinstance(module, Node):
        return _remembered(node_key(module, inputs, device), lambda: measure_workspace(module, inputs, device))
    return measure_workspace(module, inputs, device)


def two_chunks(seg: RecomputeSegment, inputs):
    """``inputs`` [(shape, dtype, binary)] of a segment whose backward is rebuilt in chunks, cut
    to the samples of two chunks (the time steps all kept): the rebuild's workspace is one
    chunk's working set beside the sums carried from chunk to chunk, the same for two chunks of
    samples as for any number (measured equal on the zoo's networks, tests/nodes/test_chunks.py), so the
    measure runs B / (2 samples a chunk) times faster; unchanged where it is rebuilt whole."""
    shapes = [shape for shape, _, _ in inputs]
    if seg.chunking is None or not shapes or any(len(s) < 2 or s[:2] != shapes[0][:2] for s in shapes):
        return inputs
    T, B = shapes[0][:2]
    per, steps = seg.chunk_shape(T, B)
    if per == B and steps == T:
        return inputs
    return [((T, min(B, 2 * per), *shape[2:]), dtype, binary) for shape, dtype, binary in inputs]


def _remembered(key: tuple, compute) -> int:
    """``compute()``, remembered under ``key`` (the cache is emptied when full)."""
    if key not in _NODE_WORKSPACE:
        if len(_NODE_WORKSPACE) >= _CACHE_LIMIT:
            _NODE_WORKSPACE.clear()
        _NODE_WORKSPACE[key] = compute()
    return _NODE_WORKSPACE[key]


def measure_workspace(module, inputs, device="cpu") -> int:
    """What ``module``'s backward (a revpass node or a recomputed segment) allocates besides its
    inputs' and parameters' gradients, on random inputs described by ``inputs`` [(shape, dtype,
    binary)] (binary: 0/1 values, as spikes, which a segment keeps as bits): the peak of a storage
    tracker (revpass.memory.StorageTracker) over the backward alone, with the kernels' internals visible
    (revpass.nodes.ops.visible_internals), less what existed before it (inputs, output, its
    gradient, what the forward kept). Carried states and buffers (batch norm statistics, folded
    or in a segment) are left as they were; 0 on the meta device."""
    with _forward(module, inputs, device) as run:
        if run is None:
            return 0
        xs, y, g, saved = run
        used = owners(module)
        params = list(trained_params(module))
        existing = [*xs, y, g, *saved] + [t for o in used for t in (*o.parameters(), *o.buffers())]
        before = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in existing}
        # tracked from the start, these count once, as they are; a dispatch mode would otherwise
        # count a storage it first meets through a view made in the backward (a saved tensor's
        # detach, a slice of g, a weight's transpose) as if the backward had allocated it
        mt = StorageTracker(*existing)
        # a segment in chunks: the chunks' figure, not a whole rebuild's where a chunk of these
        # random inputs rounds otherwise than the forward (revpass.nodes.chunks.measuring)
        with visible_internals(), chunks.measuring(), mt:
            grads = torch.autograd.grad(y, [*xs, *params], g, allow_unused=True)
        total = mt.peak
        return max(0, total - sum(before.values()) - sum(t.numel() * t.element_size() for t in grads
                                                         if t is not None))


def kept_in_chunks(seg: RecomputeSegment, inputs, device="cpu") -> int:
    """What ``seg``'s forward keeps more when its backward runs in chunks (at the setting it has:
    the neurons' spikes as bits, the batch norms' statistics) than when it is rebuilt whole,
    :func:`measure_kept` both ways, remembered as :func:`workspace` is."""
    def compute() -> int:
        chosen = seg.chunk_elems
        T, B = next(shape[:2] for shape, _, _ in inputs)
        try:
            seg.chunk_elems = seg.chunk_elems_of(B, T)  # rebuilt whole
            whole = measure_kept(seg, inputs, device)
        finally:
            seg.chunk_elems = chosen
        return measure_kept(seg, inputs, device) - whole

    return _remembered(("kept in chunks", segment_key(seg, inputs, device)), compute)


def measure_kept(module, inputs, device="cpu") -> int:
    """Bytes ``module``'s forward keeps for its backward (each storage once), on random inputs
    described as for :func:`measure_workspace`; 0 on the meta device. A recomputed segment keeps
    more when its backward runs in chunks (the neurons' spikes as bits, the batch norms'
    statistics) than when it is rebuilt whole."""
    with _forward(module, inputs, device) as run:
        return 0 if run is None else sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                                          for t in run[3]}.values())


@contextlib.contextmanager
def _forward(module, inputs, device):
    """Runs ``module`` forward on random inputs described by ``inputs`` and yields (inputs,
    output, a random output gradient, the tensors the forward saved for backward), or None on
    the meta device; the neurons' carried states and every buffer are as they were afterwards."""
    if device == "meta" or str(device) == "meta" or not inputs or any(not shape for shape, _, _ in inputs):
        yield None
        return
    device = next((p.device for p in module.parameters()), torch.device(device))
    if device.type == "meta":
        yield None
        return
    used = owners(module)
    nodes = [m for m in used[0].modules() if isinstance(m, Node)]
    states = [(m, m.state) for m in nodes]
    buffers = [(b, b.clone()) for o in used for b in o.buffers()]
    saved: List[torch.Tensor] = []  # what the forward keeps: it exists before the backward, as do x, y and g
    try:
        for m in nodes:
            m.state = None
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t) or t, lambda t: t):
            xs = [(torch.randint(0, 2, shape, device=device).to(dtype) if binary
                   else torch.randn(shape, dtype=dtype, device=device) + 0.5).requires_grad_(True)
                  for shape, dtype, binary in inputs]
            # a node's second input is the residual its folded batch norm's output gets
            y = module(xs[0], residual=xs[1]) if isinstance(module, Node) and len(xs) == 2 else module(*xs)
            y = y[0] if isinstance(y, tuple) else y
            g = torch.randn_like(y)
        yield xs, y, g, saved
    finally:
        saved.clear()  # the hook may outlive this call (see measure): it must not keep these
        for m, st in states:
            m.state = st
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
