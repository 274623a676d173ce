"""State behaves like the neuron replaced: reset(), reset_net, utils.reset, carried state."""

import torch
from torch import nn

import revpass
from catalogue import CASES, close, input_for


def _case(cid):
    return next(c for c in CASES if c.id == cid)


def test_reset_and_reset_net():
    from spikingjelly.activation_based import functional, neuron

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), neuron.LIFNode(step_mode="m"))
    x = torch.randn(8, 2, 3) + 0.5
    y_lib = net(x)
    net[1] = revpass.ExactNode.from_neuron(net[1])
    functional.invalidate_reset_cache(net)  # docs/frameworks/README.md, pitfall 3
    a = net(x)
    b = net(x)  # carries the state of the first call
    assert torch.equal(a, y_lib)
    assert not torch.equal(a, b)
    functional.reset_net(net)
    assert torch.equal(net(x), a)
    net[1].reset()
    assert torch.equal(net(x), a)


def test_carried_state_equals_one_long_sequence():
    case = _case("sj-lif")
    lib = case.make()
    x = input_for(case, 16).requires_grad_(True)
    for cls, modes in ((revpass.ReversibleNode, ("autograd", "optimized", "recompute")),
                       (revpass.ExactNode, ("autograd", "optimized"))):
        whole = cls.from_neuron(lib, carry_state=False)(x)
        grads = {}
        for b in modes:
            node = cls.from_neuron(lib, backward=b)
            if cls is revpass.ExactNode:
                y = torch.cat([node(x[:8]), node(x[8:])])
                assert torch.equal(y, whole)  # the exact node is a plain neuron: same sequence
            else:
                node.return_state = True  # the final state's gradient flows into the next call
                y1, _ = node(x[:8])
                y2, _ = node(x[8:])
                y = torch.cat([y1, y2])
            g = torch.sin(torch.arange(y.numel(), dtype=torch.float32)).reshape(y.shape)
            grads[b] = (y.detach(), torch.autograd.grad(y, x, g)[0])
        for b in modes[1:]:
            assert torch.equal(grads[b][0], grads["autograd"][0])
            assert close(grads[b][1], grads["autograd"][1]), (cls.__name__, b)


def test_explicit_state_like_snntorch():
    import snntorch as snn

    lib = snn.Leaky(beta=0.9)
    x = input_for(_case("snn-leaky"), 8)
    mem0 = torch.full_like(x[0], 0.7)
    mem = mem0
    out = []
    for t in range(8):
        s, mem = lib(x[t], mem)
        out.append(s)
    node = revpass.ExactNode.from_neuron(lib, step_mode="m")
    y, (u,) = node(x, (mem0,))
    assert torch.equal(y, torch.stack(out))
    assert torch.equal(u, mem)
    # by default a node built from an snnTorch neuron is single-step, as the neuron is (one
    # resolver of step modes: revpass.neurons.step_mode), and is called the same way
    step = revpass.ExactNode.from_neuron(lib)
    assert step.step_mode == "s" and revpass.neurons.step_mode(lib) == "s"
    mem, got = mem0, []
    for t in range(8):
        s, (mem,) = step(x[t], (mem,))
        got.append(s)
    assert torch.equal(torch.stack(got), torch.stack(out)) and torch.equal(mem, u)


def test_snntorch_utils_reset_keeps_working():
    import snntorch as snn
    from snntorch import utils

    net = nn.Sequential(nn.Linear(3, 6), snn.Leaky(beta=0.9, init_hidden=True))
    conv = nn.Sequential(net[0], revpass.ReversibleNode.from_neuron(net[1]))
    x = torch.randn(8, 2, 3)
    a = conv(x)
    utils.reset(conv)  # must not fail; snnTorch nodes start every call from the reset state
    assert torch.equal(conv(x), a)


def test_single_step_mode_carries_state_like_the_library():
    from spikingjelly.activation_based import functional, neuron

    lib = neuron.LIFNode()  # step_mode='s'
    node = revpass.ExactNode.from_neuron(lib)
    assert node.step_mode == "s"
    x = input_for(_case("sj-lif"), 6).requires_grad_(True)
    ys = [lib(x[t]) for t in range(6)]
    functional.reset_net(lib)
    yn = [node(x[t]) for t in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(ys, yn))
    g_lib = torch.autograd.grad(torch.stack(ys).sum(), x)[0]
    g_node = torch.autograd.grad(torch.stack(yn).sum(), x)[0]
    assert close(g_node, g_lib)


def test_norse_state_keeps_its_type():
    import norse.torch as norse

    lib = norse.LIF()
    x = input_for(_case("norse-lif"), 8)
    z_lib, s_lib = lib(x)
    node = revpass.ExactNode.from_neuron(lib, return_state=True)
    z, s = node(x)
    assert type(s).__name__ == "LIFFeedForwardState"
    assert torch.equal(z, z_lib) and torch.equal(s.v, s_lib.v) and torch.equal(s.i, s_lib.i)
    z2, s2 = node(x, s)  # a norse state passed back in continues the sequence
    z2_lib, _ = lib(x, s_lib)
    assert torch.equal(z2, z2_lib)


def test_snntorch_synaptic_explicit_state():
    import snntorch as snn

    lib = snn.Synaptic(alpha=0.8, beta=0.9)
    x = input_for(_case("snn-synaptic"), 8)
    syn0, mem0 = torch.full_like(x[0], 0.3), torch.full_like(x[0], 0.6)
    syn, mem, out = syn0, mem0, []
    for t in range(8):
        s, syn, mem = lib(x[t], syn, mem)
        out.append(s)
    y, (syn_n, mem_n) = revpass.ExactNode.from_neuron(lib, step_mode="m")(x, (syn0, mem0))
    assert torch.equal(y, torch.stack(out))
    assert torch.equal(syn_n, syn) and torch.equal(mem_n, mem)
