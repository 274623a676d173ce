"""revpass.plan's result: what a conversion saves, measured, node by node."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from revpass import meta
from revpass.planning.peak import estimate_peak


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


def plan_of(converted, mode: str) -> MemoryPlan:
    """The plan of an already converted (and annotated) GraphModule, with the estimated peaks
    before (``converted.revpass_peak_before``) and after."""
    rows = []
    before = after = 0
    annotated = False
    for n in converted.graph.nodes:
        m = meta.info(n)
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
