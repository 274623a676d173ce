"""Hand-written parametric LIF neurons (kind c): the decay sigmoid(w) of a learnable parameter w,
read with get_attr, is bound by the patterns like a constant, so that the neuron converts, the
exact conversion repeats the original's outputs and w's gradient, and the node trains the
model's own w (revpass/passes/patterns.py)."""

import math

import pytest
import torch
from torch import nn

import models
import revpass
from revpass.nodes import Node
from revpass.passes.graph import to_networkx
from revpass.passes.patterns import find_pattern_sites
from revpass.trace import trace

Spike = models._SigmoidSpike  # the user's own autograd.Function (examples/custom_neuron.py)
T = 5


class InlinePLIF(nn.Module):
    """Two PLIF layers written inline over ``for x in x_seq``, hard reset to 0. ``form``: "step"
    computes each layer's decay in every step, "once" before the loop; "no-decay-input" charges
    h = v - v q + x; "exp" decays by exp(-w), a form no pattern knows; "w-changes": the first
    layer decays by sigmoid(w2) at step 2."""

    def __init__(self, form="step"):
        super().__init__()
        self.form = form
        self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 4)
        self.w1 = nn.Parameter(torch.tensor(0.0))
        self.w2 = nn.Parameter(torch.tensor(-0.5))

    def _decay(self, w):
        return torch.exp(-w) if self.form == "exp" else torch.sigmoid(w)

    def _charge(self, v, x, q):
        return v - v * q + x if self.form == "no-decay-input" else v + (x - v) * q

    def forward(self, x_seq):
        v1 = x_seq.new_zeros(x_seq.shape[1], 6)
        v2 = x_seq.new_zeros(x_seq.shape[1], 4)
        q1, q2 = self._decay(self.w1), self._decay(self.w2)
        out = []
        for t, x in enumerate(x_seq):
            if self.form != "once":
                q1 = self._decay(self.w2 if self.form == "w-changes" and t == 2 else self.w1)
                q2 = self._decay(self.w2)
            h1 = self._charge(v1, self.fc1(x), q1)
            s1 = Spike.apply(h1 - 1.0)
            v1 = s1 * 0.0 + (1.0 - s1) * h1
            h2 = self._charge(v2, self.fc2(s1), q2)
            s2 = Spike.apply(h2 - 1.0)
            v2 = s2 * 0.0 + (1.0 - s2) * h2
            out.append(s2)
        return torch.stack(out)


class PLIF(nn.Module):
    """A multi-step PLIF module of one's own, zero reset: its w is its only tensor."""

    def __init__(self, init_tau=2.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))

    def forward(self, x_seq):
        v = torch.zeros_like(x_seq[0])
        out = []
        for x in x_seq:
            h = v + (x - v) * self.w.sigmoid()
            s = Spike.apply(h - 1.0)
            v = (1.0 - s) * h
            out.append(s)
        return torch.stack(out)


class ModulePLIF(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.sn1 = nn.Linear(8, 6), PLIF()
        self.fc2, self.sn2 = nn.Linear(6, 4), PLIF(init_tau=3.0)

    def forward(self, x_seq):
        return self.sn2(self.fc2(self.sn1(self.fc1(x_seq))))


MODELS = {"inline": InlinePLIF, "inline-once": lambda: InlinePLIF("once"),
          "inline-no-decay-input": lambda: InlinePLIF("no-decay-input"), "module": ModulePLIF}
# where each model holds its decay parameters, and where their nodes hold them
OWN_W = {"inline": ["w1", "w2"], "module": ["sn1.w", "sn2.w"]}


def _model(name):
    torch.manual_seed(0)
    x = torch.randn(T, 2, 8) + 0.8
    return MODELS[name](), x


def _own_w(name):
    return OWN_W["module" if name == "module" else "inline"]


@pytest.mark.parametrize("name", list(MODELS))
def test_each_plif_step_binds_the_models_own_parameter(name):
    model, x = _model(name)
    gm = trace(model, time_steps=T)
    sites = find_pattern_sites(gm, to_networkx(gm.graph))
    assert [(len(s.steps), s.reason) for s in sites] == [(T, ""), (T, "")]
    for site, w in zip(sites, _own_w(name)):
        assert site.spec.consts["kind"] == "plif" and site.spec.consts["tau"] is None
        assert site.spec.consts["decay_input"] is (name != "inline-no-decay-input")
        assert site.spec.params["w"] is gm.get_parameter(w)  # shared, not a copy


@pytest.mark.parametrize("name", list(MODELS))
def test_the_exact_conversion_repeats_outputs_and_the_gradient_of_w(name):
    model, x = _model(name)
    conv = revpass.convert(model, x, mode="exact")
    assert [(r.kind, r.decision) for r in conv.revpass_report.rows] == [("c", "exact")] * 2
    out, ref = conv(x), model(x)
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    for w in _own_w(name):
        g, g_ref = conv.get_parameter(w).grad, model.get_parameter(w).grad
        assert g is not None and g.abs().item() > 0
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    assert revpass.verify(model, conv, x).passed


@pytest.mark.parametrize("name", ["inline", "module"])
def test_the_reversible_conversion_passes_verify(name):
    model, x = _model(name)
    conv = revpass.convert(model, x)
    assert [(r.kind, r.decision) for r in conv.revpass_report.rows] == [("c", "reversible")] * 2
    assert revpass.verify(model, conv, x).passed


@pytest.mark.parametrize("name", ["inline", "module"])
def test_inplace_the_node_holds_the_users_very_parameter(name):
    model, x = _model(name)
    conv = revpass.convert(model, x, inplace=True)
    nodes = [m for m in conv.modules() if isinstance(m, Node)]
    assert len(nodes) == 2 and all(n.params()["w"] is model.get_parameter(w) for n, w in zip(nodes, _own_w(name)))


@pytest.mark.parametrize("mode", ["reversible", "exact"])
@pytest.mark.parametrize("name", ["inline", "module"])
def test_the_node_trains_the_models_own_parameter(name, mode):
    model, x = _model(name)
    conv = revpass.convert(model, x, mode=mode)
    nodes = [m for m in conv.modules() if isinstance(m, Node)]
    assert len(nodes) == 2
    for node, w in zip(nodes, _own_w(name)):
        assert node.params()["w"] is conv.get_parameter(w)
    before = [n.params()["w"].sigmoid().item() for n in nodes]
    out = conv(x)
    opt = torch.optim.SGD(conv.parameters(), lr=1.0)
    (out * torch.randn_like(out)).sum().backward()
    opt.step()
    after = [n.params()["w"].sigmoid().item() for n in nodes]
    assert all(a != b for a, b in zip(after, before))  # the decay the nodes use has trained


def test_a_plif_module_gives_its_place_and_its_keys_to_the_node():
    model, x = _model("module")
    conv = revpass.convert(model, x)
    assert [r.path for r in conv.revpass_report.rows] == ["sn1", "sn2"]
    assert isinstance(conv.sn1, Node) and isinstance(conv.sn2, Node)
    assert list(conv.state_dict()) == list(model.state_dict())
    # no dead get_attr or sigmoid of w is left in the graph
    assert not [n for n in conv.graph.nodes if n.op == "get_attr" or "sigmoid" in n.name]


def test_a_decay_of_no_known_form_is_reported_as_such():
    model, x = _model("inline")
    model.form = "exp"
    with pytest.warns(revpass.RevpassWarning, match="left 2 of 2 neuron sites unchanged"):
        conv = revpass.convert(model, x)
    rows = conv.revpass_report.rows
    assert [r.decision for r in rows] == ["unchanged"] * 2
    for r in rows:  # a charge that reads the membrane in its input term, not a recurrent input
        assert "the charge of step 1 is of no form the patterns know" in r.reason, r.reason
        assert "reads the membrane itself" in r.reason and "own spikes" not in r.reason
    assert torch.equal(conv(x), model(x))


def test_steps_that_read_another_parameter_are_not_one_neuron():
    model, x = _model("inline")
    model.form = "w-changes"
    with pytest.warns(revpass.RevpassWarning, match="left 1 of 2 neuron sites unchanged"):
        conv = revpass.convert(model, x)
    first, second = conv.revpass_report.rows
    assert first.decision == "unchanged" and second.decision == "reversible"
    assert "the steps do not share one neuron's equations and constants" in first.reason, first.reason


@pytest.mark.parametrize("mode", ["reversible", "exact"])
def test_an_inline_plif_keeps_the_models_state_dict_keys(mode):
    """The inline PLIF's nodes hold the model's w1/w2 (Node.borrow): the state_dict has them
    once, under the model's keys, and a checkpoint loads strictly both ways; loading sets the
    very tensor the node uses."""
    model, x = _model("inline")
    conv = revpass.convert(model, x, mode=mode)
    assert list(conv.state_dict()) == list(model.state_dict())
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved["w1"] = torch.tensor(1.5)
    conv.load_state_dict(saved, strict=True)
    node = next(m for m in conv.modules() if isinstance(m, Node))
    assert node.params()["w"].item() == 1.5
    model.load_state_dict(conv.state_dict(), strict=True)
    assert model.w1.item() == 1.5
