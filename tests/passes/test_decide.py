"""revpass/passes/decide.py on small traced graphs: the selection patterns, one mode or the
planner's strategy per path, a rolled site's reason, and a reversible site whose output is
written in place made exact."""

import pytest
from torch import nn

from revpass.passes.decide import decide, selected, written_in_place
from revpass.passes.detect import find_sites
from revpass.trace import trace


class Two(nn.Module):
    def __init__(self, inplace=False):
        super().__init__()
        from spikingjelly.activation_based import neuron

        self.inplace = inplace
        self.fc1, self.sn1 = nn.Linear(4, 6), neuron.LIFNode(step_mode="m")
        self.fc2, self.sn2 = nn.Linear(6, 2), neuron.LIFNode(step_mode="m")

    def forward(self, x):
        s = self.sn1(self.fc1(x))
        if self.inplace:
            s.mul_(2.0)  # modifies the spikes in place
        return self.sn2(self.fc2(s))


def test_selected_by_include_and_exclude_patterns():
    assert selected("layer1.0.sn1", None, None) == (True, "")
    assert selected("layer1.0.sn1", "layer1.*", None) == (True, "")
    assert selected("layer2.0.sn1", ["layer1.*", "layer3.*"], None) == (False, "not in include")
    assert selected("layer1.0.sn1", "layer1.*", "*.sn1") == (False, "excluded")


def test_one_mode_everywhere_and_the_selection():
    gm = trace(Two())
    sites = find_sites(gm)
    decide(gm, sites, [], mode="exact", exclude="sn2")
    assert [(s.decision, s.reason) for s in sites] == [("exact", "multi-step neuron: one node over (T, ...)"),
                                                       ("unchanged", "excluded")]
    with pytest.raises(ValueError, match="either mode or planned"):
        decide(gm, sites, [], mode="exact", planned={})
    with pytest.raises(ValueError, match="either mode or planned"):
        decide(gm, sites, [])


def test_the_planners_strategy_per_path_with_its_reason():
    gm = trace(Two())
    sites = find_sites(gm)
    decide(gm, sites, [], planned={"sn1": ("reversible", "saves 10 bytes"), "sn2": (None, "saves nothing")})
    assert [(s.decision, s.reason) for s in sites] == [
        ("reversible", "multi-step neuron: one node over (T, ...); planner: saves 10 bytes"),
        ("unchanged", "saves nothing")]


def test_spikes_written_in_place_make_a_reversible_site_exact():
    gm = trace(Two(inplace=True))
    sites = find_sites(gm)
    (writer,) = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "mul_"]
    assert written_in_place(sites[0].calls[0]) is writer and written_in_place(sites[1].calls[0]) is None
    decide(gm, sites, [], mode="reversible")
    assert [s.decision for s in sites] == ["exact", "reversible"]
    assert "exact, not reversible: its output is modified in place by 'mul_'" in sites[0].reason


def test_a_rolled_site_says_how_many_calls():
    from test_roll import Loop

    gm = trace(Loop("plain", T=5))
    (site,) = find_sites(gm)
    decide(gm, [site], [], mode="reversible")
    assert site.decision == "reversible" and site.reason.startswith("5 single-step calls rolled into one sequence node")
    assert [n.args for n in site.details["plan"]["spikes"]] == [(c, 0) for c in site.calls]
    gm = trace(Loop("recurrent"))
    (site,) = find_sites(gm)
    decide(gm, [site], [], mode="reversible")
    assert site.decision == "unchanged" and "depends on this neuron's own outputs" in site.reason
