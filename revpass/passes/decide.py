"""Decide every neuron site before any is rewritten.

For each site found by :mod:`revpass.passes.detect` (library and registered neurons) and
:mod:`revpass.passes.patterns` (hand-written neurons), the decision is ``"reversible"``,
``"exact"``, ``"recompute"`` or ``"unchanged"``, with the reason, from:

* the user's selection (``include`` / ``exclude`` module-path patterns) and the strategy asked
  for, one ``mode`` for every site or the budget planner's strategy per path;
* the framework's own rules for the neuron (its adapter's ``site_rule``: snnTorch's
  ``init_hidden`` called once per forward cannot be converted);
* whether a single-step neuron's calls can be rolled into one sequence node
  (:mod:`revpass.passes.roll`; the plan is kept in ``site.details["plan"]``);
* whether the site's output is modified in place (a reversible node keeps its output for
  backward: such a site becomes exact).

Rolling one site does not change whether another can be rolled (a dependence that rolling
creates between two sites' steps would already be a cycle through both), so every site is
decided on the traced graph as it is.
"""

from __future__ import annotations

import fnmatch
import operator
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import fx

from revpass.neurons import site_rule
from revpass.passes.detect import Site
from revpass.passes.graph import to_networkx
from revpass.passes.patterns import PatternSite
from revpass.passes.roll import plan_roll

Patterns = Optional[Union[str, Iterable[str]]]
#: the budget planner's choice: {path: (strategy, or None to leave it, reason)}
Planned = Dict[str, Tuple[Optional[str], str]]


def selected(path: str, include: Patterns, exclude: Patterns) -> Tuple[bool, str]:
    """Whether ``path`` is selected by the include / exclude patterns (fnmatch), and why not."""
    def match(pats):
        return any(fnmatch.fnmatchcase(path, p) for p in ([pats] if isinstance(pats, str) else pats))

    if include is not None and not match(include):
        return False, "not in include"
    if exclude is not None and match(exclude):
        return False, "excluded"
    return True, ""


def decide(
    gm: fx.GraphModule,
    sites: List[Site],
    pattern_sites: List[PatternSite],
    *,
    mode: Optional[str] = None,
    planned: Optional[Planned] = None,
    include: Patterns = None,
    exclude: Patterns = None,
) -> None:
    """Set ``decision`` and ``reason`` on every site (see the module docstring). Either ``mode``
    (one strategy for every selected site) or ``planned`` (the planner's, per path) is given."""
    if (mode is None) == (planned is None):
        raise ValueError("decide: give either mode or planned")

    def mode_of(path: str) -> Optional[str]:
        return mode if planned is None else planned.get(path, (None, ""))[0]

    g = to_networkx(gm.graph)
    for site in sites:
        ok, why = selected(site.path, include, exclude)
        if site.spec is None or site.reason.startswith("already"):
            pass
        elif not ok:
            site.reason = why
        elif mode_of(site.path) is None:
            if planned is not None and site.path in planned:
                site.reason = planned[site.path][1]
            else:  # the planner never considered it: say why it could not be converted
                rollable, why, _ = plan_roll(site, g) if site.kind == "b" else (True, "", None)
                site.reason = "left by the planner" if rollable else why
        elif site.kind == "a":
            site.decision = mode_of(site.path)
            site.reason = "multi-step neuron: one node over (T, ...)"
        else:
            refusal, note = site_rule(site.module, len(site.calls))
            roll_ok, why, plan = plan_roll(site, g) if refusal is None else (False, refusal, {})
            if roll_ok:
                site.decision = mode_of(site.path)
                site.reason = f"{len(site.calls)} single-step calls rolled into one sequence node" + note
                site.details["plan"] = plan
            else:
                site.reason = why
        if site.decision == "reversible":
            writer = next((w for w in map(written_in_place, site.calls) if w is not None), None)
            if writer is not None:  # the reversible node keeps its output for backward; exact keeps none
                site.decision = "exact"
                site.reason += (f"; exact, not reversible: its output is modified in place by '{writer.name}' "
                                "(a reversible node keeps its output for backward)")
        if site.decision != "unchanged" and planned is not None and site.path in planned:
            site.reason += f"; planner: {planned[site.path][1]}"
    for ps in pattern_sites:
        ok, why = selected(ps.path, include, exclude)
        if ps.spec is None:
            continue
        if not ok:
            ps.reason = why
        elif mode_of(ps.path) is None:
            ps.reason = (planned or {}).get(ps.path, (None, "left by the planner"))[1]
        else:
            first = ps.steps[0]
            ps.decision = mode_of(ps.path)
            ps.reason = (f"{len(ps.steps)} steps of a hand-written neuron ({first.charge} charge, "
                         f"{first.reset} reset) rolled into one sequence node")


_VIEWS = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "permute", "transpose", "expand", "narrow",
          "unbind", "chunk", "split", "select", "view_as", "contiguous", "t"}
_INPLACE_OPS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow, operator.iand,
                operator.ior, operator.setitem}


def written_in_place(n: fx.Node) -> Optional[fx.Node]:
    """The first node that modifies ``n``'s value (or a view of it) in place, if any: a
    ``tensor.op_()`` method, ``x += ...``, ``x[i] = ...``, ``F.relu(x, inplace=True)`` or a module
    with ``inplace=True``."""
    seen, stack = set(), list(n.users)
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        name = u.target if isinstance(u.target, str) else getattr(u.target, "__name__", "")
        if u.op == "call_method" and name.endswith("_") and not name.startswith("_"):
            return u
        if u.op == "call_function" and (u.target in _INPLACE_OPS or u.kwargs.get("inplace") is True):
            return u
        if u.op == "call_module" and getattr(u.graph.owning_module.get_submodule(u.target), "inplace", False):
            return u
        if (u.op == "call_function" and u.target in (operator.getitem, torch.unbind, torch.flatten,
                                                      torch.reshape, torch.squeeze, torch.unsqueeze)) \
                or (u.op == "call_method" and name in _VIEWS):
            stack.extend(u.users)
    return None
