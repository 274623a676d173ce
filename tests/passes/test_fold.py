"""revpass/passes/fold.py on small traced graphs: a multi-step batch norm read only by a reversible
node called once leaves the graph and runs inside the node; in every other case the graph stays
as it is. The folded graph computes what the unfolded one does."""

import pytest
import torch
from torch import nn

from catalogue import close, worst
from revpass.passes.detect import find_sites
from revpass.passes.fold import fold_batch_norms
from revpass.passes.rewrite import rewrite_site
from revpass.state import reset_states
from revpass.trace import register_leaf, trace
from revpass.utils import safe_deepcopy


class SeqBN(nn.BatchNorm2d):
    """torch's batch norm over a (T, B, C, H, W) sequence, kept as one node: not one that
    revpass/nodes/batchnorm.py knows as multi-step."""

    def forward(self, x):
        return super().forward(x.flatten(0, 1)).reshape(x.shape)


register_leaf(SeqBN)


class ConvBN(nn.Module):
    """conv -> bn -> LIF (multi-step); ``variant`` adds what forbids folding."""

    def __init__(self, variant=""):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron

        self.variant = variant
        self.conv = layer.Conv2d(2, 4, 3, padding=1, step_mode="m")
        self.bn = SeqBN(4) if variant == "plain-bn" else layer.BatchNorm2d(4, step_mode="m")
        self.sn = neuron.LIFNode(step_mode="m")
        self.bn2 = layer.BatchNorm2d(4, step_mode="m")

    def forward(self, x):
        b = self.bn(self.conv(x))
        y = self.sn(b)
        if self.variant == "bn-read-twice":
            return y + b
        if self.variant == "node-called-twice":  # each call reads a batch norm of its own
            return self.sn(self.bn2(y))
        return y


def _converted(variant="", mode="reversible"):
    torch.manual_seed(0)
    net = ConvBN(variant)
    gm = trace(net)
    for site in find_sites(gm):
        rewrite_site(gm, site, mode, "optimized", {})
    gm.recompile()
    return net, gm


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def _step(m, x, g):
    reset_states(m)
    xl = x.clone().requires_grad_(True)
    y = m(xl)
    grads = torch.autograd.grad(y, [xl, *m.parameters()], g)
    return y.detach(), grads


def test_a_batch_norm_read_by_a_reversible_node_is_folded():
    _, gm = _converted()
    unfolded = safe_deepcopy(gm)
    assert _targets(gm) == ["conv", "bn", "sn"]
    keys = set(gm.state_dict())
    assert fold_batch_norms(gm) == ["bn"]
    gm.graph.lint()
    assert _targets(gm) == ["conv", "sn"]
    (call,) = [n for n in gm.graph.nodes if n.target == "sn"]
    assert call.args[0].target == "conv"  # the node reads the convolution now
    node = gm.get_submodule("sn")
    assert node.folded_bn is gm.get_submodule("bn")  # the module stays where it was
    assert set(gm.state_dict()) == keys
    assert call.meta["revpass_folded"] == "bn" and call.meta["revpass_replaces"] == ["bn", "sn"]
    # the same function: outputs bit for bit, gradients within docs/method.md section 7 (in
    # float64: the convolution's bias gradient is a sum that the batch norm cancels to ~0), and
    # the batch norm's running statistics updated once, as unfolded
    unfolded, gm = unfolded.double(), gm.double()
    x = torch.randn(3, 2, 2, 5, 5, dtype=torch.float64) * 2 + 0.5
    g = torch.randn(3, 2, 4, 5, 5, dtype=torch.float64)
    (y0, g0), (y1, g1) = _step(unfolded, x, g), _step(gm, x, g)
    assert torch.equal(y0, y1) and y1.sum() > 0
    for a, b in zip(g1, g0):
        assert close(a, b, torch.float64), worst(a, b, torch.float64)
    assert torch.equal(gm.bn.running_mean, unfolded.bn.running_mean)
    assert torch.equal(gm.bn.running_var, unfolded.bn.running_var)
    assert fold_batch_norms(gm) == []  # nothing left to fold


@pytest.mark.parametrize("variant,mode", [
    ("", "exact"),  # an exact node keeps no output to rebuild the batch norm's input from
    ("bn-read-twice", "reversible"),  # the batch norm's output is needed elsewhere
    ("node-called-twice", "reversible"),  # one module, two calls: the batch norm would run twice
    ("plain-bn", "reversible"),  # not a multi-step batch norm
])
def test_nothing_is_folded_otherwise(variant, mode):
    _, gm = _converted(variant, mode)
    before = [(n.op, n.target, n.args) for n in gm.graph.nodes]
    assert fold_batch_norms(gm) == []
    assert [(n.op, n.target, n.args) for n in gm.graph.nodes] == before
    node = gm.get_submodule("sn")
    assert getattr(node, "folded_bn", None) is None
