"""Memory annotations and revpass.plan: measured, deduplicated over the graph, consistent."""

import contextlib
import math

import torch

import models
import revpass
from revpass.memory import saved_bytes, step_peak, tracker_bytes
from revpass.state import reset_states


def _whole_model_kept(model, x):
    reset_states(model)
    xx = x.detach().requires_grad_(True)
    exclude = [xx, *model.parameters(), *model.buffers()]
    _, rep = saved_bytes(lambda: model(xx), exclude=exclude)
    reset_states(model)
    return rep.total


def test_annotations_on_every_node_add_up_to_the_whole_graph():
    net = models.sj_zoo("spiking_resnet18")
    x = torch.randn(4, 2, 3, 32, 32)
    conv = revpass.convert(net, x)
    keys = {"shape", "dtype", "kept_bytes", "kept_bytes_before", "strategy", "reason", "forward_step", "backward_step"}
    infos = []
    for n in conv.graph.nodes:
        info = n.meta["revpass"]
        is_node = n.op == "call_module" and isinstance(conv.get_submodule(n.target), revpass.ReversibleNode)
        # module calls: what their forward held at its peak (any that allocated something)
        assert set(info) - {"forward_bytes"} == keys | ({"workspace_bytes"} if is_node else set())
        if is_node:  # measured on the node alone, and in the run
            assert info["workspace_bytes"] > 0
            assert info["forward_bytes"] >= math.prod(info["shape"]) * 4  # its output at least
        assert "forward_bytes" not in info or n.op == "call_module"
        assert n.meta["custom"]["revpass"] == info  # survives torch.export
        infos.append(info)
    steps = [i["forward_step"] for i in infos if i["forward_step"] is not None]
    assert all(i["backward_step"] == len(steps) - 1 - i["forward_step"] for i in infos if i["forward_step"] is not None)
    # measured per node, deduplicated over the graph: the parts sum to the whole
    assert sum(i["kept_bytes"] for i in infos) == _whole_model_kept(conv, x)
    assert sum(i["kept_bytes_before"] for i in infos) == _whole_model_kept(net, x)
    # a reversible LIF site keeps its output and F's bits (1 bit per element of half the channels)
    sn1 = next(n for n in conv.graph.nodes if n.target == "sn1")
    info = sn1.meta["revpass"]
    numel = math.prod(info["shape"])
    assert info["strategy"] == "reversible" and "multi-step" in info["reason"]
    T = info["shape"][0]
    C = info["shape"][2]
    # its output, F's bits and, for the batch norm folded into it (bn1), a mean and 1/std per channel
    assert info["kept_bytes"] == numel * 4 + T * math.ceil(numel // T // 2 / 8) + 2 * C * 4
    assert "folds batch norm 'bn1'" in info["reason"]
    # LIFNode, hard reset: 3 floats per element; bn1: its input, 1 float per element, and its
    # batch's mean and 1/std
    assert info["kept_bytes_before"] == (3 + 1) * numel * 4 + 2 * C * 4
    assert 0 < info["workspace_bytes"] < numel * 4  # the backward in 8 slices: under its input's size


def test_plan_does_not_convert_the_model_and_sorts_by_savings():
    net = models.SnnTorchConv()
    x = torch.randn(2, 1, 28, 28) * 2
    p = revpass.plan(net, x)
    assert not any(isinstance(m, (revpass.ReversibleNode, revpass.ExactNode)) for m in net.modules())
    assert p.kept_before == _whole_model_kept(net, x)
    assert p.kept_after < p.kept_before
    saved = [r.saved for r in p.rows]
    assert saved == sorted(saved, reverse=True)
    # printed per module, not per unrolled step: the loop's T calls of a layer are one group
    groups = {(g.target, g.strategy): g for g in p.groups()}
    assert len(groups) == len(p.groups()) < len(p.rows)
    for g in p.groups():
        calls = [r for r in p.rows if (r.target, r.strategy) == (g.target, g.strategy)]
        assert g.calls == len(calls) and g.kept_before == sum(r.kept_before for r in calls)
        assert g.kept_after == sum(r.kept_after for r in calls)
    text = str(p)
    assert "memory plan (mode='reversible')" in text and max(g.calls for g in p.groups()) > 1
    assert all(r.node not in text.split("\n", 2)[2] for r in p.rows if r.node != r.target)
    assert "mode=\"budget='min'\"" in str(revpass.plan(net, x, budget="min"))


def test_peak_estimate_against_memtracker():
    """Issue #4: the estimated peak of a training step is within 10% of MemTracker's measured one
    on spiking_resnet18 and the snnTorch convolutional tutorial network, unconverted and under
    every strategy (the nodes' and segments' backward workspaces measured on each alone)."""
    from revpass.planning.peak import estimate_peak

    cases = [
        (lambda: models.sj_zoo("spiking_resnet18"), torch.randn(4, 2, 3, 32, 32)),
        (lambda: models.SnnTorchConv(num_steps=4, batch_size=8), torch.randn(8, 1, 28, 28) * 2),
    ]
    for make, x in cases:
        net = make()
        for kwargs in ({"exclude": "*"}, {"mode": "exact"}, {"mode": "reversible"}, {"mode": "recompute"},
                       {"budget": "min"}, {"mode": "exact", "budget": "min"}):
            gm = revpass.convert(net, x, **kwargs)
            est, meas = estimate_peak(gm), step_peak(gm, x)
            assert abs(est - meas) <= 0.10 * meas, (type(net).__name__, kwargs, est, meas)
    p = revpass.plan(net, x)
    assert p.peak_before == estimate_peak(revpass.convert(net, x, exclude="*"))  # the unconverted graph
    assert p.peak_after < p.peak_before * 1.5


def test_memtracker_sees_the_nodes_backward_workspace():
    """A dispatch mode does not see inside the op it intercepts: without visible_internals,
    MemTracker would miss the node's backward workspace (several times its input)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from revpass.nodes.ops import visible_internals
    from spikingjelly.activation_based import neuron

    node = revpass.ReversibleNode.from_neuron(neuron.LIFNode(step_mode="m"), carry_state=False)
    x = torch.randn(8, 4, 16, 8, 8, requires_grad=True)
    nbytes = x.numel() * 4
    peaks = []
    for visible in (False, True):
        y = node(x)
        g = torch.randn_like(y)
        mt = MemTracker()
        with (visible_internals() if visible else contextlib.nullcontext()), mt:
            torch.autograd.grad(y, x, g)
        peaks.append(tracker_bytes(mt.get_tracker_snapshot("peak")))
    assert peaks[1] >= peaks[0] + 2 * nbytes, (peaks, nbytes)


def test_annotations_survive_torch_export():
    net = models.sj_zoo("spiking_resnet18")
    x = torch.randn(4, 2, 3, 32, 32)
    conv = revpass.convert(net, x, mode="exact")
    reset_states(conv)
    ep = torch.export.export(conv, (x,))
    nodes = [n for n in ep.graph.nodes if "revpass.exact" in str(n.target)]
    assert len(nodes) == 17
    for n in nodes:
        info = n.meta["custom"]["revpass"]
        assert info["strategy"] == "exact"
        assert info["kept_bytes"] == math.prod(info["shape"]) * 4  # H: one float per element and step



def test_a_nodes_workspace_is_measured_once_per_configuration(monkeypatch):
    """The planner converts a model several times: a node's backward workspace is remembered by
    what it depends on (revpass.analysis.workspace.node_key), measured again when that changes."""
    from revpass.analysis import workspace as ws
    from spikingjelly.activation_based import neuron

    calls = []
    measure = ws.measure_workspace
    monkeypatch.setattr(ws, "measure_workspace", lambda *a, **k: calls.append(1) or measure(*a, **k))
    monkeypatch.setattr(ws, "_NODE_WORKSPACE", {})
    node = revpass.ReversibleNode.from_neuron(neuron.LIFNode(step_mode="m"), carry_state=False)
    shape = (4, 2, 16, 8, 8)
    first = ws.node_workspace(node, shape, torch.float32)
    twin = revpass.ReversibleNode.from_neuron(neuron.LIFNode(step_mode="m"), carry_state=False)
    assert ws.node_workspace(twin, shape, torch.float32) == first > 0 and len(calls) == 1
    node.set_slicing(2 * 16 * 8 * 8 // 8)  # finer slices: another transient
    sliced = ws.node_workspace(node, shape, torch.float32)
    assert len(calls) == 2 and sliced < first
    ws.node_workspace(node, (8, 2, 16, 8, 8), torch.float32)  # another shape
    assert len(calls) == 3


def test_the_estimate_sees_a_recomputed_segments_forward():
    """A small network whose layers are all recomputed peaks in its first segment's forward (the
    layers run whole under no_grad), not in a backward: the estimate counts each module call's
    measured forward (forward_bytes) and agrees with the measured peak."""
    from spikingjelly.activation_based import layer, neuron

    from revpass import meta
    from revpass.planning.peak import estimate_peak

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        layer.Conv2d(1, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16), neuron.LIFNode(), layer.MaxPool2d(2),
        layer.Conv2d(16, 32, 3, padding=1, bias=False), layer.BatchNorm2d(32), neuron.LIFNode(), layer.MaxPool2d(2),
        layer.Flatten(), layer.Linear(128, 10))
    from spikingjelly.activation_based import functional

    functional.set_step_mode(net, "m")
    x = torch.randn(4, 64, 1, 8, 8) * 2
    gm = revpass.convert(net, x, mode="recompute")
    first = next(n for n in gm.graph.nodes if n.op == "call_module")
    act = 4 * 64 * 16 * 8 * 8 * 4  # one of its layers' outputs, float32
    assert meta.info(first)["forward_bytes"] >= 2 * act  # the conv's and the batch norm's at least
    where = []
    est = estimate_peak(gm, where)
    measured = step_peak(gm, x)
    assert abs(est - measured) <= 0.1 * measured
    # the forward alone: the segments' rebuilds (chunked as finely as the peak needed) left out
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target.startswith("revpass_segment"):
            meta.update(n, workspace_bytes=0)
    forward = estimate_peak(gm, where)
    assert where[-1] is None and forward >= 0.95 * est and abs(forward - measured) <= 0.1 * measured
