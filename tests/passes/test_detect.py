"""revpass/passes/detect.py on small traced graphs: which call_module nodes are neuron sites, of
which kind, with which calls, and why a neuron revpass cannot represent is left."""

import models
import torch
from torch import nn

import revpass
from revpass.passes.detect import find_sites
from revpass.trace import trace


def _sj(cls="LIFNode", **kw):
    from spikingjelly.activation_based import neuron

    return getattr(neuron, cls)(**kw)


class SJTwo(nn.Module):
    """Linear -> LIF -> Linear -> PLIF, multi-step (kind a); a ReLU that is no neuron."""

    def __init__(self, sn2=None):
        super().__init__()
        self.fc1, self.sn1 = nn.Linear(4, 6), _sj(step_mode="m")
        self.act = nn.ReLU()
        self.fc2, self.sn2 = nn.Linear(6, 2), sn2 if sn2 is not None else _sj("ParametricLIFNode", step_mode="m")

    def forward(self, x):
        return self.sn2(self.fc2(self.act(self.sn1(self.fc1(x)))))


def test_multi_step_neurons_are_kind_a_one_call_each_in_order():
    gm = trace(SJTwo())
    sites = find_sites(gm)
    assert [s.path for s in sites] == ["sn1", "sn2"]  # the Linear and ReLU modules are no sites
    assert [s.kind for s in sites] == ["a", "a"]
    assert [len(s.calls) for s in sites] == [1, 1]
    for s in sites:
        (call,) = s.calls
        assert call.op == "call_module" and call.target == s.path and s.module is gm.get_submodule(s.path)
        assert s.spec is not None and s.spec.family == "spikingjelly" and s.reason == ""
        assert s.decision == "unchanged"  # detect decides nothing
    assert [s.framework for s in sites] == ["spikingjelly.LIFNode", "spikingjelly.ParametricLIFNode"]
    assert sites[1].spec.consts["kind"] == "plif" and "w" in sites[1].spec.params


def test_single_step_calls_in_a_loop_are_one_kind_b_site():
    gm = trace(models.LeakyLoop(T=4))
    (site,) = find_sites(gm)
    assert site.path == "lif" and site.kind == "b" and site.framework == "snntorch.Leaky"
    assert len(site.calls) == 4 and all(c.op == "call_module" and c.target == "lif" for c in site.calls)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    assert [order[c] for c in site.calls] == sorted(order[c] for c in site.calls)  # in graph order
    assert site.spec.family == "snntorch" and float(site.spec.params["beta"]) == 0.5


def test_spikingjelly_single_step_neurons_are_kind_b():
    class Steps(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.sn = nn.Linear(4, 4), _sj(step_mode="s")

        def forward(self, x):
            return torch.stack([self.sn(self.fc(x[t])) for t in range(2)])

    (site,) = find_sites(trace(Steps()))
    assert site.kind == "b" and len(site.calls) == 2


def test_norse_multi_step_and_cell():
    import norse.torch as norse

    seq = find_sites(trace(models.norse_sequential()))
    assert [(s.kind, s.spec.family, s.framework) for s in seq] == [("a", "norse_lif", "norse.LIF")] * 2
    (cell,) = find_sites(trace(models.NorseCellLoop(T=3)))
    assert cell.kind == "b" and len(cell.calls) == 3 and isinstance(cell.module, norse.LIFCell)


def test_a_neuron_revpass_cannot_represent_is_a_site_without_spec_and_says_why():
    gm = trace(SJTwo(sn2=_sj("QIFNode", step_mode="m")))
    sites = find_sites(gm)
    assert [s.path for s in sites] == ["sn1", "sn2"]
    assert sites[0].spec is not None
    assert sites[1].spec is None and "QIFNode is not supported" in sites[1].reason


def test_revpass_nodes_are_sites_already_converted():
    net = SJTwo()
    net.sn1 = revpass.ExactNode.from_neuron(net.sn1)
    net.sn2 = revpass.ReversibleNode.from_neuron(net.sn2)
    sites = find_sites(trace(net))
    assert [(s.path, s.kind, s.decision) for s in sites] == [("sn1", "a", "unchanged"), ("sn2", "a", "unchanged")]
    assert [s.reason for s in sites] == ["already a revpass exact node", "already a revpass reversible node"]
    assert all(s.spec is None for s in sites)


def test_a_graph_without_neurons_has_no_sites():
    assert find_sites(torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))) == []
