"""Spike-typed edges (revpass/passes/spikes.py, revpass/nodes/spike_input.py): a convolution,
linear layer or max pool that reads an exact node's spikes keeps them as bits, with the original's
output and gradients bit for bit."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch import nn

import models
import revpass
from revpass.nodes.spike_input import LayerOnSpikes, conv_on_spikes, linear_on_spikes, max_pool_on_spikes
from revpass.state import reset_states



def _on_spikes(gm):
    """The call nodes of the layers that keep their spike input as bits, and the functions."""
    return [(n, gm.get_submodule(n.target).fn) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LayerOnSpikes)]


def _saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs (parameters excluded)."""
    kept = []

    def pack(t):
        if not isinstance(t, nn.Parameter):
            kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept)


def _grads(fn, *ts):
    ts = [t.detach().requires_grad_() for t in ts]
    out = fn(*ts)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # the same for both
    return out, torch.autograd.grad(out, ts, g)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_convolution_on_spikes_is_the_convolution_and_keeps_bits(dims):
    torch.manual_seed(0)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](3, 5, 3, stride=2, padding=1, bias=True)
    x = (torch.rand(2, 3, *([9] * dims)) > 0.6).float()
    args = (dims, conv.stride, conv.padding, conv.dilation, conv.groups, False)
    (y, gs), (y_ref, gs_ref) = [_grads(f, x, conv.weight, conv.bias) for f in (
        lambda x, w, b: conv_on_spikes(x, w, b, *args),
        lambda x, w, b: torch.nn.functional.__dict__[f"conv{dims}d"](x, w, b, conv.stride, conv.padding))]
    assert torch.equal(y, y_ref) and all(torch.equal(a, b) for a, b in zip(gs, gs_ref))
    xx = x.clone().requires_grad_()
    _, kept = _saved_bytes(lambda: conv_on_spikes(xx, conv.weight, conv.bias, *args))
    assert kept == math.ceil(x.numel() / 8)  # the input as bits; the weight is a parameter


def test_a_linear_layer_and_a_max_pool_on_spikes_are_theirs_bit_for_bit():
    torch.manual_seed(0)
    fc = nn.Linear(12, 7)
    x = (torch.rand(4, 3, 12) > 0.5).float()
    (y, gs), (y_ref, gs_ref) = [_grads(f, x, fc.weight, fc.bias) for f in (linear_on_spikes, torch.nn.functional.linear)]
    assert torch.equal(y, y_ref) and all(torch.equal(a, b) for a, b in zip(gs, gs_ref))
    xx = x.clone().requires_grad_()
    assert _saved_bytes(lambda: linear_on_spikes(xx, fc.weight, fc.bias))[1] == math.ceil(x.numel() / 8)

    x = (torch.rand(3, 2, 4, 8, 8) > 0.7).float()  # (T, B, C, H, W), folded into the batch
    pool_args = (2, (2, 2), (2, 2), (0, 0), (1, 1), False, True)

    def ref(x):
        return nn.MaxPool2d(2)(x.flatten(0, 1)).view(3, 2, 4, 4, 4)

    (y, (g,)), (y_ref, (g_ref,)) = _grads(lambda x: max_pool_on_spikes(x, *pool_args), x), _grads(ref, x)
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)
    xx = x.clone().requires_grad_()
    assert _saved_bytes(lambda: max_pool_on_spikes(xx, *pool_args))[1] == math.ceil(x.numel() / 8)  # no indices
    with torch.no_grad():  # no gradient: the plain torch call
        assert torch.equal(max_pool_on_spikes(x, *pool_args), ref(x))


class _Products(TorchDispatchMode):
    """Counts the matrix products computed under it (on meta tensors, a shape is all that is)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += (func.__name__.split(".")[0] in ("mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "dot")
                       and not any(isinstance(a, torch.Tensor) and a.is_meta for a in args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape, bias", [((5, 12), True), ((4, 3, 12), True), ((4, 3, 12), False), ((12,), True),
                                         ((2, 4, 3, 12), True)])
def test_a_linear_layer_on_spikes_runs_autograds_backward_without_its_forward_product(shape, bias):
    """The backward builds autograd's own graph of F.linear (bit for bit, whatever products the
    input's shape makes it run) without computing its product again: as many products as
    autograd's backward, for 2-D, folded 3-D, unbiased and 1-D inputs."""
    fc = nn.Linear(12, 7, bias=bias)
    x = (torch.rand(*shape, generator=torch.Generator().manual_seed(2)) > 0.5).float().requires_grad_()
    counts, grads = [], []
    for f in (linear_on_spikes, torch.nn.functional.linear):
        fc.zero_grad(set_to_none=True)
        y = f(x, fc.weight, fc.bias)
        with _Products() as products:
            grads.append(torch.autograd.grad(y, [x, *fc.parameters()], torch.ones_like(y) * 0.37))
        counts.append(products.count)
    assert counts[0] == counts[1] >= 2  # the input's and the weight's gradient products, no forward's
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_a_linear_layer_on_spikes_holds_less_than_the_layer_in_a_training_step():
    """What the backward's uncomputed forward allocates counts in a training step's measured
    peak: its output, not the weight's bytes again (as it would, were its shapes found on meta
    tensors). Both make the weight's gradient; the plain layer keeps its input as floats, this one
    unpacks its bits in backward beside the product's output."""
    from revpass.memory import step_peak

    class Net(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fc, self.fn = nn.Linear(512, 256), fn

        def forward(self, x):
            return self.fn(x, self.fc.weight, self.fc.bias)

    x = (torch.rand(16, 512, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    ours, plain = step_peak(Net(linear_on_spikes), x), step_peak(Net(torch.nn.functional.linear), x)
    weight = 512 * 256 * 4
    assert weight <= plain < ours < plain + 3 * 16 * 512 * 4 < plain + weight // 2


@pytest.mark.parametrize("chunk", [1, 40, 200, 1 << 16])
def test_a_max_pool_on_spikes_runs_its_backward_in_chunks_bit_for_bit(chunk, monkeypatch):
    """Samples pool independently: the backward unpacks a chunk of them at a time (a sample of
    3 * 5 * 5 = 75 elements, not a whole byte: chunks start on a byte, 8 samples apart)."""
    from revpass.nodes import spike_input

    monkeypatch.setattr(spike_input, "POOL_CHUNK_ELEMS", chunk)
    x = (torch.rand(4, 5, 3, 5, 5, generator=torch.Generator().manual_seed(3)) > 0.6).float()
    pool_args = (2, (3, 3), (2, 2), (1, 1), (1, 1), True, True)

    def ref(x):
        return nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)(x.flatten(0, 1)).view(4, 5, 3, 3, 3)

    (y, (g,)), (y_ref, (g_ref,)) = _grads(lambda x: max_pool_on_spikes(x, *pool_args), x), _grads(ref, x)
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)


@pytest.fixture(scope="module")
def resnet():
    return models.sj_zoo_and_input("spiking_resnet18", 2, 2)


def test_exact_spiking_resnet_keeps_its_spike_inputs_as_bits_bit_for_bit(resnet):
    net, x = resnet
    gm = revpass.convert(net, x, mode="exact")
    found = _on_spikes(gm)
    # every conv but the stem's (it reads the image) and the max pool; the classifier reads an average
    assert [fn for _, fn in found].count(conv_on_spikes) == 19
    assert [fn for _, fn in found].count(max_pool_on_spikes) == 1 and len(found) == 20
    assert set(gm.state_dict()) == set(net.state_dict())  # the layers' parameters keep their keys
    layer = gm.get_submodule("layer1.0.conv1")
    assert isinstance(layer, LayerOnSpikes) and torch.equal(layer.weight, net.get_submodule("layer1.0.conv1").weight)
    for n, _ in found:
        info = n.meta["revpass"]
        assert info["strategy"] == "bits" and "keeps its spike input as bits" in info["reason"]
        shape = n.args[0].meta["revpass"]["shape"]
        assert info["kept_bytes"] == math.ceil(math.prod(shape) / 8)  # measured: its input's bits
    reset_states(net), reset_states(gm)
    xx, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = gm(xx), net(xr)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.equal(xx.grad, xr.grad)
    for (name, p), q in zip(net.named_parameters(), gm.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_a_reversible_nodes_readers_keep_what_they_kept(resnet):
    """A reversible node keeps its own output, which its readers share: bits would save nothing."""
    net, x = resnet
    gm = revpass.convert(net, x)
    assert not _on_spikes(gm)


def test_a_rolled_exact_node_s_steps_are_spikes_for_each_steps_layer():
    """A single-step neuron in a time loop, rolled into one node: each step's linear layer reads
    that step's spikes (unbind, getitem) and keeps them as bits."""
    from spikingjelly.activation_based import neuron

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.sn, self.fc2 = nn.Linear(6, 8), neuron.LIFNode(), nn.Linear(8, 3)

        def forward(self, x_seq):
            return torch.stack([self.fc2(self.sn(self.fc1(x))) for x in x_seq])

    torch.manual_seed(0)
    net, x = Loop(), torch.randn(4, 2, 6) * 3
    gm = revpass.convert(net, x, mode="exact")
    assert [fn for _, fn in _on_spikes(gm)] == [linear_on_spikes] * 4  # fc2, one call per step
    reset_states(net), reset_states(gm)
    out, ref = gm(x), net(x)
    assert torch.equal(out, ref)
    out.sum().backward(), ref.sum().backward()
    assert torch.equal(gm.fc1.weight.grad, net.fc1.weight.grad) and torch.equal(gm.fc2.weight.grad, net.fc2.weight.grad)


def test_spikes_modified_in_place_are_no_spikes():
    """s.mul_(2) after the neuron: fc2 reads 0 and 2, not spikes; it keeps its input as it was."""
    from spikingjelly.activation_based import neuron

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.sn1, self.fc2 = nn.Linear(6, 8), neuron.LIFNode(step_mode="m"), nn.Linear(8, 3)

        def forward(self, x):
            s = self.sn1(self.fc1(x))
            s.mul_(2.0)
            return self.fc2(s)

    torch.manual_seed(0)
    net, x = InPlace(), torch.randn(4, 2, 6) * 3
    gm = revpass.convert(net, x, mode="exact")
    assert not _on_spikes(gm)
    reset_states(net), reset_states(gm)
    out, ref = gm(x), net(x)
    assert torch.equal(out, ref)
    out.sum().backward(), ref.sum().backward()
    assert torch.equal(gm.fc1.weight.grad, net.fc1.weight.grad)


def test_a_converted_model_converted_again_keeps_its_layers_on_spikes(resnet):
    """LayerOnSpikes is a leaf of the tracer: converting again finds each as one call."""
    net, x = resnet
    once = revpass.convert(net, x, mode="exact")
    twice = revpass.convert(once, x, mode="exact")
    assert [n.target for n, _ in _on_spikes(twice)] == [n.target for n, _ in _on_spikes(once)]
    reset_states(once), reset_states(twice)
    assert torch.equal(once(x), twice(x))


def test_norse_spikes_are_bits_for_the_layer_after_them():
    """norse fires 0 or 1 (a heaviside forward whatever the surrogate): in a SequentialState
    the linear layer after the first LIF reads its (spikes, state)[0] and keeps it as bits (the
    gradients to a rounding: norse's exact node is not bit for bit norse's autograd)."""
    import norse.torch as norse

    torch.manual_seed(0)
    net = norse.SequentialState(nn.Linear(8, 6), norse.LIF(), nn.Linear(6, 4), norse.LIF())
    x = torch.randn(8, 2, 8) * 40 + 20
    gm = revpass.convert(net, x, mode="exact")
    assert [fn for _, fn in _on_spikes(gm)] == [linear_on_spikes]
    with torch.no_grad():
        assert net[1](net[0](x))[0].sum() > 0  # the linear layer reads real spikes
    reset_states(net), reset_states(gm)
    out, ref = gm(x)[0], net(x)[0]
    assert torch.equal(out, ref) and out.abs().sum() > 0
    g = torch.randn_like(out)
    (out * g).sum().backward(), (ref * g).sum().backward()
    for (name, p), q in zip(net.named_parameters(), gm.parameters()):  # norse's exact node: to a rounding
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
        assert p.grad.abs().sum() > 0
