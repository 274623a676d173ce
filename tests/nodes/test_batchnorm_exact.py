"""A multi-step batch norm folded into the exact node that reads it (revpass/nodes/batchnorm.py,
FoldedExact; docs/method.md section 12): the forward bit for bit the unfolded one's, gradients
within docs/method.md section 7, and only the node's membranes kept (not the batch norm's input)."""

import copy
import math

import pytest
import torch

import revpass
from catalogue import close, worst
from nodes.test_batchnorm import _bn, _run, assert_grads_close
from revpass.memory import saved_bytes
from revpass.state import reset_states

NEURONS = {
    "lif": dict(tau=2.0),
    "lif-soft-not-decay-input": dict(tau=3.0, decay_input=False, v_reset=None),
    "lif-reset-0.3": dict(tau=1.5, v_reset=0.3, v_threshold=0.8),
    "if": dict(),
    "plif": dict(init_tau=2.5),
    "plif-not-decay-input-reset-0.2": dict(init_tau=1.7, decay_input=False, v_reset=0.2),
}


def _exact(kind="lif", dtype=torch.float32):
    from spikingjelly.activation_based import neuron

    kw = NEURONS[kind]
    cls = (neuron.IFNode if kind == "if" else neuron.ParametricLIFNode if kind.startswith("plif")
           else neuron.LIFNode)
    return revpass.ExactNode.from_neuron(cls(step_mode="m", **kw).to(dtype), carry_state=True)


@pytest.mark.parametrize("kind", list(NEURONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 3, 6, 5, 5), (4, 2, 64, 16, 16)], ids=["whole", "step-by-step"])
def test_folded_exact_equals_unfolded(kind, dtype, shape):
    gen = torch.Generator().manual_seed(1)
    c = (torch.randn((2, *shape), generator=gen, dtype=dtype) * 2 + 0.3).requires_grad_(True)
    g = torch.randn((2, *shape), generator=gen, dtype=dtype)
    node, bn = _exact(kind, dtype), _bn(shape[2], dtype)
    if shape[2] == 64:
        from revpass.nodes import slicing

        node.set_slicing(slicing.CHUNK_MIN_ELEMS_FINE)  # the steps rebuilt one at a time
    ys_u, gr_u, bn_u = _run(node, bn, c, g, fold=False)
    ys_f, gr_f, bn_f = _run(node, bn, c, g, fold=True)
    for a, b in zip(ys_f, ys_u):
        assert torch.equal(a, b)  # the batch norm's own forward, then the exact node's: bit for bit
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn_f, name), getattr(bn_u, name)), name
    # c's gradient (through a carried state into the first call), gamma, beta, the node's own
    assert len(gr_f) == 3 + kind.startswith("plif")
    assert_as_accurate(gr_f, gr_u, node, bn, c, g, dtype)


def assert_as_accurate(got, ref, node, bn, c, g, dtype):
    """Each gradient within section 7 of the unfolded one, or, for a sum over the whole batch
    (gamma, beta, a PLIF's w) where the unfolded float32 gradient is itself that far from the
    float64 one, at its worst element no more than twice as far from float64 as the unfolded one
    (docs/method.md section 12: the rebuilt x^ rounds as often as the forward did)."""

    def as_accurate(a, b, truth):
        return (a.double() - truth).abs().max() <= 2 * (b.double() - truth).abs().max()

    assert_grads_close(got, ref, node, bn, c, g, dtype, reduction_ok=as_accurate)


def test_the_rebuilt_input_is_the_one_the_node_saw():
    """Family.input_steps over any grouping of steps gives z within a rounding step, and the
    state after the last step exactly the node's final state."""
    from revpass.neurons.spec import family_of
    from revpass.nodes.exact import exact_forward

    for kind in NEURONS:
        node = _exact(kind, torch.float64)
        spec, P = node.spec, {k: v.detach() for k, v in node.params().items()}
        fam = family_of(spec)
        z = torch.randn(7, 3, 4, 5, dtype=torch.float64) * 2 + 0.5
        v0 = (torch.randn(3, 4, 5, dtype=torch.float64) * 0.3,)
        _, kept, stateT = exact_forward(spec, z, v0, P, ())
        Pp = fam.prepare(spec, P)
        for n in (1, 3, 7):
            state, parts = v0, []
            for a in range(0, 7, n):
                x, state = fam.input_steps(spec, {"h": kept[0][a:a + n]}, state, Pp)
                parts.append(x)
            assert torch.allclose(torch.cat(parts), z, rtol=1e-13, atol=1e-13), (kind, n)
            assert torch.equal(state[0], stateT[0]), (kind, n)


def test_folded_exact_keeps_membranes_and_statistics_only():
    shape = (4, 2, 8, 6, 6)
    c = torch.randn(shape).requires_grad_(True)
    numel, C = math.prod(shape), shape[2]
    kept = {}
    for fold in (False, True):
        n, b = _exact(), _bn(C)
        if fold:
            n.fold_batch_norm(b)
        n.carry_state = False
        fn = (lambda: n(c * 1.0)) if fold else (lambda: n(b(c * 1.0)))  # c * 1.0: a conv output
        _, rep = saved_bytes(fn, exclude=[c, *n.parameters(), *n.buffers(), *b.parameters(), *b.buffers()])
        kept[fold] = rep.total
    assert kept[False] == numel * 4 + 2 * C * 4 + numel * 4  # bn: input, mean, 1/std; node: H
    assert kept[True] == numel * 4 + 2 * C * 4  # H, mean and 1/std


def test_a_family_that_cannot_rebuild_its_input_is_not_folded():
    import snntorch

    node = revpass.ExactNode.from_neuron(snntorch.Leaky(beta=0.9, init_hidden=False))
    with pytest.raises(ValueError, match="cannot be folded into this node"):
        node.fold_batch_norm(_bn(4))


def test_convert_folds_into_exact_nodes_only_under_a_budget():
    """Plain mode="exact" stays bit for bit (nothing folded); with a budget the exact sites fold
    their batch norms: the same forward, gradients within tolerance, less kept."""
    import models

    net = models.sj_zoo("spiking_resnet18")
    x = torch.randn(2, 2, 3, 32, 32)
    plain = revpass.convert(net, x, mode="exact")
    assert not any("revpass_folded" in n.meta for n in plain.graph.nodes)
    # a peak budget a little below the model's own: met by exact nodes everywhere, the least
    # extra compute (budget="min" recomputes the layers, whose nodes fold nothing)
    before = revpass.plan(net, x, mode="exact").peak_before
    conv = revpass.convert(net, x, mode="exact", budget=revpass.Peak(int(before * 0.9)))
    assert conv.revpass_report.count("exact") == 17
    folded = {n.target: n.meta["revpass_folded"] for n in conv.graph.nodes if "revpass_folded" in n.meta}
    # every bn1, and bn2 where the block adds its input spikes (not where a downsample adds floats)
    assert folded["sn1"] == "bn1" and len(folded) == 9 + 5
    assert folded["layer1.0.sn2"] == "layer1.0.bn2" and "layer2.0.sn2" not in folded
    call = next(n for n in conv.graph.nodes if n.target == "layer1.0.sn2")
    assert call.kwargs["residual"].target == "maxpool"  # the block's input: the stem's pooled spikes
    assert isinstance(conv.sn1, revpass.ExactNode) and conv.sn1.folded_bn is conv.bn1
    assert "section 12" in conv.revpass_report.by_path("sn1").reason
    assert set(conv.state_dict()) == set(net.state_dict())
    assert conv.revpass_budget["measured_bytes"] < revpass.plan(net, x, mode="exact").kept_after
    ref = copy.deepcopy(net)
    assert torch.equal(conv(x), ref(x))  # forward bit for bit, from the reset state
    reset_states(conv), reset_states(ref)
    y1, y2 = conv(x), ref(x)
    assert torch.equal(y1, y2)
    g1 = torch.autograd.grad(y1.sum(), [conv.conv1.weight, conv.bn1.weight, conv.get_submodule("layer1.0.bn1").bias])
    g2 = torch.autograd.grad(y2.sum(), [ref.conv1.weight, ref.bn1.weight, ref.layer1[0].bn1.bias])
    for a, b in zip(g1, g2):
        assert float((a - b).norm() / b.norm()) < 1e-5
    assert revpass.verify(net, conv, x).passed


def residual_case(residual: str, slicing=None):
    """bn(c) + r -> exact node (a LIF, no carried state), r spikes or floats, a step of 630
    elements (pieces of steps start mid-byte): (c, r, g the output's gradient, node, bn, and a
    copy of the node with a copy of bn folded into it), the node sliced at ``slicing``."""
    shape = (4, 3, 6, 5, 7)
    gen = torch.Generator().manual_seed(5)
    c = (torch.randn(shape, generator=gen) * 2 + 0.3).requires_grad_(True)
    r = (torch.rand(shape, generator=gen) > 0.6).float() if residual == "spikes" else torch.randn(shape, generator=gen)
    r.requires_grad_(True)
    g = torch.randn(shape, generator=gen)
    node, bn = _exact("lif"), _bn(6)
    node.carry_state = False
    if slicing is not None:
        node.set_slicing(slicing)
    fold, fbn = copy.deepcopy(node), copy.deepcopy(bn)
    fold.fold_batch_norm(fbn)
    return c, r, g, node, bn, fold, fbn


@pytest.mark.parametrize("residual", ["spikes", "float"])
def test_a_residual_added_before_the_node_folds_too(residual):
    """bn(c) + r -> exact node (a ResNet block's bn2 and its identity): the forward bit for bit,
    every gradient (c, r, gamma, beta) as accurate; spikes r kept as bits, not as floats."""
    c, r, g, node, bn, fold, fbn = residual_case(residual, slicing=630)  # one step at a time
    shape = c.shape
    y_u, y_f = node(bn(c) + r), fold(c, residual=r)
    assert torch.equal(y_u, y_f)
    g_u = torch.autograd.grad((y_u * g).sum(), [c, r, bn.weight, bn.bias])
    g_f = torch.autograd.grad((y_f * g).sum(), [c, r, fbn.weight, fbn.bias])
    for i, (a, b) in enumerate(zip(g_f, g_u)):
        assert close(a, b) or i >= 2 and float((a - b).abs().max()) < 1e-5 * float(b.abs().max()), (i, worst(a, b))
    exclude = [c, r, *fold.parameters(), *fold.buffers(), *fbn.parameters(), *fbn.buffers()]
    _, rep = saved_bytes(lambda: fold(c * 1.0, residual=r * 1.0), exclude=exclude)
    numel = math.prod(shape)
    r_bytes = math.ceil(numel / 8) if residual == "spikes" else numel * 4
    assert rep.total == numel * 4 + 2 * 6 * 4 + r_bytes  # H, mean and 1/std, the residual
