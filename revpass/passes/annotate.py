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
    workspace_bytes       revpass nodes: what their backward allocates besides the input gradient
                          (measured on the node alone); recomputed segments: what the segment's
                          layers keep while its backward recomputes them, plus the largest
                          node workspace inside (measured before it was formed)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import fx

from revpass.nodes.core import is_binary

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
        self.current: Optional[fx.Node] = None
        self.order: List[fx.Node] = []
        self.outputs: Dict[str, Any] = {}
        self.binary: Dict[str, bool] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
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

    def pack(t: torch.Tensor):
        if t.numel() and t.device.type != "meta":
            st = t.untyped_storage()
            if st.data_ptr() not in excluded:
                seen.append((weakref.ref(t), st.data_ptr(), st.nbytes(), rec.current))
        return t

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
    for ref, ptr, nbytes, node in seen:
        if ref() is None or node is None:
            continue  # freed before the forward returned
        own.setdefault(node.name, {})[ptr] = nbytes
        if ptr in owner:
            continue  # already counted (shared storage)
        owner[ptr] = node.name
        kept[node.name] = kept.get(node.name, 0) + nbytes
    del out
    reset_states(gm)
    result = {}
    for i, n in enumerate(rec.order):
        shape, dtype = rec.outputs.get(n.name, (None, None))
        result[n.name] = NodeMemory(kept.get(n.name, 0), i, shape, dtype, rec.binary.get(n.name, False),
                                    sum(own.get(n.name, {}).values()))
    from revpass.nodes.modules import _Node

    sized: Dict[str, int] = {}
    for n in rec.order:  # the revpass nodes' backward workspace, measured once per module and shape
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _Node) and n.args:
            src = rec.outputs.get(getattr(n.args[0], "name", None))
            if src is not None:
                key = f"{n.target}{src}"
                if key not in sized:
                    sized[key] = node_workspace(gm.get_submodule(n.target), src[0], getattr(torch, src[1]))
                result[n.name].workspace_bytes = sized[key]
    return result


def node_workspace(node, shape, dtype, device="cpu") -> int:
    """What ``node``'s backward allocates besides its input gradient, on a random input of
    ``shape``: MemTracker's peak over the backward alone, with the kernels' internals visible
    (revpass.nodes.ops.visible_internals), less the input gradient and parameter gradients. The
    node's carried state is left as it was; 0 on the meta device."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from revpass.memory import tracker_bytes
    from revpass.nodes.ops import visible_internals

    if device == "meta" or str(device) == "meta" or not shape:
        return 0
    device = next((p.device for p in node.parameters()), torch.device(device))
    if device.type == "meta":
        return 0
    saved_state, node.state = node.state, None
    try:
        with torch.random.fork_rng(devices=[]):
            x = (torch.randn(shape, dtype=dtype, device=device) + 0.5).requires_grad_(True)
            y = node(x)
            y = y[0] if isinstance(y, tuple) else y
            g = torch.randn_like(y)
        params = [p for p in node.parameters() if p.requires_grad]
        mt = MemTracker()
        with visible_internals(), mt:
            grads = torch.autograd.grad(y, [x, *params], g, allow_unused=True)
        total = tracker_bytes(mt.get_tracker_snapshot("peak"))
        return max(0, total - sum(t.numel() * t.element_size() for t in grads if t is not None))
    finally:
        node.state = saved_state


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
            info["workspace_bytes"] = n.meta["revpass_workspace"]
        elif m is not None and m.workspace_bytes:
            info["workspace_bytes"] = m.workspace_bytes
        n.meta[META] = info
        n.meta.setdefault("custom", {})[META] = dict(info)
