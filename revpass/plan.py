"""revpass.plan: what a conversion would save, measured, without touching the model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

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


def slice_where_it_sets_the_peak(gm, tolerance: float = 0.05) -> Dict[str, int]:
    """Give backward slices (revpass.nodes.slicing) to the nodes of an annotated converted model
    whose transient would set the peak of a training step, and only as many as it takes.

    Slices bound a node's backward transient (the PyTorch path's records and factors) to a
    fraction of it, at the price of more, smaller kernel launches: a converted model runs fastest
    unsliced, and lowest with every node in CHUNK_MAX slices. This keeps the estimated peak
    (:func:`estimate_peak`) within ``tolerance`` of the latter's with the fewest slices:
    starting unsliced, it doubles the slices of the node whose doubling lowers the estimate most
    (where none does alone, of the one whose workspace falls most), until the estimate is within
    bounds. A node's workspace in k slices is interpolated between
    its measured whole and finest workspaces (the records scale with the slice, the rest does
    not), and measured again once chosen. Returns {node path: slices} for the nodes it sliced."""
    from revpass.nodes.modules import _Node
    from revpass.nodes.slicing import CHUNK_MIN_ELEMS_FINE, chunks
    from revpass.passes.annotate import node_workspace

    groups: Dict[str, list] = {}
    for n in gm.graph.nodes:
        info = n.meta.get("revpass", {})
        if n.op == "call_module" and info.get("workspace_bytes") and info.get("shape"):
            m = gm.get_submodule(n.target)
            if isinstance(m, _Node) and m.slice_min_elems is None:
                groups.setdefault(n.target, []).append(n)

    def measure(m, ns):
        return [node_workspace(m, n.meta["revpass"]["shape"], getattr(torch, n.meta["revpass"]["dtype"])) for n in ns]

    whole, finest, most = {}, {}, {}
    for target, ns in groups.items():
        m = gm.get_submodule(target)
        plan = chunks(ns[0].meta["revpass"]["shape"], m.params(), CHUNK_MIN_ELEMS_FINE)
        if plan is None:
            continue
        most[target] = len(plan[1])
        whole[target] = [n.meta["revpass"]["workspace_bytes"] for n in ns]
        m.set_slicing(CHUNK_MIN_ELEMS_FINE)
        finest[target] = measure(m, ns)
        m.set_slicing(None)

    def set_ws(target, k):
        for i, n in enumerate(groups[target]):
            w, f, K = whole[target][i], finest[target][i], most[target]
            var = max(0.0, (w - f) * K / (K - 1))  # ws(k) = fixed + var / k through both measurements
            n.meta["revpass"]["workspace_bytes"] = int(w - var + var / k)

    for target in most:
        set_ws(target, most[target])
    bound = estimate_peak(gm) * (1 + tolerance)
    k = {target: 1 for target in most}
    for target in most:
        set_ws(target, 1)
    peak = estimate_peak(gm)
    while peak > bound:
        best = None  # (estimate, -workspace saved, target): the lowest estimate, then the most saved
        for target in most:
            if k[target] >= most[target]:
                continue
            before = sum(n.meta["revpass"]["workspace_bytes"] for n in groups[target])
            set_ws(target, min(2 * k[target], most[target]))
            trial = (estimate_peak(gm), sum(n.meta["revpass"]["workspace_bytes"] for n in groups[target]) - before,
                     target)
            set_ws(target, k[target])
            best = trial if best is None or trial[:2] < best[:2] else best
        if best is None:
            break
        peak, _, target = best
        k[target] = min(2 * k[target], most[target])
        set_ws(target, k[target])
    sliced = {}
    for target, n_slices in k.items():
        if n_slices == 1:
            continue
        m = gm.get_submodule(target)
        per_step = math.prod(groups[target][0].meta["revpass"]["shape"][1:])
        m.set_slicing(-(-per_step // n_slices) if n_slices < most[target] else CHUNK_MIN_ELEMS_FINE)
        for n, w in zip(groups[target], measure(m, groups[target])):
            n.meta["revpass"]["workspace_bytes"] = w
            n.meta.setdefault("custom", {}).setdefault("revpass", {})["workspace_bytes"] = w
        sliced[target] = n_slices
    return sliced


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
