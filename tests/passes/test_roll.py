"""revpass/passes/roll.py on small traced graphs: when a single-step neuron's unrolled calls can
be rolled into one sequence node (the plan: each step's spike node, the state nodes to drop), and
the reason when they cannot."""

import operator

import pytest
import torch
from torch import nn

from revpass.passes.detect import find_sites
from revpass.passes.graph import to_networkx
from revpass.passes.roll import plan_roll
from revpass.trace import trace


class Loop(nn.Module):
    """fc -> snnTorch Leaky over T steps, in one of several styles (see forward)."""

    def __init__(self, style="plain", T=3):
        super().__init__()
        import snntorch as snn

        self.style, self.T = style, T
        self.fc, self.rec, self.lif = nn.Linear(4, 3), nn.Linear(3, 3), snn.Leaky(beta=0.5)

    def forward(self, x):
        s = self.style
        mem = self.lif.init_leaky() if s != "warm-start" else x[0][:, :3] * 0 + 1
        spk = self.fc(x[0]) * 0.0
        out, mems = [], []
        for t in range(self.T):
            cur = self.fc(x[t])
            if s == "recurrent":  # the neuron's own spikes feed its next input
                cur = cur + self.rec(spk)
            if s == "keyword":
                spk, mem = self.lif(cur, mem=mem)
            elif s == "restart":  # every call from the initial state: not one sequence
                spk, _ = self.lif(cur, self.lif.init_leaky())
            elif s == "whole" and t == self.T - 1:
                both = self.lif(cur, mem)
                spk = both[0]
                mems.append(torch.stack(both))  # the (spk, mem) tuple read whole
            else:
                spk, mem = self.lif(cur, mem)
            out.append(spk)
            if s == "membrane-out":
                mems.append(mem)
        if mems:
            return torch.stack(out), torch.stack(mems)
        return torch.stack(out)


def _plan(style, T=3):
    gm = trace(Loop(style, T))
    (site,) = find_sites(gm)
    assert site.kind == "b" and len(site.calls) == T
    return gm, site, plan_roll(site, to_networkx(gm.graph))


def test_a_plain_loop_rolls_with_its_spikes_and_the_states_to_drop():
    gm, site, (ok, why, plan) = _plan("plain", T=4)
    assert ok and why == ""
    # each step's spike is item 0 of its call; its state (item 1) is dropped
    assert [(n.target, n.args) for n in plan["spikes"]] == [(operator.getitem, (c, 0)) for c in site.calls]
    assert [(n.target, n.args) for n in plan["drop"]] == [(operator.getitem, (c, 1)) for c in site.calls]
    # the next call reads the dropped state and nothing else does
    for t, d in enumerate(plan["drop"][:-1]):
        assert list(d.users) == [site.calls[t + 1]]
    assert not plan["drop"][-1].users


@pytest.mark.parametrize("style,reason", [
    ("recurrent", "the input of step 1 depends on this neuron's own outputs (a recurrent connection)"),
    ("membrane-out", "its state (output 1 of step 0) is read by 'stack_"),
    ("warm-start", "the first call's initial state is not the reset state"),
    ("restart", "call 1's state is not the previous call's state"),
    ("keyword", "call 0 passes keyword arguments ['mem']"),
    ("whole", "call 2's output tuple is used whole by stack"),
])
def test_refusals_name_the_reason(style, reason):
    _, _, (ok, why, plan) = _plan(style)
    assert not ok and plan == {}
    assert reason in why, why


def test_the_membrane_read_by_the_output_is_named_by_its_reader():
    gm, site, (ok, why, _) = _plan("membrane-out")
    reader = next(u for u in site.calls[0].users if u.args[1] == 1)  # getitem(lif, 1): step 0's state
    names = {u.name for u in reader.users if u not in site.calls}
    assert len(names) == 1 and f"read by '{names.pop()}'" in why

