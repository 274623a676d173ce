"""The budget planner's choice: for each neuron site, unchanged, exact, reversible or recompute,
to fit a memory budget at the least extra compute. Pure functions over annotated graphs; the
driver (revpass.api) converts the probes and the chosen plan.

Costs come from measurement, not from a model of the frameworks: the model is converted on copies
with every site under each strategy, and the graphs are annotated (revpass/analysis/annotate.py). A
site's saving under a strategy is the change of bytes kept for backward over the site's node and
its direct consumers (the layers that read its spikes: their storage is shared with a reversible
node's output), or, under "recompute", over the segment that ends at it.

Extra compute, least first: exact nodes cost none (same function, analytic backward); reversible
nodes cost a reconstruction in backward (about one more forward of the neuron); "recompute" costs
one more forward of the segment (the layers between the previous neurons and this one, and the
neuron). So for a budget in bytes the planner converts every site where the exact node keeps less
than the library neuron, then, while the budget is not met, upgrades sites to reversible in order
of the bytes each upgrade saves, then to recompute. The budget is the activation bytes kept for
backward at the end of the forward (``revpass.plan``'s figure).

``budget="min"`` is the least memory a training step needs, at the least extra compute that
reaches it. It starts from every site at the strategy that keeps least, then, since a
recomputed segment's layers are rebuilt in its backward and the largest of them can set the
peak, tries the sites with the largest such workspace as reversible instead, largest first,
keeping each change that lowers the estimated peak and stopping at the first that does not; one
strategy at every site wins where its estimated peak is lower still. Then it relaxes: the
deepest site first, each site moves to the strategy of least extra compute that keeps the
estimated peak within 1% of that lowest (early layers hold the largest activations, so only
their rebuilds set the peak; the deep ones are exact nodes again), and joins the segment
before the one whose backward sets the peak into it where that lowers the estimate
(:func:`join_candidate`; a conversion per try). A ``Peak(bytes)`` budget
relaxes the lowest plan the same way, as far as the budget allows. Every estimate of a mixed
choice comes from the probes, without converting (revpass.planning.peak.PlanEstimate); only the
chosen plan is converted, and its own estimate checked
(revpass.planning.peak.estimate_peak, within 10% of a measured one).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
from torch import fx

from revpass import meta
from revpass.errors import RevpassError
from revpass.nodes.segment import RecomputeSegment

STRATEGIES = ("exact", "reversible", "recompute")  # in order of extra compute
#: the strategies that keep the original function (convert(mode="exact" or "recompute", budget=))
SAME_FUNCTION = ("exact", "recompute")


def allowed(mode: str) -> Tuple[str, ...]:
    """The strategies the planner may choose under convert's ``mode``: every one with
    ``"reversible"`` (which changes the function anyway), only :data:`SAME_FUNCTION` else."""
    return STRATEGIES if mode == "reversible" else SAME_FUNCTION


@dataclass(frozen=True)
class Peak:
    """A budget on the estimated peak of a training step (activations and temporaries, bytes;
    revpass.planning.peak.estimate_peak): ``convert(model, x, budget=revpass.Peak(12 * 2**20))``
    takes the least extra compute whose estimate fits: the model as it is, exact nodes at every
    site, else the lowest plan (``budget="min"``) with as many sites moved back to strategies of
    less extra compute as the budget allows."""

    bytes: int

    def __post_init__(self):
        if not isinstance(self.bytes, int) or isinstance(self.bytes, bool) or self.bytes <= 0:
            raise ValueError(f"Peak(bytes): a positive number of bytes, got {self.bytes!r}")

    def __repr__(self) -> str:
        return f"Peak({self.bytes})"


class BudgetError(RevpassError, ValueError):
    """The memory budget cannot be met by any choice of strategies."""


def _consumers(n: fx.Node) -> Iterable[fx.Node]:
    """The nodes that read a site's spikes, through unbind / getitem."""
    for u in n.users:
        if u.op == "call_function" and u.target in (torch.unbind, operator.getitem):
            yield from _consumers(u)
        else:
            yield u


def _saving(n: fx.Node) -> int:
    m = meta.info(n)
    return m.get("kept_bytes_before", 0) - m["kept_bytes"] if m else 0


def site_savings(converted: fx.GraphModule) -> Dict[str, int]:
    """Bytes kept before minus after, per converted site: over its node and its consumers, or
    over the recomputed segment that ends at it."""
    out: Dict[str, int] = {}
    rows = {r.path: r for r in converted.revpass_report if r.decision != "unchanged"}
    for n in converted.graph.nodes:
        if n.op != "call_module":
            continue
        m = converted.get_submodule(n.target)
        if isinstance(m, RecomputeSegment):
            for site in m.sites:
                out[site] = _saving(n)
        elif n.target in rows:
            out[n.target] = sum(_saving(u) for u in {n, *_consumers(n)})
    return out


def choose(
    total_before: int,
    savings: Dict[str, Dict[str, int]],
    budget: Union[int, str],
    strategies: Tuple[str, ...] = STRATEGIES,
) -> Tuple[Dict[str, Tuple[Optional[str], str]], int]:
    """Strategies {path: (strategy or None, reason)} for ``savings`` {strategy: {path: bytes}},
    and the predicted bytes kept. ``"min"``: every site at the strategy that saves most. Only
    ``strategies`` are chosen (:func:`allowed`)."""
    order = tuple(s for s in STRATEGIES if s in strategies)  # least extra compute first
    paths = sorted(set().union(*savings.values()))

    def gain(s, p):
        return savings.get(s, {}).get(p, 0)

    best = {p: max([0] + [gain(s, p) for s in order]) for p in paths}
    floor = total_before - sum(best.values())
    choice: Dict[str, Tuple[Optional[str], str]] = {}
    if budget == "min":
        for p in paths:
            if best[p] <= 0:
                choice[p] = (None, "no strategy keeps less than the library neuron")
            else:
                s = max(order, key=lambda s: (gain(s, p), -order.index(s)))
                choice[p] = (s, f"'min': {s} keeps the least ({gain(s, p)} bytes saved)")
        return choice, floor
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"budget must be a number of bytes or 'min', got {budget!r}")
    if budget < floor:
        raise BudgetError(
            f"a budget of {budget} bytes cannot be met: the smallest reachable figure is {floor} bytes "
            f"({floor / 2**20:.2f} MiB) kept for backward, with every site at the strategy that keeps "
            f"least; before conversion the model keeps {total_before} bytes"
        )
    kept = total_before
    for p in paths:  # exact first: no extra compute, the original function
        if gain("exact", p) > 0 and kept > budget:
            choice[p] = ("exact", f"exact saves {gain('exact', p)} bytes at no extra compute")
            kept -= gain("exact", p)
        else:
            choice[p] = (None, "the budget is met without converting it" if kept <= budget
                         else "no strategy keeps less than the library neuron")
    costs = {"reversible": "costs a reconstruction of the neuron in backward",
             "recompute": "costs one more forward of the segment ending at it"}
    for s in (s for s in ("reversible", "recompute") if s in order):
        def more(p, s=s):
            return gain(s, p) - (gain(choice[p][0], p) if choice[p][0] else 0)

        for p in sorted(paths, key=more, reverse=True):
            if kept <= budget:
                break
            delta = more(p)
            if delta > 0:
                choice[p] = (s, f"{s} saves {gain(s, p)} bytes, needed for the budget ({costs[s]})")
                kept -= delta
    for p in paths:  # left as they are: say whether a strategy would have saved anything
        if choice[p][0] is None and best[p] > 0:
            choice[p] = (None, "the budget is met without converting it")
    return choice, kept


def workspaces(gm: fx.GraphModule) -> Dict[str, int]:
    """Per site, the bytes its recomputed segment rebuilds in backward."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), RecomputeSegment):
            for site in gm.get_submodule(n.target).sites:
                out[site] = meta.info(n).get("workspace_bytes") or 0
    return out


def join_candidate(gm: fx.GraphModule) -> Optional[str]:
    """The site whose recomputed segment would join the one whose backward sets the estimated
    peak (revpass.planning.peak.estimate_peak), or None. Such a backward holds the gradient of its
    whole input (a sequence as large as the layer before it) beside its own rebuild; joined, the
    two layers are rebuilt together and that gradient exists a chunk at a time. A candidate is the
    end of a segment whose output only the peak's segment reads."""
    from revpass.planning.peak import estimate_peak

    at: list = []
    estimate_peak(gm, at)
    n = at[-1] if at else None
    if n is None or n.op != "call_module" or not isinstance(gm.get_submodule(n.target), RecomputeSegment):
        return None
    for a in n.all_input_nodes:
        if (a.op == "call_module" and isinstance(gm.get_submodule(a.target), RecomputeSegment)
                and gm.get_submodule(a.target).sites and set(a.users) == {n}):
            return gm.get_submodule(a.target).sites[-1]
    return None
