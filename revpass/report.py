"""What convert found and decided: one row per neuron site, printable as a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple


@dataclass
class SiteRow:
    path: str
    framework: str
    kind: str
    calls: int
    shape: Optional[Tuple[int, ...]]
    decision: str
    reason: str


@dataclass
class ConversionReport:
    """``converted.revpass_report``: every neuron site found, with the decision and its reason."""

    mode: str
    backward: str
    rows: List[SiteRow] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def count(self, decision: Optional[str] = None) -> int:
        return sum(1 for r in self.rows if decision is None or r.decision == decision)

    def by_path(self, path: str) -> SiteRow:
        for r in self.rows:
            if r.path == path:
                return r
        raise KeyError(path)

    def __str__(self) -> str:
        head = ("site", "neuron", "kind", "calls", "shape", "decision", "reason")
        body = [
            (r.path, r.framework, r.kind, str(r.calls), "x".join(map(str, r.shape)) if r.shape else "-",
             r.decision, r.reason)
            for r in self.rows
        ]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        widths[-1] = min(widths[-1], 80)

        def line(cells):
            return "  ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths)).rstrip()

        out = [
            f"revpass: {len(self.rows)} neuron sites, {self.count('reversible')} reversible, "
            f"{self.count('exact')} exact, {self.count('recompute')} recomputed (exact, in a recomputed "
            f"segment), {self.count('unchanged')} unchanged "
            f"(mode={self.mode!r}, backward={self.backward!r}); kind a = multi-step module, "
            "b = single-step calls rolled over time, c = hand-written neuron recognised from its ops",
            line(head),
            line(["-" * w for w in widths]),
        ]
        out += [line(b) for b in body]
        return "\n".join(out)

    __repr__ = __str__
