"""Fold batch norms into the nodes that read them (revpass/nodes/batchnorm.py).

``bn -> reversible node`` becomes one call of the node on the batch norm's input, and so does
``bn -> exact node`` when asked (``exact=True``: under a budget, where gradients within a rounding
of the original's are allowed; plain ``mode="exact"`` stays bit for bit), when:

* the batch norm is a multi-step one (SpikingJelly's, step_mode='m') called with one argument,
  and the node is its only reader;
* the node is called once in the graph (a node module shared by several calls would run the
  batch norm at every one of them);
* the node is not one that a recomputed segment will end at (``skip``): the segment keeps
  nothing inside it anyway, its rebuild runs a chunk of the batch at a time with the batch
  norm's statistics kept (revpass/nodes/chunks.py), and a batch norm folded into a node is no
  parameter of the segment's layers, so its gradients would not reach it.

The batch norm module stays where it is in the model (state_dict keys and parameters do not
change); its call leaves the graph, and the node's annotations count what it kept before.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Collection, List, Optional, Tuple

import torch
from torch import fx

from revpass import meta
from revpass.nodes import ExactNode, ReversibleNode
from revpass.nodes.batchnorm import foldable_into
from revpass.passes.spikes import spike_values


def fold_batch_norms(gm: fx.GraphModule, exact: bool = False, skip: Collection[str] = ()) -> List[str]:
    """Fold every foldable batch norm in ``gm`` into its reversible node, and with ``exact`` into
    its exact node, except into the nodes at the paths in ``skip``; returns the folded batch
    norms' paths."""
    kinds = (ReversibleNode, ExactNode) if exact else (ReversibleNode,)
    spikes = spike_values(gm) if exact else set()
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    folded = []
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or calls[n.target] != 1 or len(n.args) != 1 or n.kwargs or n.target in skip:
            continue
        node = gm.get_submodule(n.target)
        if not isinstance(node, kinds) or node.folded_bn is not None or not isinstance(n.args[0], fx.Node):
            continue
        b, add, r = n.args[0], None, None
        if exact and isinstance(node, ExactNode):
            add, b, r = _residual(gm, n.args[0], spikes)
        if (b.op != "call_module" or len(b.users) != 1 or len(b.args) != 1 or b.kwargs
                or not isinstance(b.args[0], fx.Node)):
            continue
        bn = gm.get_submodule(b.target)
        if not foldable_into(node, bn):
            continue
        node.fold_batch_norm(bn)
        n.args = (b.args[0],)
        if add is not None:
            n.kwargs = {"residual": r}
        meta.set_replaces(n, meta.replaces(b) + (meta.replaces(add) if add is not None else []) + meta.replaces(n))
        meta.set_folded(n, str(b.target))
        if add is not None:
            gm.graph.erase_node(add)
        gm.graph.erase_node(b)
        folded.append(str(b.target))
    gm.graph.lint()
    gm.recompile()
    return folded


def _residual(gm: fx.GraphModule, a: fx.Node, spikes) -> Tuple[Optional[fx.Node], fx.Node, Optional[fx.Node]]:
    """(the addition, the batch norm's call, the residual) where the exact node's input ``a`` is
    ``bn(c) + r`` with r spikes (a ResNet block's identity: kept as bits, so that folding saves
    the batch norm's input), read by nothing else; else (None, a, None)."""
    if not (a.op == "call_function" and a.target in (operator.add, torch.add) and len(a.args) == 2
            and not a.kwargs and len(a.users) == 1 and all(isinstance(x, fx.Node) for x in a.args)):
        return None, a, None
    for b, r in (a.args, a.args[::-1]):
        if b.op == "call_module" and b is not r and r in spikes and len(b.users) == 1:
            return a, b, r
    return None, a, None
