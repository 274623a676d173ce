"""revpass/passes/patterns.py on small traced graphs: the matcher, the steps it finds in a
hand-written neuron (charge, reset, constants), the chains it forms and the reason a chain is
refused; the rewrite of a chain into one sequence node, with the same outputs."""

import operator

import pytest
import torch
from torch import fx, nn

import models
from revpass.nodes import ExactNode
from revpass.passes.graph import to_networkx
from revpass.passes.patterns import find_pattern_sites, find_steps, match, rewrite_pattern_site
from revpass.trace import trace

Spike = models._SigmoidSpike  # the user's own autograd.Function (examples/custom_neuron.py)


class Hand(nn.Module):
    """fc -> a hand-written neuron over T steps, inline; ``variant`` breaks one of the rules."""

    def __init__(self, charge="lif", reset="hard", variant="", T=3):
        super().__init__()
        self.charge, self.reset, self.variant, self.T = charge, reset, variant, T
        self.fc, self.rec = nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x):
        v = torch.zeros_like(self.fc(x[0]))
        if self.variant == "warm":
            v = torch.ones_like(v)
        s = v
        out, mems = [], []
        for t in range(self.T):
            cur = self.fc(x[t])
            if self.variant == "recurrent":
                cur = cur + self.rec(s)
            tau = 3.0 if (self.variant == "tau-changes" and t == 2) else 2.0
            if self.charge == "lif":
                h = v + (cur - v) / tau
            elif self.charge == "lif-no-decay-input":
                h = v - v / tau + cur
            elif self.charge == "beta-lif":
                h = 0.75 * v + cur
            else:
                h = v + cur
            s = Spike.apply(h - 0.5)
            if self.reset == "hard":
                v = s * (0.25 if self.variant == "v-reset" else 0.0) + (1.0 - s) * h
            elif self.reset == "zero":
                v = h * (1.0 - s)
            else:
                v = h - s * 0.5
            out.append(s)
            if self.variant == "membrane-out":
                mems.append(h)
        if mems:
            return torch.stack(out), torch.stack(mems)
        return torch.stack(out)


def _sites(model):
    gm = trace(model)
    return gm, find_pattern_sites(gm, to_networkx(gm.graph))


def _fx(fn):
    """The graph of ``fn(a, b)`` and its output's producer."""
    gm = fx.symbolic_trace(fn)
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    return out.args[0], [n for n in gm.graph.nodes if n.op == "placeholder"]


def test_match_binds_values_and_constants_and_tries_both_orders_of_commutative_ops():
    add, mul, sub, div = operator.add, operator.mul, operator.sub, operator.truediv
    node, (a, b) = _fx(lambda a, b: 0.75 * a + b)
    bind, inner = {}, []
    assert match((add, (mul, ("c", "beta"), "V"), "X"), node, bind, inner)
    assert bind == {"beta": 0.75, "V": a, "X": b} and len(inner) == 2 and inner[-1] is node
    node, (a, b) = _fx(lambda a, b: b + a * 0.75)  # both operands swapped: add and mul commute
    bind = {}
    assert match((add, (mul, ("c", "beta"), "V"), "X"), node, bind, [])
    assert bind["V"] is a and bind["X"] is b
    node, (a, b) = _fx(lambda a, b: a - b)  # sub does not commute
    assert match((sub, "X", "H"), node, {"X": a}, []) and not match((sub, "X", "H"), node, {"X": b}, [])
    node, _ = _fx(lambda a, b: (a - b) / 2.0)
    assert match((div, (sub, "X", "V"), 2.0), node, {}, [])
    assert not match((div, (sub, "X", "V"), 3.0), node, {}, [])  # a bare number must match exactly
    assert not match((div, (sub, "X", "V"), ("c", "tau")), node, {"tau": 3.0}, [])  # a bound constant too
    node, (a, b) = _fx(lambda a, b: a + a)
    assert match((add, "V", "V"), node, {}, [])  # a name bound twice is one value
    node, (a, b) = _fx(lambda a, b: a + b)
    assert not match((add, "V", "V"), node, {}, [])


@pytest.mark.parametrize("charge,consts", [
    ("lif", {"tau": 2.0, "decay_input": True}),
    ("lif-no-decay-input", {"tau": 2.0, "decay_input": False}),
    ("beta-lif", {"kind": "beta", "beta": 0.75}),
    ("if", {"kind": "if"}),
])
@pytest.mark.parametrize("reset,v_reset", [("hard", 0.0), ("zero", 0.0), ("soft", None)])
def test_steps_are_recognised_with_their_constants(charge, consts, reset, v_reset):
    model = Hand(charge, reset, T=3)
    gm = trace(model)
    steps = find_steps(gm)
    assert len(steps) == 3
    assert {(st.charge, st.reset) for st in steps} == {(charge, reset)}
    spikes = [n for n in gm.graph.nodes if hasattr(n.target, "revpass_function")]
    assert [st.spike for st in steps] == spikes and all(st.consts["thr"] == 0.5 for st in steps)
    for t in (1, 2):  # each step's state is the previous step's next state
        assert steps[t].V is steps[t - 1].V_next
    assert steps[0].V.target is torch.zeros_like
    assert all(st.X.op == "call_module" and st.X.target == "fc" for st in steps)
    (site,) = find_pattern_sites(gm, to_networkx(gm.graph))
    assert site.reason == "" and len(site.steps) == 3 and site.path == "revpass_neuron_0"
    spec = site.spec
    assert spec.family == "spikingjelly" and spec.origin == f"pattern:{charge}/{reset}"
    assert spec.consts["v_threshold"] == 0.5 and spec.consts["v_reset"] == v_reset
    assert {k: spec.consts[k] for k in consts} == consts
    assert spec.surrogate.fires_at_zero  # the user's Spike fires where h - 0.5 >= 0: read from it


def test_a_neuron_module_is_named_by_its_path():
    gm = trace(models.HandNet(), time_steps=4)
    sites = find_pattern_sites(gm, to_networkx(gm.graph))
    assert [(s.path, len(s.steps), s.reason) for s in sites] == [("sn1", 4, ""), ("sn2", 4, "")]
    assert [s.spec.consts["tau"] for s in sites] == [2.0, 3.0]


@pytest.mark.parametrize("variant,reason", [
    ("warm", "the first step does not start from a zero state"),
    ("recurrent", "the input of step 1 depends on this neuron's own spikes"),
    ("membrane-out", "an intermediate value of step 0 (membrane or state) is read by 'stack_"),
    ("tau-changes", "the steps do not share one neuron's equations and constants"),
    ("v-reset", "a hard reset to a non-zero v_reset starting from a zero state"),
])
def test_refused_chains_say_why(variant, reason):
    _, sites = _sites(Hand("lif", "hard", variant))
    (site,) = sites
    assert len(site.steps) == 3 and site.spec is None
    assert reason in site.reason, site.reason


@pytest.mark.parametrize("charge,reset", [("lif", "hard"), ("beta-lif", "soft"), ("if", "zero")])
def test_rewrite_rolls_the_chain_into_one_node_with_the_same_outputs(charge, reset):
    torch.manual_seed(0)
    model = Hand(charge, reset, T=4)
    x = torch.randn(4, 2, 4) + 0.5
    gm, (site,) = _sites(model)
    n_before = len(gm.graph.nodes)
    inner = {n.name for st in site.steps for n in [st.spike, *st.inner]}
    node = ExactNode(site.spec, step_mode="m", carry_state=False, name=site.path)
    path = rewrite_pattern_site(gm, site, node)
    gm.graph.lint()
    gm.recompile()
    assert path == "revpass_neuron_0" and gm.get_submodule(path) is node
    names = {n.name for n in gm.graph.nodes}
    assert not names & inner  # every op of the neuron is gone, spikes included
    assert not any(hasattr(n.target, "revpass_function") for n in gm.graph.nodes)
    (call,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path]
    stack = call.args[0]
    assert stack.target is torch.stack and [a.target for a in stack.args[0]] == ["fc"] * 4
    (unbind,) = call.users
    assert unbind.target is torch.unbind and len(unbind.users) == 4
    assert sorted(call.meta["revpass_replaces"]) == sorted(inner)
    # 4 steps x (spike + its inner ops) + the zero state, replaced by stack, node, unbind, 4 items
    assert len(gm.graph.nodes) == n_before - len(inner) - 1 + 3 + 4
    assert torch.equal(gm(x), model(x))
