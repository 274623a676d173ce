"""revpass.plan's result: what a conversion saves, measured, node by node."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

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
class PlanGroup:
    """The rows of one module (or one kind of operation) of a plan, summed over its calls: a
    module called once per step of an unrolled time loop is one group, not T rows."""

    target: str
    strategy: str
    calls: int
    kept_before: int
    kept_after: int
    forward_step: Optional[int]  # its first call's
    backward_step: Optional[int]  # when the last of its calls' tensors is freed

    @property
    def saved(self) -> int:
        return self.kept_before - self.kept_after


@dataclass
class MemoryPlan:
    """Activation bytes kept for backward at the end of the forward, before and after conversion
    (measured: revpass.analysis.annotate), the estimated peak of a training step before and after
    (:func:`estimate_peak`), and a per-node table (``rows``), printed per module (:meth:`groups`)."""

    mode: str
    kept_before: int
    kept_after: int
    rows: List[PlanRow] = field(default_factory=list)
    peak_before: Optional[int] = None
    peak_after: Optional[int] = None

    def groups(self) -> List[PlanGroup]:
        """The rows grouped by module (or operation) and strategy, sorted by savings."""
        out: Dict[tuple, PlanGroup] = {}
        for r in self.rows:
            g = out.get((r.target, r.strategy))
            if g is None:
                out[(r.target, r.strategy)] = PlanGroup(r.target, r.strategy, 1, r.kept_before, r.kept_after,
                                                        r.forward_step, r.backward_step)
                continue
            g.calls += 1
            g.kept_before += r.kept_before
            g.kept_after += r.kept_after
            g.forward_step = _either(min, g.forward_step, r.forward_step)
            g.backward_step = _either(max, g.backward_step, r.backward_step)
        return sorted(out.values(), key=lambda g: g.saved, reverse=True)

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
            f"{'module or op':<32} {'calls':>5} {'strategy':<11} {'before':>12} {'after':>12} {'saved':>12}  "
            "fwd step  freed at bwd step",
        ]
        for g in self.groups():
            lines.append(
                f"{g.target:<32} {g.calls:>5} {g.strategy:<11} {mib(g.kept_before):>12} "
                f"{mib(g.kept_after):>12} {mib(g.saved):>12}  {g.forward_step!s:>8}  {g.backward_step!s:>16}"
            )
        return "\n".join(lines)

    __repr__ = __str__


def _either(pick, a: Optional[int], b: Optional[int]) -> Optional[int]:
    return b if a is None else a if b is None else pick(a, b)


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
            target = str(n.target) if n.op == "call_module" else getattr(n.target, "__name__", str(n.target))
            rows.append(PlanRow(n.name, target, m["strategy"], kb, ka, m["forward_step"], m["backward_step"]))
    rows.sort(key=lambda r: r.saved, reverse=True)
    return MemoryPlan(mode, before, after, rows, getattr(converted, "revpass_peak_before", None),
                      estimate_peak(converted) if annotated else None)
