"""Recomputed segments (revpass/passes/segments.py, mode="recompute"): exact nodes whose feeding
layers are rebuilt in backward from spike inputs kept as bits. First on small traced graphs
(which nodes a segment takes, where it stops, what it reads), then through convert on real
models."""

import pytest
import torch
from torch import nn

import models
import revpass
from revpass.nodes.segment import RecomputeSegment
from revpass.state import reset_states
from catalogue import close, worst


def _segments(gm):
    return {n: m for n, m in gm.named_children() if isinstance(m, RecomputeSegment)}


def _grads(model, x, seed=1):
    reset_states(model)
    xx = x.detach().requires_grad_(True)
    y = model(xx)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    names = [n for n, p in model.named_parameters()]
    g = torch.autograd.grad((y * w).sum(), [xx, *model.parameters()])
    reset_states(model)
    return y.detach(), dict(zip(["x", *names], g))


# ----------------------------------------------------------------------------------------------
# the pass on small traced graphs
# ----------------------------------------------------------------------------------------------


def _chain(variant=""):
    """conv -> bn -> LIF -> pool -> conv -> LIF -> flatten -> linear (multi-step SpikingJelly);
    "bn-out": the batch norm's output is also returned (read outside any segment)."""
    from spikingjelly.activation_based import layer, neuron

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn = layer.Conv2d(2, 4, 3, padding=1, step_mode="m"), layer.BatchNorm2d(4, step_mode="m")
            self.sn1, self.pool = neuron.LIFNode(step_mode="m"), layer.MaxPool2d(2, step_mode="m")
            self.c2, self.sn2 = layer.Conv2d(4, 4, 3, padding=1, step_mode="m"), neuron.LIFNode(step_mode="m")
            self.flat, self.fc = layer.Flatten(step_mode="m"), layer.Linear(16, 3, step_mode="m")

        def forward(self, x):
            b = self.bn(self.c1(x))
            y = self.fc(self.flat(self.sn2(self.c2(self.pool(self.sn1(b))))))
            return (y, b) if variant == "bn-out" else y

    torch.manual_seed(0)
    return Chain()


def _exact_graph(net):
    """The traced net with exact nodes at its sites (what convert's rewrite leaves for "recompute")."""
    from revpass.passes.detect import find_sites
    from revpass.passes.rewrite import rewrite_site
    from revpass.trace import trace

    gm = trace(net)
    for site in find_sites(gm):
        rewrite_site(gm, site, "recompute", "optimized", {})
    gm.recompile()
    return gm


def _body(seg):
    return [str(n.target) for n in seg.body.graph.nodes if n.op not in ("placeholder", "output")]


def _x():
    return torch.randn(3, 2, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 + 0.5


@pytest.mark.parametrize("singles", [True, False])
def test_form_segments_on_a_small_graph(singles):
    from revpass.passes.segments import form_segments
    from revpass.utils import safe_deepcopy

    gm = _exact_graph(_chain())
    plain = safe_deepcopy(gm)
    keys = set(gm.state_dict())
    out = form_segments(gm, (_x(),), {"sn1", "sn2"}, singles=singles)
    # one segment per site, from the input or the previous neuron's spikes up to the node, and on
    # to the max pool after it (it only shrinks the spikes: the segment returns the pooled ones).
    # The linear layer after the last neuron reads only spikes: with singles it would be a segment
    # of its own, but it has a form that keeps them as bits without running again (the bits pass
    # puts it in place after this one), so it stays as it is
    assert out == [("revpass_segment_0", ["sn1"]), ("revpass_segment_1", ["sn2"])]
    segs = _segments(gm)
    assert _body(segs["revpass_segment_0"]) == ["c1", "bn", "sn1", "pool"]
    assert segs["revpass_segment_0"].sites == ("sn1",)
    assert _body(segs["revpass_segment_1"]) == ["c2", "sn2"]
    # in the body, the convolution reads the segment's spike input: it keeps it as bits in the rebuild
    assert type(segs["revpass_segment_1"].body.get_submodule("c2")).__name__ == "LayerOnSpikes"
    assert type(gm.get_submodule("c2")).__name__ != "LayerOnSpikes"  # the model's own module stays
    calls = [(n.op, str(n.target)) for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert calls == [("call_module", "revpass_segment_0"), ("call_module", "revpass_segment_1"),
                     ("call_module", "flat"), ("call_module", "fc")]
    seg1 = next(n for n in gm.graph.nodes if n.target == "revpass_segment_1")
    assert [a.target for a in seg1.args] == ["revpass_segment_0"]  # it reads sn1's pooled spikes
    assert seg1.meta["revpass_replaces"] == ["c2", "sn2"]
    assert seg1.meta["revpass_strategy"][0] == "recompute"
    assert set(gm.state_dict()) == keys  # the segments own no parameters
    # the same function, the same gradients (the same ops; sums in another order at most)
    y0, g0 = _grads(plain, _x())
    y1, g1 = _grads(gm, _x())
    assert torch.equal(y0, y1) and y1.abs().sum() > 0
    for k in g0:
        assert close(g1[k], g0[k]), (k, worst(g1[k], g0[k]))


def test_the_chunk_check_runs_the_model_only_as_far_as_its_last_segment():
    """Forming segments runs the example inputs through the model to measure it, and again to
    check each segment's chunks on its inputs: the second run stops after the last segment (the
    linear layer after it, which on a VGG's classifier is most of the run's time, runs once)."""
    from revpass.passes.segments import form_segments

    gm = _exact_graph(_chain())
    calls = []
    gm.get_submodule("fc").register_forward_hook(lambda m, a, y: calls.append(tuple(y.shape)))
    form_segments(gm, (_x(),), {"sn1", "sn2"})
    segs = _segments(gm)
    assert all(s.chunking is not None for s in segs.values())  # both checked, and both can
    assert calls == [(3, 2, 3)]  # the measuring run's call only


def test_conversions_of_one_graph_share_its_measurement(monkeypatch):
    """The planner's conversions of one plan (each joining other segments) measure the same graph
    before forming segments: with a shared memo it is measured once, and again where a module
    is configured otherwise (the planner's copies share the trace's parameters)."""
    from revpass.passes import segments
    from revpass.utils import scratch_copy

    runs = []
    real = segments.measure
    monkeypatch.setattr(segments, "measure", lambda *a, **k: runs.append(1) or real(*a, **k))
    base = _exact_graph(_chain())
    measured, formed = {}, []
    for joined in (frozenset(), {"sn1"}, frozenset()):
        gm = scratch_copy(base)
        formed.append(segments.form_segments(gm, (_x(),), {"sn1", "sn2"}, joined=joined, measured=measured))
    assert len(runs) == 1 and len(measured) == 1
    assert formed[0] == formed[2] == [("revpass_segment_0", ["sn1"]), ("revpass_segment_1", ["sn2"])]
    assert formed[1] == [("revpass_segment_0", ["sn1", "sn2"])]  # sn1's segment joined to sn2's
    gm = scratch_copy(base)
    gm.get_submodule("sn2").set_slicing(64)
    segments.form_segments(gm, (_x(),), {"sn1", "sn2"}, measured=measured)
    assert len(runs) == 2 and len(measured) == 2


def test_a_linear_layer_on_repeated_spikes_keeps_checked_bits_instead_of_running_again():
    """An adaptive average pool that repeats its input (SpikingJelly's VGG on 32x32 images: 1x1
    maps to 7x7) gives 0s and 1s, but not by construction: at another input size it averages.
    The linear layer reading it would be a segment of its own (its bits, at the cost of running it
    again in backward); it keeps the same bits checked at every call instead, and where a call's
    input is not 0/1 it keeps that input as it is, with the original's output and gradients."""
    from spikingjelly.activation_based import layer, neuron

    from revpass.nodes.spike_input import LayerOnSpikes

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.sn = layer.Conv2d(2, 4, 3, padding=1, step_mode="m"), neuron.LIFNode(step_mode="m")
            self.pool = layer.AdaptiveAvgPool2d((2, 2), step_mode="m")
            self.flat, self.fc = layer.Flatten(step_mode="m"), layer.Linear(16, 3, step_mode="m")

        def forward(self, x):
            return self.fc(self.flat(self.pool(self.sn(self.c(x)))))

    torch.manual_seed(0)
    net = Net()

    def x_of(size):
        return torch.randn(3, 2, 2, size, size, generator=torch.Generator().manual_seed(size)) * 2 + 1

    gm = revpass.convert(net, x_of(1), mode="recompute")
    assert isinstance(gm.fc, LayerOnSpikes) and gm.fc.checked
    assert all("fc" not in _body(seg) for seg in _segments(gm).values())

    def kept(size):  # bytes the linear layer keeps for its input, and the whole net's output and gradients
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t) or t, lambda t: t):
            x = gm.flat(gm.pool(torch.randint(0, 2, (3, 2, 4, size, size)).float()))
            gm.fc(x.requires_grad_())
        weights = {p.untyped_storage().data_ptr() for p in gm.fc.parameters()}
        return sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() not in weights)

    assert kept(1) == 3 * 2 * 16 // 8  # bits
    assert kept(3) == 3 * 2 * 16 * 4  # 3x3 maps pooled to 2x2 average: not 0/1, kept as it is
    for size in (1, 3):
        y0, g0 = _grads(net, x_of(size))
        y1, g1 = _grads(gm, x_of(size))
        assert torch.equal(y0, y1) and y1.abs().sum() > 0
        for k in g0:
            assert close(g1[k], g0[k]), (size, k, worst(g1[k], g0[k]))


def test_grow_stops_at_neurons_inputs_and_values_read_outside():
    from revpass.passes.segments import grow

    gm = _exact_graph(_chain("bn-out"))
    node = {n.name: n for n in gm.graph.nodes}
    tensors = set(node)
    first = grow(gm, node["sn1"], set(), tensors)
    # the batch norm's output is also an output of the graph: it leaves the segment, and with it
    # everything before it (a segment has no side entrances)
    assert [n.name for n in first] == ["sn1"]
    second = grow(gm, node["sn2"], set(), tensors)
    assert [n.name for n in second] == ["pool", "c2", "sn2"]  # stops at sn1, a neuron
    # a node another segment took is not taken again
    assert [n.name for n in grow(gm, node["sn2"], {node["pool"]}, tensors)] == ["c2", "sn2"]
    # an end that reads a value that is not a tensor forms no segment
    assert grow(gm, node["sn2"], set(), tensors - {"c2"}) is None


@pytest.fixture(scope="module")
def resnet():
    return models.sj_zoo_and_input("spiking_resnet18", 4, 2)


def test_resnet_recompute_is_the_original_function_and_keeps_its_spikes_as_bits(resnet):
    net, x = resnet
    keys = set(net.state_dict())
    gm = revpass.convert(net, x, mode="recompute")
    assert set(gm.state_dict()) == keys  # the segments own no parameters: same keys, one copy
    assert gm.revpass_report.count("recompute") == 17
    segs = _segments(gm)
    assert sorted(s for m in segs.values() for s in m.sites) == sorted(r.path for r in gm.revpass_report)
    # every segment after the first reads spikes only: kept as 1 bit per element (a segment
    # rebuilt in chunks keeps its neurons' spikes as bits too: tests/nodes/test_chunks.py)
    from revpass.planning.memory_plan import plan_of

    plan = plan_of(gm, "recompute")
    assert plan.kept_before / plan.kept_after > 50
    assert gm.get_submodule("revpass_segment_0").sites == ("sn1",)
    T, B = x.shape[:2]
    unchunked = 0
    for n in gm.graph.nodes:
        if (n.op == "call_module" and n.target in segs and n.target != "revpass_segment_0"
                and segs[n.target].chunk_shape(T, B) == (B, T)):
            bits = sum((torch.Size(a.meta["revpass"]["shape"]).numel() + 7) // 8 for a in n.all_input_nodes)
            assert n.meta["revpass"]["kept_bytes"] == bits, n.name
            assert n.meta["revpass"]["strategy"] == "recompute" and n.meta["revpass"]["workspace_bytes"] > 0
            unchunked += 1
    assert unchunked >= 10
    y0, g0 = _grads(net, x)
    y1, g1 = _grads(gm, x)
    assert torch.equal(y0, y1)
    assert set(g0) == set(g1)
    for k in g0:  # same function, same ops: float32 sums in another order at most
        assert close(g1[k], g0[k]) or worst(g1[k], g0[k]) < 10, (k, worst(g1[k], g0[k]))
    assert revpass.verify(net, gm, x).passed


def test_running_statistics_are_updated_once_and_state_survives_a_reset(resnet):
    from spikingjelly.activation_based import functional

    net, x = resnet
    orig = revpass.convert(net, x, exclude="*")  # the traced original, same modules
    gm = revpass.convert(net, x, mode="recompute")
    for m in (orig, gm):
        reset_states(m)
        y = m(x)
        functional.reset_net(m)  # a reset between forward and backward (as training loops do)
        y.sum().backward()
    for (name, a), (_, b) in zip(orig.named_buffers(), gm.named_buffers()):
        assert torch.equal(a, b), name  # running_mean/var, num_batches_tracked: one update each
    assert all(m.state is None for m in gm.modules() if isinstance(m, revpass.ExactNode))


class DropNet(nn.Module):
    """conv -> dropout -> LIF, twice: a segment with randomness inside."""

    def __init__(self):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron

        self.c1 = layer.Conv2d(2, 6, 3, padding=1, step_mode="m")
        self.d1 = layer.Dropout(0.3, step_mode="m")
        self.n1 = neuron.LIFNode(step_mode="m")
        self.c2 = layer.Conv2d(6, 4, 3, padding=1, step_mode="m")
        self.n2 = neuron.LIFNode(step_mode="m")

    def forward(self, x):
        return self.n2(self.c2(self.n1(self.d1(self.c1(x)))))


def check_dropout_replay(device="cpu", slack=1.0):
    """A segment with dropout inside: the rebuild draws the same mask (same outputs, gradients
    within section 7, times ``slack``)."""
    torch.manual_seed(0)
    net = DropNet().to(device)
    x = torch.randn(5, 3, 2, 6, 6, device=device) * 2 + 1
    gm = revpass.convert(net, x, mode="recompute")
    assert any("d1" in str(n.target) for m in _segments(gm).values() for n in m.body.graph.nodes)
    torch.manual_seed(7)
    y0, g0 = _grads(net, x)
    torch.manual_seed(7)
    y1, g1 = _grads(gm, x)
    assert torch.equal(y0, y1)
    for k in g0:
        assert worst(g1[k], g0[k]) <= slack, (k, worst(g1[k], g0[k]))


def test_dropout_in_a_segment_draws_the_same_mask_in_the_rebuild():
    check_dropout_replay()


def test_rolled_snntorch_sites_and_a_non_spike_input():
    net = models.SnnTorchConv(num_steps=4, batch_size=4)
    x = torch.randn(4, 1, 28, 28) * 2
    gm = revpass.convert(net, x, mode="recompute")
    rep = gm.revpass_report
    assert rep.by_path("lif1").decision == "recompute" and rep.by_path("lif3").decision == "unchanged"
    assert "revpass_segment_" in rep.by_path("lif1").reason
    first = gm.get_submodule("revpass_segment_0")
    assert [p for p in first.body.graph.nodes if p.op == "placeholder"][0].name == "x"  # the image: kept as is
    assert revpass.verify(net, gm, x).passed


def test_recompute_needs_example_inputs_and_forward_without_grad_works(resnet):
    net, x = resnet
    with pytest.raises(ValueError, match="recompute.*needs example_inputs"):
        revpass.convert(net, mode="recompute")
    gm = revpass.convert(net, x, mode="recompute")
    reset_states(gm), reset_states(net)
    with torch.no_grad():
        assert torch.equal(gm(x), net(x))
    reset_states(net)


def test_rebuilt_output_values_are_freed_before_the_gradients(monkeypatch):
    """A segment's backward frees its rebuilt output's storage once the graph exists (only the
    graph is differentiated): one output's worth less at its peak; gradients unchanged."""
    from spikingjelly.activation_based import layer, neuron

    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1, step_mode="m"), layer.BatchNorm2d(4, step_mode="m"),
                        neuron.LIFNode(step_mode="m"))
    x = torch.randn(3, 2, 2, 6, 6)
    gm = revpass.convert(net, x, mode="recompute")
    assert any(isinstance(m, RecomputeSegment) for m in gm.modules())
    for m in gm.modules():  # rebuilt whole (a chunk's output is freed by dropping it: revpass/nodes/chunks.py)
        if isinstance(m, RecomputeSegment) and m.chunking is not None:
            m.chunk_elems = 2 * m.sample_elems
    out_bytes = 3 * 2 * 4 * 6 * 6 * 4
    freed = []
    real = torch.UntypedStorage.resize_

    def resize_(st, n):
        freed.append((st.nbytes(), n))
        return real(st, n)

    monkeypatch.setattr(torch.UntypedStorage, "resize_", resize_)
    reset_states(gm)
    xl = x.clone().requires_grad_(True)
    g = torch.autograd.grad(gm(xl).sum(), [xl, gm.get_submodule("0").weight])
    monkeypatch.undo()
    assert (out_bytes, 0) in freed
    reset_states(gm)
    exact = revpass.convert(net, x, mode="exact")
    ref = torch.autograd.grad(exact(xl).sum(), [xl, exact.get_submodule("0").weight])
    for a, b in zip(g, ref):
        assert close(a, b), worst(a, b)
