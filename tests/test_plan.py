"""Memory annotations and revpass.plan: measured, deduplicated over the graph, consistent."""

import contextlib
import math

import torch

import models
import revpass
from revpass.memory import saved_bytes, step_peak, tracker_bytes
from revpass.trace import reset_states


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
        assert set(info) == keys | ({"workspace_bytes"} if is_node else set())
        if is_node:  # measured on the node alone: several times its input
            assert info["workspace_bytes"] > 2 * math.prod(info["shape"]) * 4
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
    assert info["kept_bytes"] == numel * 4 + T * math.ceil(numel // T // 2 / 8)
    assert info["kept_bytes_before"] == 3 * numel * 4  # LIFNode, hard reset: 3 floats per element


def test_plan_does_not_convert_the_model_and_sorts_by_savings():
    net = models.SnnTorchConv()
    x = torch.randn(2, 1, 28, 28) * 2
    p = revpass.plan(net, x)
    assert not any(isinstance(m, (revpass.ReversibleNode, revpass.ExactNode)) for m in net.modules())
    assert p.kept_before == _whole_model_kept(net, x)
    assert p.kept_after < p.kept_before
    saved = [r.saved for r in p.rows]
    assert saved == sorted(saved, reverse=True)
    assert "memory plan" in str(p) and p.rows[0].node in str(p)


def test_peak_estimate_against_memtracker():
    """Unconverted graphs: within 10% of MemTracker. Conversions: the nodes' backward workspaces,
    measured on each node alone, make the estimate high by up to 25% on these models (a shortfall
    of issue #4, docs/memory.md); it must never be low by more than 10%."""
    from revpass.plan import estimate_peak

    cases = [
        (lambda: models.sj_zoo("spiking_resnet18"), torch.randn(4, 2, 3, 32, 32)),
        (lambda: models.SnnTorchConv(num_steps=4, batch_size=8), torch.randn(8, 1, 28, 28) * 2),
    ]
    for make, x in cases:
        net = make()
        for kwargs in ({"exclude": "*"}, {"mode": "exact"}, {"mode": "reversible"}, {"mode": "recompute"}):
            gm = revpass.convert(net, x, **kwargs)
            est, meas = estimate_peak(gm), step_peak(gm, x)
            high = 0.10 if "exclude" in kwargs else 0.30
            assert -0.10 * meas <= est - meas <= high * meas, (type(net).__name__, kwargs, est, meas)
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
