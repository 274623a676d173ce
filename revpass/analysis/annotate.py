"""Memory annotations: what each node of a graph keeps for backward, measured, and for how long.

:func:`annotate` writes, for every node, a :class:`revpass.meta.NodeInfo` (the node.meta schema)
from one measuring run (revpass.analysis.measure):

    shape, dtype          of the node's output (None for non-tensors)
    kept_bytes            bytes it keeps for backward, measured on this graph
    kept_bytes_before     the same on the graph before conversion (the sum over the calls and ops
                          a rewritten site replaced), when that graph's measurements are given
    strategy, reason      "reversible" | "exact" | "recompute" | "unchanged" for neuron sites and
                          segments, "-" otherwise
    forward_step          the position of the node in the forward (when its tensors are saved)
    backward_step         the step of the backward that frees them: autograd runs the nodes'
                          backwards in reverse order, so it is n_nodes - 1 - forward_step
    workspace_bytes       revpass nodes and recomputed segments: what their backward allocates
                          besides the gradients of their inputs and parameters (measured on the
                          module alone, revpass.analysis.workspace)
    forward_bytes         module calls: the most their forward held at once beyond what existed
                          when it started (output and kept bytes included), measured in the run
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from torch import fx

from revpass import meta
from revpass.analysis.measure import NodeMemory, measure
from revpass.meta import NodeInfo


def annotate(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    prior: Optional[Dict[str, NodeMemory]] = None,
) -> Dict[str, NodeMemory]:
    """Write node.meta["revpass"] on every node of ``gm`` (see the module docstring) and return
    its measurements. ``prior``: those of the graph before conversion (an earlier call on it),
    from which each node's ``kept_bytes_before``."""
    after = measure(gm, example_inputs)
    report = getattr(gm, "revpass_report", None)
    _write(gm, after, prior, {r.path: r for r in report} if report is not None else {})
    return after


def _write(gm: fx.GraphModule, mem: Dict[str, NodeMemory], prior: Optional[Dict[str, NodeMemory]], rows) -> None:
    n_steps = len(mem)
    for n in gm.graph.nodes:
        m = mem.get(n.name)
        info = NodeInfo(
            shape=m.shape if m else None,
            dtype=m.dtype if m else None,
            kept_bytes=m.kept_bytes if m else 0,
            forward_step=m.forward_step if m else None,
            backward_step=(n_steps - 1 - m.forward_step) if m else None,
        )
        if prior is not None:
            info.kept_bytes_before = sum(prior[r].kept_bytes for r in meta.replaces(n) if r in prior)
        if n.op == "call_module" and n.target in rows:
            info.strategy, info.reason = rows[n.target].decision, rows[n.target].reason
        if meta.strategy(n) is not None:  # a recomputed segment (revpass/passes/segments.py)
            info.strategy, info.reason = meta.strategy(n)
        if m is not None and m.workspace_bytes:
            info.workspace_bytes = m.workspace_bytes
        if m is not None and m.forward_bytes:
            info.forward_bytes = m.forward_bytes
        meta.write(n, info)
