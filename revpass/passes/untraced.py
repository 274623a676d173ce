"""The neurons inside the parts of a model the tracer kept whole.

:func:`revpass.trace.trace` keeps a submodule whose forward cannot be traced as one node (and
modules registered with ``revpass.trace.register_leaf``), and records each such part and why in
``gm.revpass_untraced`` ({path: reason}). Its neurons are not in the graph:

* a multi-step neuron (one call over the whole (T, ...) sequence) is a site of kind ``a`` with no
  calls in the graph: converting it is swapping the module at its path (what
  :func:`revpass.passes.rewrite.rewrite_site` does for kind ``a``), which the part's own forward
  then calls as it called the neuron;
* a single-step neuron is called once per step by code the graph does not show: its calls cannot
  be rolled, and it is left with that reason;
* a hand-written neuron is only found from its operations in the graph (kind ``c``): the part
  itself is reported (:func:`untraced_parts`).

:func:`untraced_sites` makes those sites (the driver adds them to the detected ones, before
decide); :func:`settle` adjusts the decisions decide made for them (a ``"recompute"`` site has no
traced layers around it to recompute: it becomes exact) and says in each reason where it is.
"""

from __future__ import annotations

from typing import List, Tuple

from torch import fx

from revpass.neurons import is_neuron, step_mode
from revpass.nodes import Node
from revpass.passes.detect import Site, neuron_site
from revpass.trace import UNTRACED

#: the key in ``Site.details`` naming the untraced part a site is in
PART = "untraced_part"


def untraced_parts(gm: fx.GraphModule) -> List[Tuple[str, str]]:
    """(path, reason) of every part of ``gm`` kept whole by the tracer, in graph order."""
    return list(getattr(gm, UNTRACED, {}).items())


def untraced_sites(gm: fx.GraphModule) -> List[Site]:
    """The neuron sites inside the parts of ``gm`` kept whole by the tracer (module docstring),
    in module order; none of them has a call in the graph."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    sites: List[Site] = []
    seen = set()
    for part, why in untraced_parts(gm):
        try:
            root = gm.get_submodule(part)
        except AttributeError:
            continue
        inside_neuron: List[str] = []
        for name, m in root.named_modules():
            if not name or id(m) in seen:
                continue
            path = f"{part}.{name}"
            if any(path.startswith(p + ".") for p in inside_neuron) or path in called:
                continue
            if isinstance(m, Node):
                inside_neuron.append(path)
                seen.add(id(m))
                sites.append(Site(path, m, "a" if m.step_mode == "m" else "b", [],
                                  reason=f"already a revpass {m.kind} node", details={PART: part}))
                continue
            if not is_neuron(m):
                continue
            inside_neuron.append(path)
            seen.add(id(m))
            if step_mode(m) != "m":
                sites.append(Site(path, m, "b", [], details={PART: part}, reason=(
                    f"single-step neuron inside '{part}', which is kept whole ({why}): its calls are not "
                    "in the graph and cannot be rolled into one node")))
                continue
            sites.append(neuron_site(path, m, "a", [], **{PART: part}))
    return sites


def settle(sites: List[Site]) -> None:
    """After decide: the sites inside untraced parts say so; ``"recompute"`` becomes exact (no
    traced layers around the node to recompute)."""
    for site in sites:
        part = site.details.get(PART)
        if part is None or site.decision == "unchanged":
            continue
        if site.decision == "recompute":
            site.decision = "exact"
            site.reason += (f"; exact, not recompute: inside '{part}', which is kept whole by the tracer "
                            "(no traced layers around it to recompute)")
        else:
            site.reason += f"; inside '{part}', which is kept whole by the tracer: the module is swapped"
