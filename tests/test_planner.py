"""convert(..., budget=): the planner picks strategies per site from measured savings."""

import pytest
import torch

import models
import revpass


@pytest.fixture(scope="module")
def resnet():
    net = models.sj_zoo("spiking_resnet18")
    x = torch.randn(4, 2, 3, 32, 32)
    rev, ex = revpass.plan(net, x), revpass.plan(net, x, mode="exact")
    return net, x, rev, ex


def test_min_takes_every_sites_smallest_strategy(resnet):
    net, x, rev, ex = resnet
    conv = revpass.convert(net, x, budget="min")
    b = conv.revpass_budget
    assert b["measured_bytes"] == b["predicted_bytes"]  # the per-site savings add up
    assert b["measured_bytes"] <= min(rev.kept_after, ex.kept_after)
    assert b["bytes_before"] == rev.kept_before
    assert conv.revpass_report.count("unchanged") == 0


def test_a_budget_between_uses_exact_first_then_reversible(resnet):
    net, x, rev, ex = resnet
    budget = (ex.kept_after + rev.kept_after) // 2  # exact everywhere is not enough
    conv = revpass.convert(net, x, budget=budget)
    rep = conv.revpass_report
    assert conv.revpass_budget["measured_bytes"] <= budget
    assert rep.count("reversible") > 0 and rep.count("exact") > 0
    assert all("planner:" in r.reason for r in rep if r.decision != "unchanged")
    # a generous budget converts only what it needs, with exact nodes (no extra compute)
    loose = revpass.convert(net, x, budget=(rev.kept_before + ex.kept_after) // 2)
    assert loose.revpass_report.count("reversible") == 0
    assert 0 < loose.revpass_report.count("exact") < len(loose.revpass_report)
    assert loose.revpass_budget["measured_bytes"] <= (rev.kept_before + ex.kept_after) // 2


def test_an_unreachable_budget_names_the_smallest_figure(resnet):
    net, x, rev, ex = resnet
    floor = revpass.convert(net, x, budget="min").revpass_budget["measured_bytes"]
    with pytest.raises(revpass.BudgetError, match=f"smallest reachable figure is {floor} bytes"):
        revpass.convert(net, x, budget=1000)
    with pytest.raises(ValueError, match="needs example_inputs"):
        revpass.convert(net, budget="min")


def test_planner_on_rolled_snntorch_sites():
    net = models.SnnTorchConv()
    x = torch.randn(2, 1, 28, 28) * 2
    conv = revpass.convert(net, x, budget="min")
    rep = conv.revpass_report
    assert rep.by_path("lif3").decision == "unchanged"  # its membrane is an output
    assert conv.revpass_budget["measured_bytes"] < conv.revpass_budget["bytes_before"]
    assert revpass.verify(net, conv, x).passed  # against the same model with the autograd backward
