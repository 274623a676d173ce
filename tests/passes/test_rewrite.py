"""revpass/passes/rewrite.py on small traced graphs: a multi-step site swapped for its node in
place; a single-step site's T calls rolled into stack -> node -> unbind; re-stacked outputs
folded; the whole rewrite of decided sites. Outputs checked against the original model."""

import operator

import pytest
import models
import torch
from torch import fx, nn

import revpass
from revpass.passes.decide import decide
from revpass.passes.detect import find_sites
from revpass.passes.graph import to_networkx
from revpass.passes.rewrite import fold_restack, rewrite, rewrite_site
from revpass.passes.roll import plan_roll
from revpass.state import reset_states
from revpass.trace import trace


def _sj_seq():
    from spikingjelly.activation_based import layer, neuron

    torch.manual_seed(0)
    return nn.Sequential(layer.Linear(4, 6, step_mode="m"), neuron.LIFNode(step_mode="m"),
                         layer.Linear(6, 2, step_mode="m"), neuron.IFNode(step_mode="m"))


def _ops(gm):
    return [(n.op, n.target) for n in gm.graph.nodes]


def _run(m, x):
    reset_states(m)
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("mode,cls", [("exact", revpass.ExactNode), ("reversible", revpass.ReversibleNode)])
def test_a_multi_step_site_is_swapped_in_place(mode, cls):
    net = _sj_seq()
    x = torch.randn(3, 2, 4) * 2 + 0.5
    gm = trace(net)
    ops = _ops(gm)
    site = find_sites(gm)[0]
    lib = site.module
    rewrite_site(gm, site, mode, "optimized", {})
    node = gm.get_submodule("1")
    assert isinstance(node, cls) and node.name == "1" and node.step_mode == "m"
    assert _ops(gm) == ops  # the same call at the same place: only the module changed
    assert gm.get_submodule("3") is net[3]  # the other site is untouched
    assert lib is net[1]  # the original's module is not the node
    if mode == "exact":
        assert torch.equal(_run(gm, x), _run(net, x))


def test_norse_multi_step_node_returns_its_state():
    net = models.norse_sequential()
    gm = trace(net)
    sites = find_sites(gm)
    for s in sites:
        rewrite_site(gm, s, "exact", "optimized", {})
    assert all(gm.get_submodule(s.path).return_state for s in sites)
    x = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(0)) * 4
    (y, states), (y_ref, states_ref) = _run(gm, x), _run(net, x)  # SequentialState: (output, states)
    assert torch.equal(y, y_ref)
    lifs = [(a, b) for a, b in zip(states, states_ref) if b is not None]  # the Linear layers keep none
    assert len(lifs) == 2 and all(torch.equal(a.v, b.v) and torch.equal(a.i, b.i) for a, b in lifs)
    assert lifs[0][1].v.abs().sum() > 0


@pytest.mark.parametrize("mode", ["exact", "reversible"])
def test_single_step_calls_are_rolled_into_one_sequence_node(mode):
    net = models.LeakyLoop(T=3, seed=0)
    x = torch.randn(3, 2, 4) * 2
    gm = trace(net)
    (site,) = find_sites(gm)
    ok, _, plan = plan_roll(site, to_networkx(gm.graph))
    assert ok
    fcs = [c.args[0] for c in site.calls]
    rewrite_site(gm, site, mode, "optimized", plan)
    gm.graph.lint()
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "lif"]
    assert len(calls) == 1  # three calls became one
    (call,) = calls
    assert isinstance(gm.get_submodule("lif"), revpass.ReversibleNode if mode == "reversible" else revpass.ExactNode)
    stack = call.args[0]
    assert stack.target is torch.stack and stack.args == (fcs, 0)  # the three steps' inputs, in order
    (unbind,) = call.users
    assert unbind.target is torch.unbind and unbind.args == (call, 0)
    items = sorted(unbind.users, key=lambda n: n.args[1])
    assert [(i.target, i.args[1]) for i in items] == [(operator.getitem, t) for t in range(3)]
    # the model's own stack now reads the node's per-step outputs; no state item is left
    (out_stack,) = [n for n in gm.graph.nodes if n.target is torch.stack and n is not stack]
    assert out_stack.args[0] == items
    assert not any(n.target is operator.getitem and n.args[0] in site.calls for n in gm.graph.nodes)
    assert call.meta["revpass_replaces"] == [c.name for c in site.calls]
    gm.recompile()
    if mode == "exact":
        assert torch.equal(_run(gm, x), _run(net, x))
    # stack(unbind(y)) is y
    assert fold_restack(gm.graph) == 1
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    assert out.args[0] is call
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert [n for n in gm.graph.nodes if n.target is torch.stack] == [stack]
    if mode == "exact":
        assert torch.equal(_run(gm, x), _run(net, x))


def _restack_graph(order=(0, 1, 2), dim=0, unbind_dim=0):
    g = fx.Graph()
    y = g.placeholder("y")
    u = g.call_function(torch.unbind, (y, unbind_dim))
    items = [g.call_function(operator.getitem, (u, t)) for t in range(3)]
    s = g.call_function(torch.stack, ([items[t] for t in order], dim))
    g.output(s)
    return g, y


@pytest.mark.parametrize("kw,folded", [
    ({}, 1),
    ({"order": (1, 0, 2)}, 0),  # another order: not y
    ({"order": (0, 1)}, 0),  # some steps only
    ({"dim": 1}, 0),  # stacked along another dim
    ({"unbind_dim": 1, "dim": 1}, 0),  # unbound along another dim
])
def test_fold_restack_only_folds_the_identity(kw, folded):
    g, y = _restack_graph(**kw)
    assert fold_restack(g) == folded
    (out,) = [n for n in g.nodes if n.op == "output"]
    assert (out.args[0] is y) == bool(folded)
    g.eliminate_dead_code()
    t = torch.randn(3, 3, 2)
    if folded:  # nothing left but the input
        assert [n.op for n in g.nodes] == ["placeholder", "output"]
        assert fx.GraphModule(nn.Module(), g)(t) is t


def test_rewrite_converts_the_decided_sites_and_cleans_up():
    """decide, then rewrite: the fresh states of the rolled calls leave the graph, the re-stacked
    output is the node's output, and the graph computes the original's function (exact)."""
    net = models.LeakyLoop(T=4, seed=0)
    x = torch.randn(4, 2, 4) * 2
    gm = trace(net)
    assert sum(n.target is torch.zeros for n in gm.graph.nodes) == 2  # init_leaky, traced
    sites = find_sites(gm)
    decide(gm, sites, [], mode="exact")
    assert sites[0].decision == "exact" and "4 single-step calls rolled" in sites[0].reason
    rewrite(gm, sites, [], "optimized")
    gm.graph.lint()
    assert not any(n.target is torch.zeros for n in gm.graph.nodes)
    (call,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "lif"]
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    assert out.args[0] is call
    assert torch.equal(_run(gm, x), _run(net, x))


def test_rewrite_leaves_undecided_sites_and_puts_the_node_in_the_users_model():
    net = _sj_seq()
    gm = trace(net)
    sites = find_sites(gm)
    decide(gm, sites, [], mode="reversible", exclude="3")
    assert [s.decision for s in sites] == ["reversible", "unchanged"] and sites[1].reason == "excluded"
    user = _sj_seq()
    rewrite(gm, sites, [], "autograd", user_model=user)
    assert isinstance(gm.get_submodule("1"), revpass.ReversibleNode) and gm.get_submodule("1").backward_mode == "autograd"
    assert user[1] is gm.get_submodule("1")  # inplace: the same node at the same path
    assert gm.get_submodule("3") is net[3] and not isinstance(user[3], revpass.ExactNode)
