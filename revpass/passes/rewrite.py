"""Rewrite neuron sites into revpass nodes.

Kind ``a``: the module at the site's path is swapped for the node (same call, same outputs).
Kind ``b``: the T calls become ``stack -> node -> unbind`` (see :mod:`revpass.passes.roll`), then
the graph is put back in a topological order. The node takes the neuron's path, so state_dict
keys do not change.
"""

from __future__ import annotations

import operator
from typing import Dict, List

import networkx as nx
import torch
from torch import fx

from revpass.nodes.modules import ExactNode, ReversibleNode
from revpass.passes.detect import Site

# the node each strategy puts at a neuron site ("recompute": an exact node that ends a recomputed
# segment, formed after every site is rewritten: revpass/passes/segments.py)
NODE_CLASSES = {"reversible": ReversibleNode, "exact": ExactNode, "recompute": ExactNode}


def _set_module(gm: fx.GraphModule, path: str, module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def insert_sequence_node(g: fx.Graph, path: str, xs: List[fx.Node], replaces: List[str]):
    """``stack(xs) -> call_module(path) -> unbind``, placed after the last of ``xs``; returns the
    per-step output nodes. ``replaces`` names the nodes it stands for (memory annotations)."""
    last = max(xs, key=_position(g))
    with g.inserting_after(last):
        stacked = g.call_function(torch.stack, (list(xs), 0))
    with g.inserting_after(stacked):
        seq = g.call_module(path, (stacked,))
    seq.meta["revpass_replaces"] = list(replaces)
    with g.inserting_after(seq):
        steps = g.call_function(torch.unbind, (seq, 0))
    items, prev = [], steps
    for t in range(len(xs)):
        with g.inserting_after(prev):
            prev = g.call_function(operator.getitem, (steps, t))
        items.append(prev)
    return items


def rewrite_site(gm: fx.GraphModule, site: Site, mode: str, backward: str, plan: Dict) -> None:
    node = NODE_CLASSES[mode].from_neuron(site.module, name=site.path, backward=backward, step_mode="m")
    if site.kind == "a" and site.spec.family in ("norse_lif", "norse_lif_box"):
        node.return_state = True  # norse returns (spikes, state)
    _set_module(gm, site.path, node)
    if site.kind == "a":
        return
    g = gm.graph
    calls: List[fx.Node] = site.calls
    items = insert_sequence_node(g, site.path, [c.args[0] for c in calls], [c.name for c in calls])
    for spike, item in zip(plan["spikes"], items):
        if spike is not None:
            spike.replace_all_uses_with(item)
    # the old calls and their tuple items: only they use each other now; users go first
    doomed = set(calls)
    for c in calls:
        doomed.update(u for u in c.users if u.op == "call_function" and u.target is operator.getitem)
    pos = _position(g)
    for n in sorted(doomed, key=pos, reverse=True):
        stray = [u for u in n.users if u not in doomed]
        assert not stray, f"{site.path}: {n.name} still used by {stray}"
        g.erase_node(n)
    topo_sort(g)


def _position(g: fx.Graph):
    order = {n: i for i, n in enumerate(g.nodes)}
    return lambda n: order[n]


def topo_sort(g: fx.Graph) -> None:
    """Reorder ``g``'s nodes topologically, keeping the original order where free (stable)."""
    order = {n: i for i, n in enumerate(g.nodes)}
    dg = nx.DiGraph()
    for n in g.nodes:
        dg.add_node(n)
        for inp in n.all_input_nodes:
            dg.add_edge(inp, n)
    ordered = list(nx.lexicographical_topological_sort(dg, key=lambda n: order[n]))
    placeholders = [n for n in ordered if n.op == "placeholder"]
    others = [n for n in ordered if n.op != "placeholder"]
    cur = placeholders[-1] if placeholders else g._root
    for n in others:
        cur.append(n)
        cur = n


def fold_restack(g: fx.Graph) -> int:
    """``torch.stack([unbind(y, 0)[0], ..., unbind(y, 0)[T-1]], 0)`` is ``y``: a sequence node's
    outputs re-stacked by the model (``out.append(spike)``, then ``torch.stack(out)``) would be a
    copy that its consumer keeps beside the node's own output. Returns how many were folded."""
    folded = 0
    for n in list(g.nodes):
        if not (n.op == "call_function" and n.target is torch.stack and n.args):
            continue
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        items = n.args[0]
        if dim != 0 or n.kwargs.keys() - {"dim"} or not isinstance(items, (list, tuple)) or not items:
            continue
        src = items[0].args[0] if isinstance(items[0], fx.Node) and items[0].target is operator.getitem else None
        if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target is torch.unbind
                and (src.args[1:] or (0,))[0] == 0 and not src.kwargs):
            continue
        n_steps = sum(1 for u in src.users if u.target is operator.getitem)
        if len(items) != n_steps or any(not (isinstance(it, fx.Node) and it.target is operator.getitem
                                             and it.args == (src, t)) for t, it in enumerate(items)):
            continue
        n.replace_all_uses_with(src.args[0])
        g.erase_node(n)
        folded += 1
    return folded
