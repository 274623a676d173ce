"""A recomputed segment's backward a chunk of the batch at a time (revpass/nodes/chunks.py,
docs/method.md section 13): the same gradients as the whole rebuild, the forward untouched, a
fallback when a chunk's spikes differ, segments that mix samples left whole, less memory, and the
chunk sizes the conversion picks."""

import warnings

import pytest
import torch
from torch import nn

import models
import revpass
from catalogue import close, worst
from revpass.nodes import chunks
from revpass.nodes.segment import RecomputeSegment
from revpass.state import reset_states


class Block(nn.Module):
    """conv -> bn -> LIF -> max pool, then a residual block (conv -> bn, + identity -> LIF) and a
    linear read-out: multi-step SpikingJelly, every segment with a batch norm."""

    def __init__(self, mix: str = ""):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron

        self.c1, self.bn1 = layer.Conv2d(2, 4, 3, padding=1, step_mode="m"), layer.BatchNorm2d(4, step_mode="m")
        self.sn1, self.pool = neuron.LIFNode(step_mode="m"), layer.MaxPool2d(2, step_mode="m")
        self.c2, self.bn2 = layer.Conv2d(4, 4, 3, padding=1, step_mode="m"), layer.BatchNorm2d(4, step_mode="m")
        self.sn2 = neuron.LIFNode(step_mode="m")
        self.flat, self.fc = layer.Flatten(step_mode="m"), layer.Linear(4 * 3 * 3, 3, step_mode="m")
        self.mix = mix

    def forward(self, x):
        c = self.c1(x)
        if self.mix == "batch-mean":  # mixes the samples of the batch: no chunk reproduces it
            c = c - c.mean(dim=1, keepdim=True)
        if self.mix == "step-mean":  # mixes the steps of a sample: chunks of samples only
            c = c - c.mean(dim=0, keepdim=True)
        s = self.pool(self.sn1(self.bn1(c)))
        return self.fc(self.flat(self.sn2(self.bn2(self.c2(s)) + s)))


def _segments(gm):
    return {n: m for n, m in gm.named_modules() if isinstance(m, RecomputeSegment)}


def _per(gm, per, steps=None):
    for seg in _segments(gm).values():
        if seg.chunking is not None:
            seg.chunk_elems = per * seg.sample_elems if steps is None else seg.chunk_elems_of(per, steps)


def _grads(model, x, seed=3):
    reset_states(model)
    y = model(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    g = torch.autograd.grad((y * w).sum(), list(model.parameters()))
    reset_states(model)
    return y.detach(), dict(zip([n for n, _ in model.named_parameters()], g))


def _grads_in_chunks(gm, x):
    """_grads of ``gm`` with chunks.backward watched: (output, gradients, for each call whether it
    ran in chunks rather than falling back to the whole rebuild)."""
    calls = []
    real = chunks.backward

    def spy(*args, **kwargs):
        got = real(*args, **kwargs)
        calls.append(got is not None)
        return got

    chunks.backward = spy
    try:
        y, g = _grads(gm, x)
    finally:
        chunks.backward = real
    return y, g, calls


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    net = Block()
    x = torch.randn(3, 5, 2, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 + 0.5  # T=3, batch 5
    return net, x


def test_segments_that_can_run_in_chunks_and_what_they_keep(block):
    net, x = block
    gm = revpass.convert(net, x, mode="recompute")
    segs = _segments(gm)
    ends = {s.sites[0]: s for s in segs.values() if s.sites}
    assert set(ends) == {"sn1", "sn2"}
    assert ends["sn1"].chunking is not None and ends["sn2"].chunking is not None
    # the max pool after sn1 joined its segment: the segment returns the pooled spikes
    assert [str(n.target) for n in ends["sn1"].body.graph.nodes if n.op == "call_module"] == ["c1", "bn1", "sn1",
                                                                                               "pool"]
    assert "can be rebuilt a chunk of the batch at a time" in gm.revpass_report.by_path("sn1").reason
    # what a chunked segment keeps besides its inputs: each batch norm's mean and 1/std, each
    # neuron's spikes as bits, one byte row per (step, sample) plane
    _per(gm, 2)
    kept = []
    reset_states(gm)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        gm(x)
    sizes = sorted(t.numel() * t.element_size() for t in kept)
    assert sizes.count(4 * 4) >= 4  # two batch norms' mean and 1/std: 4 channels of float32
    assert 3 * 5 * ((4 * 6 * 6 + 7) // 8) in sizes  # sn1's spikes: T x B planes of 144 bits
    reset_states(gm)


@pytest.mark.parametrize("per", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunks_give_the_whole_rebuilds_gradients(block, per, dtype):
    net, x = block
    net, x = net.to(dtype), x.to(dtype)
    gm = revpass.convert(net, x, mode="recompute")
    _per(gm, 10)  # unchunked: the segment rebuilt whole, as before chunks existed
    y0, g0 = _grads(gm, x)
    _per(gm, per)
    y1, g1, calls = _grads_in_chunks(gm, x)
    assert calls == [True, True]  # both segments ran in chunks (5 samples: the last chunk smaller)
    assert torch.equal(y0, y1) and torch.equal(y0, _grads(net, x)[0])  # the forward is untouched
    assert set(g0) == set(g1) and all(g is not None for g in g1.values())
    for k in g0:  # the batch norms' sums over chunks, in another order: float32 rounding at most
        assert close(g1[k], g0[k], dtype) or (dtype == torch.float32 and worst(g1[k], g0[k]) < 10), (
            k, worst(g1[k], g0[k], dtype))
    assert all(s.whole_rebuilds == 0 for s in _segments(gm).values())
    net.float()


@pytest.mark.parametrize("steps", [1, 2])
def test_chunks_of_time_steps_give_the_whole_rebuilds_gradients(block, steps):
    """A chunk smaller than a sample: its steps a part at a time, from the last, each starting
    from the neurons' states rebuilt at its start, the gradient of its final states carried to
    the part before (T = 3: parts of 1 step, or of 2 and 1)."""
    net, x = block
    net, x = net.double(), x.double()
    gm = revpass.convert(net, x, mode="recompute")
    assert all(s.in_time for s in _segments(gm).values() if s.chunking is not None)
    seen = []
    real = chunks.backward

    def spy(*args, **kwargs):
        seen.append(args[-2:])  # (samples, steps) per chunk
        return real(*args, **kwargs)

    _per(gm, 10)
    y0, g0 = _grads(gm, x)
    _per(gm, 1, steps)
    chunks.backward = spy
    try:
        y1, g1 = _grads(gm, x)
    finally:
        chunks.backward = real
    assert seen == [(1, steps), (1, steps)]
    assert torch.equal(y0, y1)
    for k in g0:
        assert close(g1[k], g0[k], torch.float64), (k, worst(g1[k], g0[k], torch.float64))
    assert all(s.whole_rebuilds == 0 for s in _segments(gm).values())
    # what a chunk of steps holds: a part of one sample's steps, not all of them
    seg = next(s for s in _segments(gm).values() if s.sites == ("sn1",))
    assert seg.chunk_shape(3, 5) == (1, steps)
    net.float()


def test_a_chunked_backward_leaves_nothing_for_the_garbage_collector(block):
    """Rebuilt a part of a sample's steps at a time, a segment's backward frees what it kept (its
    input's bits) when it returns, not when the garbage collector next runs: the bisection of the
    starts was a closure calling itself, a reference cycle through the backward's inputs, and
    spiking_resnet18's layer1 segments held their inputs' bits to the end of the step (0.22 MiB
    of a 5.95 MiB peak at T = 16)."""
    import gc

    net, x = block
    gm = revpass.convert(net, x, mode="recompute")
    _per(gm, 1, 1)
    gc.collect()
    gc.disable()
    try:
        reset_states(gm)
        gm(x).sum().backward()
        left = [o for o in gc.get_objects() if isinstance(o, chunks.Packed)]
    finally:
        gc.enable()
        reset_states(gm)
    assert any(s.in_time and s.chunk_shape(3, 5) == (1, 1) for s in _segments(gm).values())
    assert left == []


def test_a_segment_that_mixes_steps_is_chunked_by_samples_only():
    torch.manual_seed(0)
    net = Block(mix="step-mean")
    x = torch.randn(3, 4, 2, 6, 6) * 2 + 0.5
    gm = revpass.convert(net, x, mode="recompute")
    first = next(s for s in _segments(gm).values() if s.sites == ("sn1",))
    assert first.chunking is not None and not first.in_time
    first.chunk_elems = 1  # as small as can be: one sample, all its steps
    assert first.chunk_shape(3, 4) == (1, 3)
    second = next(s for s in _segments(gm).values() if s.sites == ("sn2",))
    assert second.in_time
    y0, g0 = _grads(net, x)
    y1, g1 = _grads(gm, x)
    assert torch.equal(y0, y1)
    for k in g0:
        assert close(g1[k], g0[k]) or worst(g1[k], g0[k]) < 10, (k, worst(g1[k], g0[k]))


def test_a_neuron_that_does_not_carry_its_state_keeps_chunks_to_samples(block):
    net, x = block
    gm = revpass.convert(net, x, mode="recompute")
    seg = next(s for s in _segments(gm).values() if s.sites == ("sn1",))
    node = next(m for m in seg.body.modules() if isinstance(m, revpass.nodes.Node))
    node.carry_state = False
    try:
        plan = chunks.Plan(seg.body)
        assert plan.why_not_in_time == "sn1 does not carry its state from one call to the next"
        assert chunks.check(plan, [x], 1, 1) == plan.why_not_in_time
        assert chunks.check(plan, [x], 1) is None
    finally:
        node.carry_state = True


def test_an_input_kept_as_bits_unpacks_a_chunk_at_a_time():
    from revpass.nodes.bits import pack_flat

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 5, 4, 3, 3, generator=g) > 0.5).float()  # 36 elements a sample and step: not whole bytes
    packed = chunks.Packed(pack_flat(x), x.shape, x.dtype)
    assert torch.equal(packed.whole(), x)
    for a, b, t0, t1 in [(0, 5, 0, 3), (1, 2, 0, 3), (3, 5, 1, 2), (4, 5, 2, 3), (0, 3, 1, 3)]:
        assert torch.equal(packed.block(a, b, t0, t1), x[t0:t1, a:b]), (a, b, t0, t1)
    y = (torch.rand(3, 5, 2, 2, 4, generator=g) > 0.5).float()  # 16 elements: each sample's step on a byte
    packed = chunks.Packed(pack_flat(y), y.shape, y.dtype)
    for a, b, t0, t1 in [(1, 2, 0, 3), (3, 5, 1, 2), (0, 4, 2, 3)]:
        assert torch.equal(packed.block(a, b, t0, t1), y[t0:t1, a:b]), (a, b, t0, t1)


def test_a_chunk_whose_spikes_differ_rebuilds_the_segment_whole(block, monkeypatch):
    """The chunk's batch norm is a formula, not the module's kernel: were a membrane to land on
    the other side of the threshold, the chunk would differentiate another function. The spikes
    kept from the forward catch it, and the segment is rebuilt whole (the same gradients)."""
    net, x = block
    gm = revpass.convert(net, x, mode="recompute")
    _per(gm, 10)
    _, g0 = _grads(gm, x)
    _per(gm, 2)
    real = chunks._Normalize.forward

    def shifted(ctx, *args):
        return real(ctx, *args) + 0.5  # spikes change

    monkeypatch.setattr(chunks._Normalize, "forward", staticmethod(shifted))
    with pytest.warns(RuntimeWarning, match="rebuilt whole") as warned:
        _, g1 = _grads(gm, x)
    assert sum(s.whole_rebuilds for s in _segments(gm).values()) == 2
    # said once per segment, naming it
    said = [str(w.message) for w in warned if "rebuilt whole" in str(w.message)]
    assert sorted(m.split(":")[1].split()[-1] for m in said) == sorted(_segments(gm)), said
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _grads(gm, x)  # the second time it falls back, no warning
    assert sum(s.whole_rebuilds for s in _segments(gm).values()) == 4
    for k in g0:
        assert torch.equal(g1[k], g0[k]), k


def test_a_segment_that_mixes_samples_is_rebuilt_whole():
    torch.manual_seed(0)
    net = Block(mix="batch-mean")
    x = torch.randn(3, 4, 2, 6, 6) * 2 + 0.5
    gm = revpass.convert(net, x, mode="recompute")
    first = next(s for s in _segments(gm).values() if s.sites == ("sn1",))
    assert first.chunking is None
    assert "rebuilt whole: a chunk's output differs" in gm.revpass_report.by_path("sn1").reason
    y0, g0 = _grads(net, x)
    y1, g1 = _grads(gm, x)
    assert torch.equal(y0, y1)
    for k in g0:
        assert close(g1[k], g0[k]) or worst(g1[k], g0[k]) < 10, (k, worst(g1[k], g0[k]))


def test_plan_takes_a_pass_per_level_of_batch_norms():
    from spikingjelly.activation_based import layer, neuron

    from revpass.passes.detect import find_sites
    from revpass.passes.rewrite import rewrite_site
    from revpass.trace import trace

    gm = trace(nn.Sequential(layer.BatchNorm2d(2, step_mode="m"), layer.BatchNorm2d(2, step_mode="m"),
                             neuron.LIFNode(step_mode="m")))
    for site in find_sites(gm):
        rewrite_site(gm, site, "recompute", "optimized", {})
    gm.recompile()
    plan = chunks.Plan(gm)
    names = lambda ns: [n.name for n in ns]  # noqa: E731
    bn0, bn1 = plan.bns
    assert plan.levels == [[bn0], [bn1]]
    # the second level's pass rebuilds the first batch norm without gradients; the first level's
    # differentiates from the first's input through both and the neuron
    assert names(plan.upstream_of[1]) == [bn0.name] and names(plan.upstream_of[0]) == []
    assert names(plan.rest_of[0]) == [bn0.name, bn1.name, *names(plan.neurons)]


@pytest.mark.parametrize("per,steps", [(1, None), (2, None), (1, 1), (1, 2)])
def test_a_joined_segment_rebuilds_both_layers_in_chunks_with_the_whole_rebuilds_gradients(block, per, steps):
    """sn1's segment joined to sn2's: conv -> bn -> LIF -> pool -> conv -> bn (+) -> LIF in one
    rebuild, two levels of batch norms, so three passes over the chunks; the gradient between the
    two layers exists a chunk at a time."""
    from revpass import api

    net, x = block
    net, x = net.double(), x.double()
    gm = api._pipeline(net, x, api._Options(mode="recompute", backward="optimized", joined=frozenset({"sn1"})))
    (seg,) = [s for s in _segments(gm).values() if s.sites]
    assert seg.sites == ("sn1", "sn2") and seg.chunking is not None and seg.in_time
    assert [str(n.target) for n in seg.body.graph.nodes if n.op == "call_module"] == [
        "c1", "bn1", "sn1", "pool", "c2", "bn2", "sn2"]
    assert len(seg.chunking.levels) == 2
    assert "joined" in gm.revpass_report.by_path("sn1").reason
    _per(gm, 10)
    y0, g0 = _grads(gm, x)
    _per(gm, per, steps)
    y1, g1, calls = _grads_in_chunks(gm, x)
    assert calls == [True]
    assert torch.equal(y0, y1) and torch.equal(y1, _grads(net, x)[0])
    assert set(g0) == set(g1) and all(g is not None for g in g1.values())
    for k in g0:
        assert close(g1[k], g0[k], torch.float64), (k, worst(g1[k], g0[k], torch.float64))
    assert seg.whole_rebuilds == 0
    net.float()


def test_a_chunk_normalizes_with_the_kernels_own_statistics_bit_for_bit(resnet):
    """The forward keeps the statistics the batch-norm kernel computed, not ones found again
    (torch.var_mean rounds some channels' otherwise): with them a chunk's batch norm is the
    forward's output bit for bit, so no membrane moves across the threshold. In the 30 SGD steps
    below on spiking_resnet18 (two threads), var_mean's statistics made 2 steps rebuild the
    stem's segment whole (its chunk's spikes differed); now none."""
    from revpass.nodes.batchnorm import statistics

    from types import SimpleNamespace

    net, x = resnet
    g = torch.Generator().manual_seed(5)
    bn = type("BatchNormNode", (), {"target": "bn"})()  # a plan of one batch norm: what forward_hooks reads
    plan = SimpleNamespace(bns=[bn], neurons=[], body=nn.ModuleDict({"bn": net.bn1}))
    found_again = 0
    for i in range(4):
        with torch.no_grad():
            c = net.conv1(torch.randn(x.shape, generator=g) * (1 + i))
        stats = {}
        handles = chunks.forward_hooks(plan, stats, {})
        try:
            with torch.no_grad():
                z = net.bn1(c)
        finally:
            for h in handles:
                h.remove()
        mean, invstd = stats[bn]
        _, kmean, kinvstd = torch.ops.aten.native_batch_norm(c.flatten(0, 1), net.bn1.weight, net.bn1.bias, None,
                                                             None, True, 0.0, net.bn1.eps)
        assert torch.equal(mean, kmean) and torch.equal(invstd, kinvstd)
        formula = chunks._Normalize.apply(c, mean, invstd, net.bn1.weight, net.bn1.bias, chunks._Sums(1))
        assert torch.equal(formula, z)
        found_again += sum(not torch.equal(a, b) for a, b in zip(statistics(c, net.bn1.eps), (mean, invstd)))
    assert found_again  # the case this guards: statistics found again differ from the kernel's

    gm = revpass.convert(net, x, mode="exact", budget="min")
    segs = [m for m in _segments(gm).values() if m.chunking is not None and m.chunk_elems]
    assert segs
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the rounding of this run (a test worker may have one thread)
    try:
        for i in range(30):
            reset_states(gm)
            opt.zero_grad()
            out = gm(torch.randn(x.shape, generator=g) * (1 + i % 3)).mean(0)
            nn.functional.cross_entropy(out, torch.randint(0, 10, (x.shape[1],), generator=g)).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert [s.whole_rebuilds for s in segs] == [0] * len(segs)


@pytest.fixture(scope="module")
def resnet():
    return models.sj_zoo_and_input("spiking_resnet18", 4, 4)


def test_chunks_lower_the_stems_workspace_and_the_conversion_chunks_where_it_sets_the_peak(resnet):
    from revpass import meta
    from revpass.analysis.workspace import measure_workspace

    net, x = resnet
    gm = revpass.convert(net, x, mode="recompute")
    stem = gm.get_submodule("revpass_segment_0")
    # the stem sets the peak: a part of a sample's steps a chunk
    assert stem.sites == ("sn1",) and stem.samples_per_chunk(x) == 1 and stem.in_time
    per, steps = stem.chunk_shape(4, 4)
    assert per == 1 and steps < 4
    assert f"its backward rebuilds {steps} of 4 steps of one sample at a time" in gm.revpass_report.by_path("sn1").reason
    deep = [s for s in _segments(gm).values() if s.sites and s.sites[0].startswith("layer4")]
    assert deep and all(s.samples_per_chunk(x) == 4 for s in deep)  # weights outweigh activations there
    # so far that their chunks are not even checked: a chunked rebuild holds a chunk's parameter
    # gradients beside their sum, more than these segments' whole rebuilds need
    from revpass.analysis.workspace import trained_params
    for s in deep:
        call = next(n for n in gm.graph.nodes if n.target == s.name)
        grads = sum(p.numel() * p.element_size() for p in trained_params(s))
        assert s.chunking is None and 0 < meta.info(call)["workspace_bytes"] < grads, s.sites
        assert "rebuilt whole: its parameters' gradients" in gm.revpass_report.by_path(s.sites[0]).reason
    ins = [((4, 4, 3, 32, 32), torch.float32, False)]
    chosen = stem.chunk_elems
    ws = {}
    for chunk in [(4, 4), (1, 4), (1, 2), (1, 1)]:
        stem.chunk_elems = stem.chunk_elems_of(*chunk)
        ws[chunk] = measure_workspace(stem, ins)
    stem.chunk_elems = chosen
    act = 4 * 4 * 64 * 16 * 16 * 4  # one stem activation: 1 MiB
    assert ws[4, 4] > 3 * act and ws[1, 4] < 0.5 * ws[4, 4], {k: v / act for k, v in ws.items()}
    assert ws[1, 1] < ws[1, 2] < ws[1, 4], {k: v / act for k, v in ws.items()}  # parts of a sample's steps
    call = next(n for n in gm.graph.nodes if n.target == "revpass_segment_0")
    assert meta.info(call)["workspace_bytes"] == ws[1, steps]


def test_a_chunked_segments_workspace_is_measured_on_two_chunks_of_samples(resnet):
    """The planner measures a chunked segment's workspace on the samples of two chunks (all the
    steps): the figure is the whole batch's (a chunk's working set beside the sums carried from
    chunk to chunk), at half the chunks here. Fails if it is cut to one chunk (2-25% less)."""
    from revpass.analysis import workspace

    net, x = resnet
    gm = revpass.convert(net, x, mode="recompute")
    for name, ins in (("revpass_segment_0", [((4, 4, 3, 32, 32), torch.float32, False)]),
                      ("revpass_segment_1", [((4, 4, 64, 8, 8), torch.float32, True)])):
        seg = gm.get_submodule(name)
        chosen = seg.chunk_elems
        for setting in ((1, 4), (1, 2), (1, 1)):
            seg.chunk_elems = seg.chunk_elems_of(*setting)
            cut = workspace.two_chunks(seg, ins)
            assert [shape for shape, _, _ in cut] == [(4, 2, *ins[0][0][2:])]
            assert workspace.measure_workspace(seg, cut) == workspace.measure_workspace(seg, ins), (name, setting)
        seg.chunk_elems = seg.chunk_elems_of(4, 4)  # rebuilt whole: measured on the whole batch
        assert workspace.two_chunks(seg, ins) == ins
        seg.chunk_elems = chosen


def test_a_measured_rebuild_runs_a_later_part_of_samples_only_as_far_as_its_first_chunk(resnet, monkeypatch):
    """Measuring a chunked rebuild, each part of samples after the first runs only its first time
    chunk of each pass (revpass.nodes.chunks.measuring): its other chunks allocate what the first
    part's did. The figure is the one of a run of every chunk: at 2 steps a chunk it is set by
    the second sample's first chunk (the state at its start beside the parameters' gradients
    summed over the first sample: 16 KB more than one sample's run), at 1 by the first sample."""
    from revpass.analysis import workspace
    from revpass.nodes import chunks

    net, x = resnet
    gm = revpass.convert(net, x, mode="recompute")
    for name, ins in (("revpass_segment_0", [((4, 4, 3, 32, 32), torch.float32, False)]),
                      ("revpass_segment_1", [((4, 4, 64, 8, 8), torch.float32, True)])):
        seg = gm.get_submodule(name)
        for setting in ((2, 4), (1, 4), (1, 2), (1, 1)):
            seg.chunk_elems = seg.chunk_elems_of(*setting)
            cut = workspace.two_chunks(seg, ins)
            brief = workspace.measure_workspace(seg, cut)
            with monkeypatch.context() as m:
                m.setattr(chunks, "BRIEF_PARTS", False)
                assert workspace.measure_workspace(seg, cut) == brief, (name, setting)
        one = workspace.measure_workspace(seg, [((4, 1, *ins[0][0][2:]), ins[0][1], ins[0][2])])
        if name == "revpass_segment_1":  # at 1 step a chunk: the same as one sample's
            assert one == brief
    seg.chunk_elems = seg.chunk_elems_of(1, 2)
    cut = workspace.two_chunks(seg, ins)
    assert workspace.measure_workspace(seg, cut) - workspace.measure_workspace(
        seg, [((4, 1, 64, 8, 8), torch.float32, True)]) == 64 * 8 * 8 * 4


def test_exact_budget_min_recomputes_with_batch_norm_gradients(resnet):
    """Under a budget, mode="exact" may recompute: the segments' batch norms are not folded into
    their nodes (a folded batch norm's parameters were no parameters of the segment, and lost
    their gradients), and the forward stays the original's bit for bit."""
    net, x = resnet
    gm = revpass.convert(net, x, mode="exact", budget="min")
    assert gm.revpass_report.count("recompute") > 0
    assert not any("folds batch norm" in r.reason for r in gm.revpass_report if r.decision == "recompute")
    y0, g0 = _grads(net, x)
    y1, g1 = _grads(gm, x)
    assert torch.equal(y0, y1)
    for k in g0:
        assert g1[k] is not None and (close(g1[k], g0[k]) or worst(g1[k], g0[k]) < 20), (k, worst(g1[k], g0[k]))


@pytest.fixture(scope="module")
def resnet_t8():
    return models.sj_zoo_and_input("spiking_resnet18", 8, 4)


@pytest.mark.parametrize("which", ["resnet", "resnet_t8"])
def test_the_conversion_refines_whatever_sets_the_peak_as_far_as_it_lowers_it(which, request):
    """budget="min" on spiking_resnet18: after chunking the stem, the peak moves among the first
    layers' segments and exact nodes; refining each in turn (chunks of segments, slices of
    nodes) leaves the estimate within 5% of every one of them at its finest. Choosing among the
    refinements by the whole estimate alone (parameters' gradients included, which dominate it)
    left the figure 6% above at T=4. At T=8 two chunks of samples of layer1's second segment
    need more than the whole batch, one sample's steps much less: stopping at the first setting
    that did not help left the figure 55% above (4.98 MiB against 3.2)."""
    from revpass import meta
    from revpass.analysis.workspace import node_workspace, workspace
    from revpass.nodes.slicing import CHUNK_MIN_ELEMS_FINE
    from revpass.passes.spikes import spike_values
    from revpass.planning.peak import estimate_peak

    net, x = request.getfixturevalue(which)
    gm = revpass.convert(net, x, mode="exact", budget="min")
    chosen = estimate_peak(gm)
    spikes = spike_values(gm)
    for n in gm.graph.nodes:
        m = gm.get_submodule(n.target) if n.op == "call_module" else None
        info = meta.info(n) or {}
        if isinstance(m, RecomputeSegment) and m.chunking is not None:
            m.chunk_elems = 1  # a step of a sample
            ins = [(meta.info(a)["shape"], getattr(torch, meta.info(a)["dtype"]), a in spikes) for a in n.args]
            meta.update(n, workspace_bytes=workspace(m, ins))
        elif isinstance(m, revpass.nodes.Node) and info.get("workspace_bytes"):
            m.set_slicing(CHUNK_MIN_ELEMS_FINE)
            meta.update(n, workspace_bytes=node_workspace(m, info["shape"], getattr(torch, info["dtype"])))
    finest = estimate_peak(gm)
    assert chosen <= 1.05 * finest, (chosen / 2**20, finest / 2**20)


@pytest.mark.parametrize("which", ["resnet", "resnet_t8"])
def test_a_chunked_segment_needs_least_at_its_finest_chunks(which, request):
    """The planner gives up a join it tries where even the joined segment at its finest chunks
    would not lower the estimate (revpass.planning.peak._lowest_reachable): that holds where a
    segment's rebuild needs least at its finest chunks of all the chunked settings the
    refinement passes (half the samples, down to one, then half its steps), though not less at
    each (two chunks of samples can need more than the whole batch). Every chunked segment of
    spiking_resnet18 at T = 4 and 8, measured at each of those settings."""
    from revpass import meta
    from revpass.analysis.workspace import workspace
    from revpass.nodes.chunks import CHUNK_ELEMS, CHUNKS_MAX
    from revpass.passes.spikes import spike_values

    net, x = request.getfixturevalue(which)
    T, B = x.shape[:2]
    gm = revpass.convert(net, x, mode="recompute")
    spikes = spike_values(gm)
    checked = 0
    for n in gm.graph.nodes:
        m = gm.get_submodule(n.target) if n.op == "call_module" else None
        if not (isinstance(m, RecomputeSegment) and m.chunking is not None):
            continue
        settings, (per, steps) = [], (B, T)
        while True:
            per, steps = ((per + 1) // 2, steps) if per > 1 else (1, (steps + 1) // 2) if m.in_time and steps > 1 \
                else (None, None)
            if per is None or -(-B // per) * -(-T // steps) > CHUNKS_MAX or per * steps * m.step_elems < CHUNK_ELEMS["cpu"]:
                break
            settings.append((per, steps))
        ins = [(meta.info(a)["shape"], getattr(torch, meta.info(a)["dtype"]), a in spikes) for a in n.args]
        ws = {}
        for setting in settings:
            m.chunk_elems = m.chunk_elems_of(*setting)
            ws[setting] = workspace(m, ins)
        if len(ws) >= 2:
            checked += 1
            assert ws[settings[-1]] == min(ws.values()), (m.sites, ws)
    assert checked >= 5


def test_the_starts_of_a_samples_parts_are_held_one_per_halving():
    """Rebuilt by bisection, the neurons' states at the parts' starts are held one per level of
    halving, not one per part: in parts of one step, the rebuild's workspace grows by one step's
    state (here as large as a part's activation) each time T doubles, not by T/2 of them."""
    from spikingjelly.activation_based import functional, layer, neuron

    from revpass.analysis.workspace import measure_workspace

    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 8, 3, padding=1), layer.BatchNorm2d(8), neuron.LIFNode(), layer.Flatten(),
                        layer.Linear(8 * 16 * 16, 3))
    functional.set_step_mode(net, "m")
    part = 8 * 16 * 16 * 4  # one step of one sample of the neuron's output, float32
    ws = {}
    for T in (4, 8, 16):
        x = torch.randn(T, 2, 2, 16, 16)
        gm = revpass.convert(net, x, mode="recompute")
        seg = next(s for s in _segments(gm).values() if s.sites)
        seg.chunk_elems = 1  # a step of a sample
        assert seg.chunk_shape(T, 2) == (1, 1)
        ws[T] = measure_workspace(seg, [((T, 2, 2, 16, 16), torch.float32, False)])
        y0, g0 = _grads(net, x)
        y1, g1 = _grads(gm, x)
        assert torch.equal(y0, y1)
        for k in g0:
            assert close(g1[k], g0[k]) or worst(g1[k], g0[k]) < 10, (T, k, worst(g1[k], g0[k]))
    assert ws[8] - ws[4] == part and ws[16] - ws[8] == part, {T: w / part for T, w in ws.items()}


def test_a_chunked_segments_kept_bytes_are_what_its_forward_keeps(resnet):
    """A segment rebuilt in chunks keeps more than one rebuilt whole (its neurons' spikes as
    bits, its batch norms' statistics): the refinement writes that into the annotation the
    estimate reads. Left as annotated (unchunked), spiking_resnet18's estimate at T = 16 was 11%
    under the measured peak, 8% with it."""
    from revpass import meta
    from revpass.analysis.measure import measure

    net, x = resnet
    gm = revpass.convert(net, x, mode="exact", budget="min")
    now = measure(gm, [x])
    chunked = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                RecomputeSegment)
               and gm.get_submodule(n.target).samples_per_chunk(x) < x.shape[1]]
    assert len(chunked) >= 2
    for n in chunked:
        assert meta.info(n)["kept_bytes"] == now[n.name].kept_bytes, n.target
    for n in chunked:
        seg = gm.get_submodule(n.target)
        seg.chunk_elems = seg.chunk_elems_of(x.shape[1], x.shape[0])  # rebuilt whole
    whole = measure(gm, [x])
    for n in chunked:
        assert whole[n.name].kept_bytes < now[n.name].kept_bytes, n.target


def test_a_chunk_holds_nothing_of_the_chunk_before_it():
    """While a chunk's start is rebuilt and it runs, nothing of the chunk before it is held but
    the gradients of its start states: not that chunk's input, its input gradient (copied into
    the whole one), its neurons' start or final states, nor their gradients (each as large as a
    chunk's activation; a loop variable of the backward's generator held some). Measured on a
    conv -> batch norm -> LIF segment whose input gradient is wanted (the workspace: beyond the
    inputs' and parameters' gradients): in parts of four steps of a sample 6.26 parts' worth
    (7.26 while the previous part's were held), in steps of a sample 10.02 steps' worth (15.31
    while all were held, 14.02 while the loop variables held theirs)."""
    from spikingjelly.activation_based import functional, layer, neuron

    from revpass.analysis.workspace import measure_workspace

    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(8, 8, 3, padding=1), layer.BatchNorm2d(8), neuron.LIFNode(), layer.Flatten(),
                        layer.Linear(8 * 16 * 16, 3))
    functional.set_step_mode(net, "m")
    T, B, step = 4, 2, 8 * 16 * 16 * 4  # a step of a sample of a layer's output, float32
    x = (torch.rand(T, B, 8, 16, 16) > 0.5).float()
    gm = revpass.convert(net, x, mode="recompute")
    seg = next(s for s in _segments(gm).values() if s.sites)
    ws = {}
    for setting in ((1, T), (1, 1)):
        seg.chunk_elems = seg.chunk_elems_of(*setting)
        assert seg.chunk_shape(T, B) == setting
        ws[setting] = measure_workspace(seg, [((T, B, 8, 16, 16), torch.float32, False)])
    assert ws[1, T] <= 6.5 * T * step, ws[1, T] / (T * step)
    assert ws[1, 1] <= 10.5 * step, ws[1, 1] / step


class TwoReaders(nn.Module):
    """sn1's spikes feed sn2's layers and, besides, a read-out of their own."""

    def __init__(self):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron

        self.c1, self.bn1 = layer.Conv2d(2, 4, 3, padding=1, step_mode="m"), layer.BatchNorm2d(4, step_mode="m")
        self.sn1 = neuron.LIFNode(step_mode="m")
        self.c2, self.bn2 = layer.Conv2d(4, 4, 3, padding=1, step_mode="m"), layer.BatchNorm2d(4, step_mode="m")
        self.sn2 = neuron.LIFNode(step_mode="m")
        self.fc1, self.fc2 = layer.Linear(4 * 6 * 6, 3, step_mode="m"), layer.Linear(4 * 6 * 6, 3, step_mode="m")

    def forward(self, x):
        s = self.sn1(self.bn1(self.c1(x)))
        return self.fc2(self.sn2(self.bn2(self.c2(s))).flatten(2)) + self.fc1(s.flatten(2))


def test_a_joined_site_whose_spikes_have_another_reader_keeps_its_own_segment():
    from revpass import api

    torch.manual_seed(0)
    net = TwoReaders().double()
    x = (torch.randn(3, 5, 2, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 + 0.5).double()
    gm = api._pipeline(net, x, api._Options(mode="recompute", backward="optimized", joined=frozenset({"sn1"})))
    assert sorted(s.sites for s in _segments(gm).values() if s.sites) == [("sn1",), ("sn2",)]
    assert "joined" not in gm.revpass_report.by_path("sn1").reason
    y0, g0 = _grads(net, x)
    y1, g1 = _grads(gm, x)
    assert torch.equal(y0, y1)
    for k in g0:
        assert close(g1[k], g0[k], torch.float64), (k, worst(g1[k], g0[k], torch.float64))
    net.float()


def test_the_planners_conversions_check_a_segments_chunks_once(block, monkeypatch):
    """Conversions of one trace (the planner's) share a memo of chunk checks, by the segment's
    layers and the bytes of its inputs: a second conversion checks nothing and chunks as the
    first; other input values are another key. Fails if the memo is not consulted or keyed on
    shapes alone."""
    from dataclasses import replace

    from revpass import api
    from revpass.passes.segments import _check_key
    from revpass.utils import safe_deepcopy

    net, x = block
    options = api._Options(mode="recompute", backward="optimized", collect=False)
    traced = api._Traced.of(safe_deepcopy(net), (x,), options)
    checked = []
    real = chunks.check
    monkeypatch.setattr(chunks, "check", lambda *a, **k: checked.append(1) or real(*a, **k))
    first = api._pipeline(net, x, options, traced)
    n_first = len(checked)
    second = api._pipeline(net, x, replace(options, mode="recompute"), traced)
    assert n_first >= 2 and len(checked) == n_first  # every segment's check taken from the memo
    chunked = {n: (s.chunking is not None, s.in_time) for n, s in _segments(first).items()}
    assert chunked == {n: (s.chunking is not None, s.in_time) for n, s in _segments(second).items()}
    assert any(c for c, _ in chunked.values())
    seg = next(s for s in _segments(first).values() if s.sites)
    other = x.clone()
    other.view(-1)[0] += 1
    assert _check_key(seg, (x,)) == _check_key(seg, (x.clone(),)) != _check_key(seg, (other,))


def test_a_segments_workspace_is_the_chunks_even_where_its_random_inputs_spikes_differ(resnet, monkeypatch):
    """On the random inputs a workspace is measured on, a chunk's spikes can differ from the
    forward's (a convolution over fewer samples rounds differently: spiking_vgg16_bn's stem at
    T=16 on two chunks' samples). The measure is of the chunks all the same, not of the whole
    rebuild a training step falls back to (35 MiB against the chunks' 21 there), and it leaves
    the segment's count of whole rebuilds as it was. Fails if the measure falls back."""
    from revpass.analysis import workspace
    from revpass.nodes import chunks

    net, x = resnet
    gm = revpass.convert(net, x, mode="recompute")
    seg = gm.get_submodule("revpass_segment_0")
    ins = [((4, 4, 3, 32, 32), torch.float32, False)]
    seg.chunk_elems = seg.chunk_elems_of(4, 4)
    whole = workspace.measure_workspace(seg, ins)
    seg.chunk_elems = seg.chunk_elems_of(1, 4)
    chunked = workspace.measure_workspace(seg, ins)
    assert whole > 1.5 * chunked
    real = chunks._Normalize.forward
    monkeypatch.setattr(chunks._Normalize, "forward", staticmethod(lambda ctx, *a: real(ctx, *a) + 0.5))  # spikes change
    monkeypatch.setattr(workspace, "_NODE_WORKSPACE", {})
    count = seg.whole_rebuilds
    assert workspace.measure_workspace(seg, ins) == chunked
    assert workspace.workspace(seg, ins) == chunked  # on two chunks' samples
    assert seg.whole_rebuilds == count
