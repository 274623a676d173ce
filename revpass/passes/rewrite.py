"""Rewrite neuron sites into revpass nodes.

Kind ``a``: the module at the site's path is swapped for the node (same call, same outputs).
Kind ``b``: the T calls become ``stack -> node -> unbind`` (see :mod:`revpass.passes.roll`), then
the graph is put back in a topological order. The node takes the neuron's path, so state_dict
keys do not change.
"""

from __future__ import annotations

import operator
from typing import Dict, List, Optional

import torch
from torch import fx, nn

from revpass.neurons import returns_state
from revpass.nodes import ExactNode, ReversibleNode, kernels
from revpass.passes.detect import Site
from revpass.passes.patterns import PatternSite, rewrite_pattern_site
from revpass.passes.graph import insert_sequence_node, position, topo_sort
from revpass.utils import set_module

# the node each strategy puts at a neuron site ("recompute": an exact node that ends a recomputed
# segment, formed after every site is rewritten: revpass/passes/segments.py)
NODE_CLASSES = {"reversible": ReversibleNode, "exact": ExactNode, "recompute": ExactNode}


def rewrite(
    gm: fx.GraphModule,
    sites: List[Site],
    pattern_sites: List[PatternSite],
    backward: str,
    user_model: Optional[nn.Module] = None,
) -> None:
    """Put a node at every decided site (hand-written neurons first: their matched ops are
    nodes of the traced graph that a library site's rewrite could erase), then fold re-stacked
    sequences. ``user_model``: the same node goes at the same path of the user's model
    (``convert(..., inplace=True)``). A site's reason says when its node has no fused kernel."""
    for ps in pattern_sites:
        if ps.decision == "unchanged":
            continue
        node = NODE_CLASSES[ps.decision](ps.spec, backward=backward, step_mode="m", carry_state=False, name=ps.path)
        ps.node_path = rewrite_pattern_site(gm, ps, node)
        ps.reason += kernel_note(node)
        if user_model is not None:
            set_module(user_model, ps.node_path, node)
    for site in sites:
        if site.decision == "unchanged":
            continue
        rewrite_site(gm, site, site.decision, backward, site.details.get("plan", {}))
        site.reason += kernel_note(gm.get_submodule(site.path))
        if user_model is not None:
            set_module(user_model, site.path, gm.get_submodule(site.path))
    fold_restack(gm.graph)  # stack(unbind(y)) is y: no copy beside the node's output
    for n in list(gm.graph.nodes):  # fresh states of rolled calls, now unused
        if n.op == "call_function" and n.target is torch.zeros and not n.users:
            gm.graph.erase_node(n)
    gm.recompile()


def kernel_note(node: nn.Module) -> str:
    """Why a converted site runs the PyTorch path on every device (revpass.nodes.kernels), or ''."""
    spec = getattr(node, "spec", None)
    why = None if spec is None else kernels.unsupported(spec, node.params())
    return "" if why is None else f"; no fused kernel: {why}"


def rewrite_site(gm: fx.GraphModule, site: Site, mode: str, backward: str, plan: Dict) -> None:
    """Swap one library site for its node (kind a), or roll its calls into one (kind b)."""
    node = NODE_CLASSES[mode].from_neuron(site.module, name=site.path, backward=backward, step_mode="m")
    if site.kind == "a" and returns_state(site.module):
        node.return_state = True  # the framework's multi-step call returns (spikes, state)
    set_module(gm, site.path, node)
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
    pos = position(g)
    for n in sorted(doomed, key=pos, reverse=True):
        stray = [u for u in n.users if u not in doomed]
        assert not stray, f"{site.path}: {n.name} still used by {stray}"
        g.erase_node(n)
    topo_sort(g)


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
