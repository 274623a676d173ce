"""Graph helpers every pass shares: one fx-to-networkx converter, a stable topological order,
each module's calls."""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional

import networkx as nx
import torch
from torch import fx

from revpass import meta


def to_networkx(
    graph: fx.Graph,
    *,
    by_name: bool = False,
    attrs: Optional[Callable[[fx.Node], Dict[str, Any]]] = None,
    name: str = "",
) -> nx.DiGraph:
    """``graph`` as a networkx DiGraph, edges from producer to user. Vertices are the fx nodes
    themselves, or their names with ``by_name`` (for files); ``attrs(node)`` gives each vertex's
    attributes."""
    g = nx.DiGraph(name=name) if name else nx.DiGraph()
    key = (lambda n: n.name) if by_name else (lambda n: n)
    for n in graph.nodes:
        g.add_node(key(n), **(attrs(n) if attrs is not None else {}))
        for a in n.all_input_nodes:
            g.add_edge(key(a), key(n))
    return g


def module_calls(gm: fx.GraphModule) -> Dict[str, List[fx.Node]]:
    """Each module's calls in ``gm``'s graph, by target, in graph order (of first call)."""
    calls: Dict[str, List[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, []).append(n)
    return calls


def position(g: fx.Graph) -> Callable[[fx.Node], int]:
    """A node's index in ``g``'s current order (a sort key)."""
    order = {n: i for i, n in enumerate(g.nodes)}
    return order.__getitem__


def topo_sort(g: fx.Graph) -> None:
    """Reorder ``g``'s nodes topologically, keeping the original order where free (stable)."""
    pos = position(g)
    ordered = list(nx.lexicographical_topological_sort(to_networkx(g), key=pos))
    placeholders = [n for n in ordered if n.op == "placeholder"]
    others = [n for n in ordered if n.op != "placeholder"]
    cur = placeholders[-1] if placeholders else g._root
    for n in others:
        cur.append(n)
        cur = n


def insert_sequence_node(g: fx.Graph, path: str, xs: List[fx.Node], replaces: List[str]):
    """``stack(xs) -> call_module(path) -> unbind``, placed after the last of ``xs``; returns the
    per-step output nodes. ``replaces`` names the nodes it stands for (memory annotations)."""
    last = max(xs, key=position(g))
    with g.inserting_after(last):
        stacked = g.call_function(torch.stack, (list(xs), 0))
    with g.inserting_after(stacked):
        seq = g.call_module(path, (stacked,))
    meta.set_replaces(seq, replaces)
    with g.inserting_after(seq):
        steps = g.call_function(torch.unbind, (seq, 0))
    items, prev = [], steps
    for t in range(len(xs)):
        with g.inserting_after(prev):
            prev = g.call_function(operator.getitem, (steps, t))
        items.append(prev)
    return items
