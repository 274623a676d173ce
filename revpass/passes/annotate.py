"""Memory annotations: what each node of a graph keeps for backward, measured, and for how long.

:func:`measure` runs a GraphModule with a :class:`torch.fx.Interpreter` under
``saved_tensors_hooks`` and attributes every tensor saved for backward (and still held when the
forward returns) to the node that saved it, deduplicated by storage over the whole graph: a
storage kept by several nodes (a reversible node's output, kept again by the conv that reads it)
counts once, at the first node that keeps it.

:func:`annotate` writes, for every node, ``node.meta["revpass"]`` (and the same dict under
``node.meta["custom"]["revpass"]``, which torch.export keeps):

    shape, dtype          of the node's output (None for non-tensors)
    kept_bytes            bytes it keeps for backward, measured on this graph
    kept_bytes_before     the same on the graph before conversion (the sum over the calls and ops
                          a rewritten site replaced), when that graph is given
    strategy, reason      "reversible" | "exact" | "unchanged" for neuron sites, "-" otherwise
    forward_step          the position of the node in the forward (when its tensors are saved)
    backward_step         the step of the backward that frees them: autograd runs the nodes'
                          backwards in reverse order, so it is n_nodes - 1 - forward_step
    workspace_bytes       revpass nodes and recomputed segments: what their backward allocates
                          besides the gradients of their inputs and parameters (measured on the
                          module alone, :func:`workspace`; a segment's rebuilt layers included)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import fx

from revpass.nodes.bits import is_binary

META = "revpass"


@dataclass
class NodeMemory:
    kept_bytes: int
    forward_step: int
    shape: Optional[List[int]]
    dtype: Optional[str]
    binary: bool = False  # every element of the output is 0 or 1 (spikes)
    own_bytes: int = 0  # what the node keeps, counting storages other nodes also keep
    workspace_bytes: int = 0  # revpass nodes: what their backward allocates besides the input gradient


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.now: List[Optional[str]] = [None]  # the name of the node running now
        self.order: List[fx.Node] = []
        self.outputs: Dict[str, Any] = {}
        self.binary: Dict[str, bool] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.now[0] = n.name
        self.order.append(n)
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.outputs[n.name] = (list(out.shape), str(out.dtype).replace("torch.", ""))
            with torch.no_grad():
                self.binary[n.name] = is_binary(out)
        return out


def measure(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Dict[str, NodeMemory]:
    """Bytes each node keeps for backward (storage-deduplicated over the graph), by node name."""
    from revpass.trace import reset_states

    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    reset_states(gm)
    rec = _Recorder(gm)
    excluded = {t.untyped_storage().data_ptr() for t in (*gm.parameters(), *gm.buffers()) if t.numel()}
    excluded |= {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor) and x.numel()}
    seen = []
    # the hook holds no graph (node names, not nodes; not the recorder): a saved tensor's hooks live
    # as long as the saved tensor, and with them whatever the hook refers to
    now = rec.now

    def pack(t: torch.Tensor):
        # the graph keeps an alias, not t: a saved output packed as itself would hold its own
        # grad_fn, a cycle through autograd's C++ nodes that gc cannot see, and it leaked the
        # whole graph (parameters included) at every measuring run. The alias lives exactly as
        # long as the graph keeps it, so its weak reference says whether it is still kept.
        kept_as = t.detach()
        if t.numel() and t.device.type != "meta":
            st = t.untyped_storage()
            if st.data_ptr() not in excluded:
                seen.append((weakref.ref(kept_as), st.data_ptr(), st.nbytes(), now[0]))
        return kept_as

    leaves = [x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    # a measuring run must leave no trace: buffers (batch norm's running statistics) are put back
    # and the random number generator is not advanced
    buffers = [(b, b.clone()) for b in gm.buffers()]
    cuda = sorted({t.device.index or 0 for t in (*gm.parameters(), *leaves)
                   if isinstance(t, torch.Tensor) and t.is_cuda})
    with torch.random.fork_rng(devices=cuda), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = rec.run(*leaves)
    with torch.no_grad():
        for b, v in buffers:
            b.copy_(v)
    kept: Dict[str, int] = {}
    owner: Dict[int, str] = {}
    own: Dict[str, Dict[int, int]] = {}
    for ref, ptr, nbytes, name in seen:
        if ref() is None or name is None:
            continue  # freed before the forward returned
        own.setdefault(name, {})[ptr] = nbytes
        if ptr in owner:
            continue  # already counted (shared storage)
        owner[ptr] = name
        kept[name] = kept.get(name, 0) + nbytes
    del out
    reset_states(gm)
    result = {}
    for i, n in enumerate(rec.order):
        shape, dtype = rec.outputs.get(n.name, (None, None))
        result[n.name] = NodeMemory(kept.get(n.name, 0), i, shape, dtype, rec.binary.get(n.name, False),
                                    sum(own.get(n.name, {}).values()))
    from revpass.nodes.modules import _Node

    from revpass.nodes.segment import RecomputeSegment

    sized: Dict[str, int] = {}
    for n in rec.order:  # the backward workspace of revpass nodes and segments, once per module and shapes
        if n.op != "call_module" or not n.args or not isinstance(gm.get_submodule(n.target), (_Node,
                                                                                             RecomputeSegment)):
            continue
        args = n.args[:1] if isinstance(gm.get_submodule(n.target), _Node) else n.args
        src = [(*rec.outputs.get(a.name, (None, None)), rec.binary.get(a.name, False)) if isinstance(a, fx.Node)
               else (None, None, False) for a in args]
        if all(shape is not None for shape, _, _ in src):
            key = f"{n.target}{src}"
            if key not in sized:
                sized[key] = workspace(gm.get_submodule(n.target),
                                       [(shape, getattr(torch, dtype), b) for shape, dtype, b in src])
            result[n.name].workspace_bytes = sized[key]
    return result


def node_workspace(node, shape, dtype, device="cpu") -> int:
    """:func:`workspace` of a revpass node on one random (non-spike) input of ``shape``."""
    return workspace(node, [(shape, dtype, False)], device)


def owners(module) -> List[Any]:
    """The modules whose parameters and buffers ``module``'s forward and backward use: a
    recomputed segment's body (held outside the module tree) or the module itself, then every
    batch norm folded into a node inside it (not its child either)."""
    from revpass.nodes.segment import RecomputeSegment

    body = module.body if isinstance(module, RecomputeSegment) else module
    return [body] + [m.folded_bn for m in body.modules() if getattr(m, "folded_bn", None) is not None]


def workspace(module, inputs, device="cpu") -> int:
    """What ``module``'s backward (a revpass node or a recomputed segment) allocates besides its
    inputs' and parameters' gradients, on random inputs described by ``inputs`` [(shape, dtype,
    binary)] (binary: 0/1 values, as spikes, which a segment keeps as bits): MemTracker's peak
    over the backward alone, with the kernels' internals visible
    (revpass.nodes.ops.visible_internals), less what existed before it (inputs, output, its
    gradient, what the forward kept). Carried states and buffers (batch norm statistics, folded
    or in a segment) are left as they were; 0 on the meta device."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from revpass.memory import tracker_bytes
    from revpass.nodes.modules import _Node
    from revpass.nodes.ops import visible_internals
    from revpass.plan import _trained

    if device == "meta" or str(device) == "meta" or not inputs or any(not shape for shape, _, _ in inputs):
        return 0
    device = next((p.device for p in module.parameters()), torch.device(device))
    if device.type == "meta":
        return 0
    used = owners(module)
    nodes = [m for m in used[0].modules() if isinstance(m, _Node)]
    states = [(m, m.state) for m in nodes]
    buffers = [(b, b.clone()) for o in used for b in o.buffers()]
    try:
        for m in nodes:
            m.state = None
        saved = []  # what the forward keeps: it exists before the backward, as do x, y and g
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t) or t, lambda t: t):
            xs = [(torch.randint(0, 2, shape, device=device).to(dtype) if binary
                   else torch.randn(shape, dtype=dtype, device=device) + 0.5).requires_grad_(True)
                  for shape, dtype, binary in inputs]
            y = module(*xs)
            y = y[0] if isinstance(y, tuple) else y
            g = torch.randn_like(y)
        params = list(_trained(module))
        existing = [*xs, y, g, *saved] + [t for o in used for t in (*o.parameters(), *o.buffers())]
        before = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in existing}
        mt = MemTracker()
        # tracked from the start, these count once, as they are; a dispatch mode would otherwise
        # count a storage it first meets through a view made in the backward (a saved tensor's
        # detach, a slice of g, a weight's transpose) as if the backward had allocated it
        mt.track_external(*existing)
        with visible_internals(), mt:
            grads = torch.autograd.grad(y, [*xs, *params], g, allow_unused=True)
        total = tracker_bytes(mt.get_tracker_snapshot("peak"))
        saved.clear()  # the hook may outlive this call (see measure): it must not keep these
        return max(0, total - sum(before.values()) - sum(t.numel() * t.element_size() for t in grads
                                                         if t is not None))
    finally:
        for m, st in states:
            m.state = st
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)


def annotate(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    before: Optional[fx.GraphModule] = None,
) -> Dict[str, NodeMemory]:
    """Write node.meta["revpass"] on every node of ``gm`` (see the module docstring), and, when
    the graph ``before`` conversion is given, on every node of it too (its own measurements)."""
    after = measure(gm, example_inputs)
    prior = measure(before, example_inputs) if before is not None else None
    report = getattr(gm, "revpass_report", None)
    _write(gm, after, prior, {r.path: r for r in report} if report is not None else {})
    if before is not None:
        _write(before, prior, prior, {})
    return after


def _write(gm: fx.GraphModule, mem: Dict[str, NodeMemory], prior: Optional[Dict[str, NodeMemory]], rows) -> None:
    n_steps = len(mem)
    for n in gm.graph.nodes:
        m = mem.get(n.name)
        info: Dict[str, Any] = {
            "shape": m.shape if m else None,
            "dtype": m.dtype if m else None,
            "kept_bytes": m.kept_bytes if m else 0,
            "strategy": "-",
            "reason": "",
            "forward_step": m.forward_step if m else None,
            "backward_step": (n_steps - 1 - m.forward_step) if m else None,
        }
        if prior is not None:
            replaced = n.meta.get("revpass_replaces", [n.name])
            info["kept_bytes_before"] = sum(prior[r].kept_bytes for r in replaced if r in prior)
        if n.op == "call_module" and n.target in rows:
            info["strategy"] = rows[n.target].decision
            info["reason"] = rows[n.target].reason
        if "revpass_strategy" in n.meta:  # a recomputed segment (revpass/passes/segments.py)
            info["strategy"], info["reason"] = n.meta["revpass_strategy"]
        if m is not None and m.workspace_bytes:
            info["workspace_bytes"] = m.workspace_bytes
        n.meta[META] = info
        n.meta.setdefault("custom", {})[META] = dict(info)
