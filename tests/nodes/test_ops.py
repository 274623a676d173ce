"""The nodes are one custom op each: opcheck, one graph node, export, bad input."""

import pytest
import torch
from torch import nn

import revpass
from revpass.errors import UnsupportedNeuronError
from revpass.nodes import ops


def _lif():
    from spikingjelly.activation_based import neuron

    return neuron.ParametricLIFNode(step_mode="m")


@pytest.mark.parametrize("C", [4, 5])
def test_opcheck(C):
    node = revpass.ReversibleNode.from_neuron(_lif(), carry_state=False)
    x = torch.randn(5, 2, C, 3, requires_grad=True)
    params = list(node.params().values())
    need = 1
    torch.library.opcheck(ops.reversible_op, (x, [], params, node._config, need))
    state = [torch.randn(2, C, 3, requires_grad=True)]
    torch.library.opcheck(ops.reversible_op, (x, state, params, node._config, need))
    ex = revpass.ExactNode.from_neuron(_lif(), carry_state=False)
    torch.library.opcheck(ops.exact_op, (x, [], list(ex.params().values()), ex._config, need))
    torch.library.opcheck(ops.exact_op, (x, state, list(ex.params().values()), ex._config, need))


class _Net(nn.Module):
    def __init__(self, node):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.sn = node

    def forward(self, x):
        return self.sn(self.fc(x))


@pytest.mark.parametrize("cls,op", [(revpass.ReversibleNode, "revpass.reversible"), (revpass.ExactNode, "revpass.exact")])
def test_one_node_in_a_traced_graph(cls, op):
    net = _Net(cls.from_neuron(_lif(), carry_state=False))
    x = torch.randn(4, 2, 6)

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, (revpass.ReversibleNode, revpass.ExactNode)) or super().is_leaf_module(m, name)

    g = Tracer().trace(net)
    assert [n.target for n in g.nodes if n.op == "call_module"] == ["fc", "sn"]
    ep = torch.export.export(net, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum(t.startswith(op + ".") for t in targets) == 1
    assert torch.equal(ep.module()(x), net(x))


def test_torch_compile_matches_eager():
    net = _Net(revpass.ReversibleNode.from_neuron(_lif(), carry_state=False))
    x = torch.randn(4, 2, 6, requires_grad=True)
    y = net(x)
    g = torch.autograd.grad(y.sum(), [x, *net.parameters()])
    yc = torch.compile(net)(x)
    gc = torch.autograd.grad(yc.sum(), [x, *net.parameters()])
    assert torch.equal(y, yc)
    for a, b in zip(g, gc):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_surrogate_without_derivative_is_refused_by_name():
    from spikingjelly.activation_based import neuron, surrogate

    class Hard(nn.Module):
        def forward(self, x):
            return (x >= 0).float()

    with pytest.raises(UnsupportedNeuronError, match=r"layer1\.sn.*surrogate_function=Hard"):
        revpass.ReversibleNode.from_neuron(neuron.LIFNode(surrogate_function=Hard()), name="layer1.sn")
    with pytest.raises(UnsupportedNeuronError, match="spiking=False"):
        revpass.ExactNode.from_neuron(neuron.LIFNode(surrogate_function=surrogate.Sigmoid(spiking=False)))


def test_other_unrepresentable_settings_are_refused():
    import norse.torch as norse
    import snntorch as snn
    from spikingjelly.activation_based import neuron

    with pytest.raises(UnsupportedNeuronError, match="surrogate_disable"):
        revpass.ReversibleNode.from_neuron(snn.Leaky(beta=0.9, surrogate_disable=True))
    with pytest.raises(UnsupportedNeuronError, match="inhibition"):
        revpass.ReversibleNode.from_neuron(snn.Leaky(beta=0.9, inhibition=True))
    with pytest.raises(UnsupportedNeuronError, match="RLeaky"):
        revpass.ReversibleNode.from_neuron(snn.RLeaky(beta=0.9, linear_features=4))
    with pytest.raises(UnsupportedNeuronError, match="method='heaviside'"):
        revpass.ReversibleNode.from_neuron(norse.LIFCell(norse.LIFParameters(method="heaviside")))
    with pytest.raises(UnsupportedNeuronError, match="QIFNode"):
        revpass.ReversibleNode.from_neuron(neuron.QIFNode())
    with pytest.raises(ValueError, match="backward='recompute'"):
        revpass.ExactNode.from_neuron(neuron.LIFNode(), backward="recompute")


def test_non_floating_input_is_refused():
    node = revpass.ReversibleNode.from_neuron(_lif(), name="encoder.sn")
    with pytest.raises(TypeError, match=r"encoder\.sn.*torch\.int64"):
        node(torch.ones(4, 2, 6, dtype=torch.long))


@pytest.mark.parametrize("cls", [revpass.ReversibleNode, revpass.ExactNode])
def test_empty_batch_works(cls):
    node = cls.from_neuron(_lif(), carry_state=False)
    x = torch.randn(4, 0, 6, 3, requires_grad=True)
    y = node(x)
    assert y.shape == x.shape
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.shape == x.shape


def test_register_neuron_for_a_hand_written_lif():
    class MyLIF(nn.Module):
        def __init__(self, tau=2.0, v_th=1.0):
            super().__init__()
            self.tau, self.v_th = tau, v_th

        def forward(self, x_seq):
            v, out = torch.zeros_like(x_seq[0]), []
            for x in x_seq:
                h = v + (x - v) / self.tau
                s = (h >= self.v_th).to(x.dtype)
                v = h * (1 - s)
                out.append(s)
            return torch.stack(out)

    revpass.register_neuron(MyLIF, lambda m: revpass.lif_spec(tau=m.tau, v_threshold=m.v_th, origin="MyLIF"))
    m = MyLIF(tau=3.0)
    x = torch.randn(16, 2, 6, 3) + 0.6
    node = revpass.ExactNode.from_neuron(m, carry_state=False)
    assert torch.equal(node(x), m(x))
    rev = revpass.ReversibleNode.from_neuron(m, carry_state=False)
    ref = revpass.ReversibleNode.from_neuron(m, backward="autograd", carry_state=False)
    xx = x.clone().requires_grad_(True)
    a = torch.autograd.grad(rev(xx).sum(), xx)[0]
    b = torch.autograd.grad(ref(xx).sum(), xx)[0]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        revpass.register_neuron(int, lambda m: None)


_RUN_PROGRAM = """
import sys, torch
import revpass  # registers revpass's ops
ep = torch.export.load(sys.argv[1])
x = torch.load(sys.argv[2])
torch.save(ep.module()(x).detach(), sys.argv[3])
"""


def _run_elsewhere(tmp_path, ep, x):
    import subprocess
    import sys

    torch.export.save(ep, tmp_path / "p.pt2")
    torch.save(x, tmp_path / "x.pt")
    return subprocess.run([sys.executable, "-c", _RUN_PROGRAM, str(tmp_path / "p.pt2"), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["reversible", "exact"])
def test_exported_program_runs_in_another_process(mode, tmp_path):
    """The ops carry their configuration as an argument (not an index into a registry of this
    process): a converted model's program saved by torch.export runs where it is loaded."""
    from spikingjelly.activation_based import layer, neuron

    from revpass.state import reset_states

    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(6, 6, step_mode="m"), _lif(), layer.Linear(6, 5, step_mode="m"),
                        neuron.LIFNode(tau=3.0, step_mode="m"))
    x = torch.randn(4, 2, 6)
    conv = revpass.convert(net, x, mode=mode)
    reset_states(conv)
    ep = torch.export.export(conv, (x,))
    configs = [a for n in ep.graph.nodes if n.op == "call_function" for a in n.args if isinstance(a, str)]
    assert len(configs) == 2 and all('"family":"spikingjelly"' in c for c in configs)
    r = _run_elsewhere(tmp_path, ep, x)
    assert r.returncode == 0, r.stderr[-2000:]
    reset_states(conv)
    assert torch.equal(torch.load(tmp_path / "y.pt"), conv(x))


def test_a_program_with_a_users_own_surrogate_names_its_site_elsewhere(tmp_path):
    """A user's own surrogate is a Python function, which cannot travel inside a program: loaded
    in another process, the program says so, naming the site."""
    from spikingjelly.activation_based import neuron, surrogate

    lif = neuron.LIFNode(step_mode="m", surrogate_function=surrogate.PiecewiseLeakyReLU())
    net = _Net(revpass.ReversibleNode.from_neuron(lif, name="blocks.0.sn", carry_state=False))
    x = torch.randn(4, 2, 6)
    ep = torch.export.export(net, (x,))
    assert torch.equal(ep.module()(x), net(x))  # in this process it runs
    r = _run_elsewhere(tmp_path, ep, x)
    assert r.returncode != 0
    assert "blocks.0.sn" in r.stderr and "PiecewiseLeakyReLU" in r.stderr and "cannot travel" in r.stderr
