"""Find the neuron sites of a traced model.

A *site* is one neuron module and its calls in the graph:

* kind ``a``: a multi-step neuron (SpikingJelly ``step_mode='m'``, norse ``LIF``) called on a whole
  (T, ...) sequence: one call, one node;
* kind ``b``: a single-step neuron (SpikingJelly ``step_mode='s'``, snnTorch ``Leaky``/``Synaptic``,
  norse ``LIFCell``/``LIFBoxCell``) called once per step of an unrolled time loop: T calls, which
  :mod:`revpass.passes.roll` turns into one sequence node when no input of step t depends on the
  neuron's own outputs and its state is read by nothing but its own next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import fx, nn

from revpass.errors import UnsupportedNeuronError
from revpass.neurons import NeuronSpec, is_neuron, spec_from_module, step_mode
from revpass.nodes import Node
from revpass.passes.graph import module_calls


@dataclass
class Site:
    """One neuron module, its calls, and what the pass decided for it."""

    path: str
    module: nn.Module
    kind: str  # "a" multi-step, "b" single-step in a time loop
    calls: List[fx.Node]
    spec: Optional[NeuronSpec] = None
    decision: str = "unchanged"  # "reversible" | "exact" | "recompute" | "unchanged" (passes/decide.py)
    reason: str = ""
    shape: Optional[Tuple[int, ...]] = None
    details: Dict[str, object] = field(default_factory=dict)

    @property
    def framework(self) -> str:
        return f"{type(self.module).__module__.split('.')[0]}.{type(self.module).__name__}"


def find_sites(gm: fx.GraphModule) -> List[Site]:
    """Every neuron module called in ``gm``'s graph, in order of first call."""
    sites = []
    for target, calls in module_calls(gm).items():
        m = gm.get_submodule(target)
        if isinstance(m, Node):
            sites.append(Site(target, m, "a" if m.step_mode == "m" else "b", calls,
                              decision="unchanged", reason=f"already a revpass {m.kind} node"))
            continue
        if not is_neuron(m):
            continue
        sites.append(neuron_site(target, m, "a" if step_mode(m) == "m" else "b", calls))
    return sites


def neuron_site(path: str, m: nn.Module, kind: str, calls: List[fx.Node], **details) -> Site:
    """The site of neuron ``m`` at ``path``, its spec read (or the reason it cannot be)."""
    site = Site(path, m, kind, calls, details=dict(details))
    try:
        site.spec = spec_from_module(m, path)
    except UnsupportedNeuronError as exc:
        site.reason = str(exc)
    return site
