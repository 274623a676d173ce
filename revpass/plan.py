"""revpass.plan: what a conversion would save, measured, without touching the model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import torch
from torch import nn


@dataclass
class PlanRow:
    node: str
    target: str
    strategy: str
    kept_before: int
    kept_after: int
    forward_step: Optional[int]
    backward_step: Optional[int]

    @property
    def saved(self) -> int:
        return self.kept_before - self.kept_after


@dataclass
class MemoryPlan:
    """Activation bytes kept for backward at the end of the forward, before and after conversion
    (measured: revpass.passes.annotate), the estimated peak of a training step before and after
    (:func:`estimate_peak`), and a per-node table sorted by savings."""

    mode: str
    kept_before: int
    kept_after: int
    rows: List[PlanRow] = field(default_factory=list)
    peak_before: Optional[int] = None
    peak_after: Optional[int] = None

    @property
    def ratio(self) -> float:
        return self.kept_before / self.kept_after if self.kept_after else float("inf")

    def __str__(self) -> str:
        def mib(n):
            return f"{n / 2**20:.3f} MiB"

        lines = [
            f"revpass memory plan (mode={self.mode!r}): activations kept for backward at the end of the "
            f"forward {mib(self.kept_before)} -> {mib(self.kept_after)} ({self.ratio:.2f}x less)"
            + (f"; estimated peak of a training step (activations and temporaries) {mib(self.peak_before)}"
               f" -> {mib(self.peak_after)}" if self.peak_before is not None else ""),
            f"{'node':<24} {'module':<20} {'strategy':<11} {'before':>12} {'after':>12} {'saved':>12}  "
            "fwd step  freed at bwd step",
        ]
        for r in self.rows:
            lines.append(
                f"{r.node[:24]:<24} {r.target[:20]:<20} {r.strategy:<11} {mib(r.kept_before):>12} "
                f"{mib(r.kept_after):>12} {mib(r.saved):>12}  {r.forward_step!s:>8}  {r.backward_step!s:>16}"
            )
        return "\n".join(lines)

    __repr__ = __str__


def plan(model: nn.Module, example_inputs: Sequence[Any], *, mode: str = "reversible", **kwargs) -> MemoryPlan:
    """The memory plan of converting ``model`` (a copy is converted and measured; ``model`` is
    not changed). Keyword arguments go to :func:`revpass.convert`."""
    from revpass.api import convert

    if kwargs.get("inplace"):
        raise ValueError("plan never converts in place; call revpass.convert(..., inplace=True) for that")
    return plan_of(convert(model, example_inputs, mode=mode, **kwargs), mode)


def _bytes(info) -> int:
    shape = info.get("shape") if info else None
    if not shape:
        return 0
    return math.prod(shape) * getattr(torch, info["dtype"]).itemsize


def estimate_peak(gm) -> int:
    """Estimated peak of one training step's memory beyond parameters, gradients, buffers and
    optimizer state (activations plus temporaries), from an annotated GraphModule, without running
    a backward. The model of a training step:

    * at the end of the forward, every node's kept bytes are held, and each stateful neuron keeps
      its final state (one step of its output);
    * the backward visits the nodes in reverse; at a node it holds the gradients of its output
      and inputs (and, for a recomputed segment, its rebuilt layers: ``workspace_bytes``), and
      the gradients of values with several readers accumulate until their producer is reached;
      after it, the node's kept bytes are freed and its module's parameter gradients exist;
    * the peak is where parameters' gradients plus held activations and temporaries are largest
      (deep layers hold most parameters, early ones most activations); the figure is the
      activations and temporaries there, which is what MemTracker's peak less parameters,
      gradients, buffers and optimizer state measures.
    """
    from revpass.neurons import is_neuron
    from revpass.nodes.modules import _Node
    from revpass.nodes.segment import RecomputeSegment

    nodes = sorted((n for n in gm.graph.nodes if n.meta.get("revpass", {}).get("forward_step") is not None),
                   key=lambda n: n.meta["revpass"]["forward_step"])
    kept = {n: n.meta["revpass"]["kept_bytes"] for n in nodes}
    held = sum(kept.values())
    stateful = set()
    for n in nodes:
        if n.op == "call_module" and n.target not in stateful:
            m = gm.get_submodule(n.target)
            if isinstance(m, RecomputeSegment):  # the node at its end carries its state
                carries = any(isinstance(x, _Node) and x.carry_state for x in m.body.modules())
            else:
                carries = m.carry_state if isinstance(m, _Node) else is_neuron(m)
            shape = n.meta["revpass"]["shape"]
            if carries and shape:
                stateful.add(n.target)
                held += _bytes(n.meta["revpass"]) // shape[0]  # one step of its output
    grads = 0
    best_total, best = held, held
    seen = set()
    pending = {}  # gradients of multi-reader values, accumulating until their producer runs
    for n in reversed(nodes):
        info = n.meta["revpass"]
        pending.pop(n, None)
        inputs = [a for a in n.all_input_nodes if a.meta.get("revpass", {}).get("shape")]
        temp = 0
        if kept[n] or n.op == "call_module":
            temp = _bytes(info) + sum(_bytes(a.meta["revpass"]) for a in inputs)
        temp += info.get("workspace_bytes", 0)  # a recomputed segment's layers, rebuilt for its backward
        temp += sum(pending.values())
        for a in inputs:
            if len(a.users) > 1:
                pending[a] = _bytes(a.meta["revpass"])
        if n.op == "call_module" and n.target not in seen:
            seen.add(n.target)
            grads += sum(p.numel() * p.element_size() for p in _trained(gm.get_submodule(n.target)))
        if grads + held + temp > best_total:
            best_total, best = grads + held + temp, held + temp
        held -= kept[n]
    return best


def _trained(m: nn.Module):
    """The parameters whose gradients a module's backward makes (revpass.passes.annotate.owners:
    a recomputed segment's layers and a batch norm folded into a node included)."""
    from revpass.passes.annotate import owners

    seen = set()
    for o in owners(m):
        for p in o.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield p


def plan_of(converted, mode: str) -> MemoryPlan:
    """The plan of an already converted (and annotated) GraphModule, with the estimated peaks
    before (``converted.revpass_peak_before``) and after."""
    rows = []
    before = after = 0
    annotated = False
    for n in converted.graph.nodes:
        m = n.meta.get("revpass")
        if m is None:
            continue
        annotated = True
        kb, ka = m.get("kept_bytes_before", 0), m["kept_bytes"]
        before, after = before + kb, after + ka
        if kb or ka:
            rows.append(PlanRow(n.name, str(n.target) if n.op == "call_module" else n.op, m["strategy"],
                                kb, ka, m["forward_step"], m["backward_step"]))
    rows.sort(key=lambda r: r.saved, reverse=True)
    return MemoryPlan(mode, before, after, rows, getattr(converted, "revpass_peak_before", None),
                      estimate_peak(converted) if annotated else None)
