"""A multi-step batch norm folded into the reversible node that reads it
(revpass/nodes/batchnorm.py): same function, gradients within docs/method.md section 7, and its input
not kept."""

import copy
import math

import pytest
import torch
from torch import nn

import revpass
from catalogue import close, reduction_close, worst
from revpass.memory import saved_bytes


def _bn(C, dtype=torch.float32, seed=0):
    from spikingjelly.activation_based import layer

    g = torch.Generator().manual_seed(seed)
    bn = layer.BatchNorm2d(C, step_mode="m").to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=g, dtype=dtype) + 0.5)
        bn.bias.copy_(torch.rand(C, generator=g, dtype=dtype) * 0.6 - 0.3)
    return bn


def _node(kind="lif", dtype=torch.float32):
    from spikingjelly.activation_based import neuron

    lib = neuron.ParametricLIFNode(step_mode="m") if kind == "plif" else neuron.LIFNode(step_mode="m")
    return revpass.ReversibleNode.from_neuron(lib.to(dtype), carry_state=True)


def _run(node, bn, c, g, fold: bool, calls=2):
    """Two calls (the second starts from the first's state), gradients of c, the batch norm's
    and the node's parameters."""
    node, bn = copy.deepcopy(node), copy.deepcopy(bn)
    if fold:
        node.fold_batch_norm(bn)
    ys = [node(c[i]) if fold else node(bn(c[i])) for i in range(calls)]
    params = [bn.weight, bn.bias, *[p for p in node.parameters() if p.requires_grad]]
    grads = torch.autograd.grad(sum((y * g[i]).sum() for i, y in enumerate(ys)), [c, *params])
    return [y.detach() for y in ys], grads, bn


@pytest.mark.parametrize("kind", ["lif", "plif"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 3, 6, 5, 5), (4, 2, 64, 16, 16)], ids=["whole", "sliced"])
def test_folded_equals_unfolded(kind, dtype, shape):
    gen = torch.Generator().manual_seed(1)
    c = (torch.randn((2, *shape), generator=gen, dtype=dtype) * 2 + 0.3).requires_grad_(True)
    g = torch.randn((2, *shape), generator=gen, dtype=dtype)
    node, bn = _node(kind, dtype), _bn(shape[2], dtype)
    if shape[2] == 64:
        from revpass.nodes import slicing

        node.set_slicing(slicing.CHUNK_MIN_ELEMS_FINE)  # 8 slices, as convert gives the largest nodes
    ys_u, gr_u, bn_u = _run(node, bn, c, g, fold=False)
    ys_f, gr_f, bn_f = _run(node, bn, c, g, fold=True)
    for a, b in zip(ys_f, ys_u):
        assert torch.equal(a, b)  # the batch norm module's own forward, then the same node
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn_f, name), getattr(bn_u, name)), name
    assert_grads_close(gr_f, gr_u, node, bn, c, g, dtype)


def assert_grads_close(got, ref, node, bn, c, g, dtype, reduction_ok=None):
    """The input gradient within section 7; a parameter's gradient is a sum over the whole batch:
    as in tests/nodes, one that misses the tolerance passes if it is no farther from float64 than
    the reference is (the float64 value from the unfolded node under autograd), or as
    ``reduction_ok(a, b, float64 gradient)`` says where given."""
    truth = None
    for i, (a, b) in enumerate(zip(got, ref)):
        if i == 0 or close(a, b, dtype):
            assert close(a, b, dtype), (i, worst(a, b, dtype))
            continue
        if truth is None:
            node64, bn64 = copy.deepcopy(node).double(), copy.deepcopy(bn).double()
            node64.backward_mode = "autograd"
            truth = _run(node64, bn64, c.detach().double().requires_grad_(True), g.double(), fold=False)[1]
        if reduction_ok is None:
            assert reduction_close(a, b, lambda i=i: truth[i], dtype), (i, worst(a, b, dtype))
        else:
            assert reduction_ok(a, b, truth[i]), (i, worst(a, b, dtype))


def test_folded_keeps_statistics_not_the_input():
    shape = (4, 2, 8, 6, 6)
    c = torch.randn(shape).requires_grad_(True)
    numel, C, T = math.prod(shape), shape[2], shape[0]
    node, bn = _node(), _bn(C)
    kept = {}
    for fold in (False, True):
        n, b = copy.deepcopy(node), copy.deepcopy(bn)
        if fold:
            n.fold_batch_norm(b)
        n.carry_state = False
        fn = (lambda: n(c * 1.0)) if fold else (lambda: n(b(c * 1.0)))  # c * 1.0: a conv output
        _, rep = saved_bytes(fn, exclude=[c, *n.parameters(), *n.buffers(), *b.parameters(), *b.buffers()])
        kept[fold] = rep.total
    bits = T * math.ceil(numel // T // 2 / 8)
    assert kept[False] == numel * 4 + 2 * C * 4 + numel * 4 + bits  # bn: input, mean, 1/std; node: y, bits
    assert kept[True] == numel * 4 + bits + 2 * C * 4  # y, bits, mean and 1/std


@pytest.mark.parametrize("node_kind", ["reversible", "exact"])
def test_small_gamma_keeps_the_input_and_stays_exact(node_kind):
    """Folded into a reversible node or (under a budget) an exact one, a batch norm with a
    |gamma| below GAMMA_MIN keeps its input: gradients within tolerance, its input kept."""
    from spikingjelly.activation_based import neuron

    shape = (5, 2, 6, 4, 4)
    gen = torch.Generator().manual_seed(2)
    c = (torch.randn((2, *shape), generator=gen) + 0.3).requires_grad_(True)
    g = torch.randn((2, *shape), generator=gen)
    node = _node() if node_kind == "reversible" else revpass.ExactNode.from_neuron(neuron.LIFNode(step_mode="m"))
    bn = _bn(6)
    with torch.no_grad():
        bn.weight[2] = 1e-4  # x^ = (z - beta) / gamma would amplify z's rounding 10^4 times
    _, gr_u, _ = _run(node, bn, c, g, fold=False)
    _, gr_f, _ = _run(node, bn, c, g, fold=True)
    for i, (a, b) in enumerate(zip(gr_f, gr_u)):
        assert close(a, b), (i, worst(a, b))
    n, b = copy.deepcopy(node), copy.deepcopy(bn)
    n.fold_batch_norm(b)
    n.carry_state = False
    exclude = [c, *n.parameters(), *n.buffers(), *b.parameters(), *b.buffers()]
    _, rep = saved_bytes(lambda: n(c[0] * 1.0), exclude=exclude)
    assert rep.total >= 2 * math.prod(shape) * 4  # y (or H) and the batch norm's input


def test_eval_mode_and_no_grad_run_unfolded():
    shape = (3, 2, 4, 3, 3)
    c = torch.randn(shape)
    node, bn = _node(), _bn(4)
    node.carry_state = False
    bn.eval()
    ref = node(bn(c))
    node.fold_batch_norm(bn)
    assert torch.equal(node(c), ref)
    bn.train()
    with torch.no_grad():
        y = node(c)
    bn2 = _bn(4)
    node.fold_batch_norm(None)
    assert torch.equal(y, node(bn2(c)))
    with pytest.raises(ValueError, match="cannot be folded"):
        node.fold_batch_norm(nn.BatchNorm2d(4))  # single-step: its channel dim is 1, not 2


def test_convert_folds_and_keeps_the_model_whole():
    import models

    net = models.sj_zoo("spiking_resnet18")
    x = torch.randn(2, 2, 3, 32, 32)
    conv = revpass.convert(net, x)
    folded = {n.target: n.meta["revpass_folded"] for n in conv.graph.nodes if "revpass_folded" in n.meta}
    # every batch norm read only by a neuron (bn1 of the stem and of each block); bn2 of a block
    # feeds the residual add first, and is left as it is
    assert folded["sn1"] == "bn1" and folded["layer1.0.sn1"] == "layer1.0.bn1"
    assert len(folded) == 9 and not any(b.endswith("bn2") for b in folded.values())
    assert conv.sn1.folded_bn is conv.bn1
    assert set(conv.state_dict()) == set(net.state_dict())
    assert sum(p.numel() for p in conv.parameters()) == sum(p.numel() for p in net.parameters())
    row = conv.revpass_report.by_path("sn1")
    assert "folds batch norm 'bn1'" in row.reason
    # the traced graph no longer calls bn1; the node does
    assert not any(n.op == "call_module" and n.target == "bn1" for n in conv.graph.nodes)
    # in place: the user's model calls its own batch norms, so nothing is folded
    work = copy.deepcopy(net)
    conv2 = revpass.convert(work, x, inplace=True)
    assert not any("revpass_folded" in n.meta for n in conv2.graph.nodes)
    assert work.sn1.folded_bn is None
    # the folded model trains like the unfolded one: same outputs; gradients through 17 layers of
    # reconstruction agree to 1e-5 in norm (measured: about 1e-6; section 7 holds per node: above)
    graph_unf = copy.deepcopy(conv2)  # a graph that calls every batch norm itself
    graph_unf.load_state_dict(conv.state_dict())
    y1 = conv(x)
    y2 = graph_unf(x)
    assert torch.equal(y1, y2)
    g1 = torch.autograd.grad(y1.sum(), [conv.conv1.weight, conv.bn1.weight])
    g2 = torch.autograd.grad(y2.sum(), [graph_unf.conv1.weight, graph_unf.bn1.weight])
    for a, b in zip(g1, g2):
        assert float((a - b).norm() / b.norm()) < 1e-5


def test_convert_slices_only_where_the_transient_sets_the_peak():
    """revpass.convert gives backward slices only to the nodes whose transient would set the peak
    of a training step (revpass.planning.peak.slice_where_it_sets_the_peak): the estimated peak stays
    within 5% of every node finely sliced, with most nodes whole (fewer kernel launches). A node
    built by hand keeps the default."""
    import models
    from spikingjelly.activation_based import neuron

    from revpass.nodes import slicing
    from revpass.analysis.workspace import node_workspace
    from revpass.planning.peak import estimate_peak

    net = models.sj_zoo("spiking_resnet18")
    for mode in ("exact", "reversible"):
        conv = revpass.convert(net, torch.randn(4, 2, 3, 32, 32), mode=mode)
        nodes = {n: m for n, m in conv.named_modules() if isinstance(m, (revpass.ExactNode, revpass.ReversibleNode))}
        assert len(nodes) == 17
        sliced = {n for n, m in nodes.items() if m.slice_min_elems is not None}
        if mode == "reversible":
            assert "sn1" in sliced and 1 <= len(sliced) <= 8, sorted(sliced)  # the stem's layers, not the rest
        chosen = estimate_peak(conv)
        for n in conv.graph.nodes:  # every node in its finest slices, measured
            info = n.meta.get("revpass", {})
            if n.op == "call_module" and n.target in nodes and info.get("workspace_bytes"):
                nodes[n.target].set_slicing(slicing.CHUNK_MIN_ELEMS_FINE)
                info["workspace_bytes"] = node_workspace(nodes[n.target], info["shape"], getattr(torch, info["dtype"]))
        finest = estimate_peak(conv)
        assert chosen <= 1.05 * finest, (mode, chosen, finest)
    assert revpass.ReversibleNode.from_neuron(neuron.LIFNode(step_mode="m")).slice_min_elems is None
