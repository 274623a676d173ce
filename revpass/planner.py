"""The budget planner: for each neuron site, unchanged, exact or reversible, to fit a memory budget
at the least extra compute.

Costs come from measurement, not from a model of the frameworks: the model is converted twice on
copies (every site exact, every site reversible) and both graphs are annotated
(revpass/passes/annotate.py). A site's saving under a strategy is the change of bytes kept for
backward over the site's node and its direct consumers (the layers that read its spikes: their
storage is shared with a reversible node's output), so the savings of different sites add up.

Extra compute: exact nodes cost none (same function, analytic backward), reversible nodes cost a
reconstruction in backward (about one more forward of the neuron). So the planner converts every
site where the exact node keeps less than the library neuron, then, if the budget is not met,
upgrades sites to reversible in order of the bytes each upgrade saves, until it is. ``"min"``
takes every site's smallest strategy. The budget is the activation bytes kept for backward at the
end of the forward (``revpass.plan``'s figure).
"""

from __future__ import annotations

import operator
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn

from revpass.errors import RevpassError


class BudgetError(RevpassError, ValueError):
    """The memory budget cannot be met by any choice of strategies."""


def _consumers(n: fx.Node) -> Iterable[fx.Node]:
    """The nodes that read a site's spikes, through unbind / getitem."""
    for u in n.users:
        if u.op == "call_function" and u.target in (torch.unbind, operator.getitem):
            yield from _consumers(u)
        else:
            yield u


def site_savings(converted: fx.GraphModule) -> Dict[str, int]:
    """Bytes kept before minus after, per converted site, over its node and its consumers."""
    out: Dict[str, int] = {}
    rows = {r.path: r for r in converted.revpass_report if r.decision != "unchanged"}
    for n in converted.graph.nodes:
        if n.op != "call_module" or n.target not in rows:
            continue
        hood = {n, *_consumers(n)}
        out[n.target] = sum(m.meta["revpass"].get("kept_bytes_before", 0) - m.meta["revpass"]["kept_bytes"]
                            for m in hood if "revpass" in m.meta)
    return out


def choose(
    total_before: int,
    exact: Dict[str, int],
    reversible: Dict[str, int],
    budget: Union[int, str],
) -> Tuple[Dict[str, Tuple[Optional[str], str]], int]:
    """Strategies {path: (mode or None, reason)} and the predicted bytes kept."""
    paths = sorted(set(exact) | set(reversible))
    best = {p: max(exact.get(p, 0), reversible.get(p, 0), 0) for p in paths}
    floor = total_before - sum(best.values())
    choice: Dict[str, Tuple[Optional[str], str]] = {}
    if budget == "min":
        for p in paths:
            if best[p] <= 0:
                choice[p] = (None, "no strategy keeps less than the library neuron")
            elif reversible.get(p, 0) >= exact.get(p, 0):
                choice[p] = ("reversible", f"'min': reversible keeps the least ({reversible[p]} bytes saved)")
            else:
                choice[p] = ("exact", f"'min': exact keeps the least ({exact[p]} bytes saved)")
        return choice, floor
    if not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be a number of bytes or 'min', got {budget!r}")
    if budget < floor:
        raise BudgetError(
            f"a budget of {budget} bytes cannot be met: the smallest reachable figure is {floor} bytes "
            f"({floor / 2**20:.2f} MiB) kept for backward, with every site at its smallest strategy "
            f"(budget='min'); before conversion the model keeps {total_before} bytes"
        )
    kept = total_before
    for p in paths:  # exact first: no extra compute, the original function
        if exact.get(p, 0) > 0 and kept > budget:
            choice[p] = ("exact", f"exact saves {exact[p]} bytes at no extra compute")
            kept -= exact[p]
        else:
            choice[p] = (None, "the budget is met without converting it" if kept <= budget
                         else "no strategy keeps less than the library neuron")
    upgrades = sorted(paths, key=lambda p: reversible.get(p, 0) - exact.get(p, 0) * (choice[p][0] == "exact"),
                      reverse=True)
    for p in upgrades:
        if kept <= budget:
            break
        gain = reversible.get(p, 0) - (exact.get(p, 0) if choice[p][0] == "exact" else 0)
        if gain > 0:
            choice[p] = ("reversible", f"reversible saves {reversible[p]} bytes, needed for the budget "
                                       "(costs a reconstruction in backward)")
            kept -= gain
    return choice, kept


def convert_within(
    model: nn.Module,
    example_inputs: Optional[Sequence[Any]],
    budget: Union[int, str],
    **kwargs,
) -> fx.GraphModule:
    """revpass.convert(..., budget=): plan, convert, and check the measured figure."""
    from revpass.api import convert
    from revpass.plan import plan_of

    if example_inputs is None:
        raise ValueError("convert(..., budget=...) needs example_inputs: the planner measures the model")
    inplace = kwargs.pop("inplace", False)
    rev = convert(model, example_inputs, mode="reversible", **kwargs)
    ex = convert(model, example_inputs, mode="exact", **kwargs)
    total_before = plan_of(rev, "reversible").kept_before
    choice, predicted = choose(total_before, site_savings(ex), site_savings(rev), budget)
    gm = convert(model, example_inputs, inplace=inplace, _modes=choice, **kwargs)
    gm.revpass_report.mode = f"budget={budget!r}"
    measured = plan_of(gm, "planned").kept_after
    gm.revpass_budget = {"budget": budget, "predicted_bytes": predicted, "measured_bytes": measured,
                         "bytes_before": total_before}
    if isinstance(budget, int) and measured > budget:
        raise BudgetError(
            f"the planned conversion keeps {measured} bytes, over the budget of {budget} (predicted "
            f"{predicted}); the smallest reachable figure is given by budget='min'"
        )
    return gm
