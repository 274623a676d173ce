"""What convert found and decided: one row per neuron site, printable as a table."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


REASON_WIDTH = 80  # the reason column wraps at this width


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
    #: parts of the model the tracer kept whole, and why: [(module path, reason)]
    untraced: List[Tuple[str, str]] = field(default_factory=list)

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
        widths[-1] = min(widths[-1], REASON_WIDTH)

        def line(cells):
            return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

        def wrapped(cells):  # the reason in full, on as many lines as it takes
            parts = textwrap.wrap(cells[-1], widths[-1], break_long_words=False) or [""]
            return [line(list(cells[:-1]) + parts[:1])] + [line([""] * (len(cells) - 1) + [p]) for p in parts[1:]]

        out = [
            f"revpass: {len(self.rows)} neuron sites, {self.count('reversible')} reversible, "
            f"{self.count('exact')} exact, {self.count('recompute')} recomputed (exact, in a recomputed "
            f"segment), {self.count('unchanged')} unchanged "
            f"(mode={self.mode!r}, backward={self.backward!r}); kind a = multi-step module, "
            "b = single-step calls rolled over time, c = hand-written neuron recognised from its ops",
            line(head),
            line(["-" * w for w in widths]),
        ]
        out += [text for b in body for text in wrapped(b)]
        for path, why in self.untraced:
            out += textwrap.wrap(f"kept whole by the tracer: {path}: {why}", len(out[1]) or 120,
                                 subsequent_indent="    ", break_long_words=False)
        return "\n".join(out)

    __repr__ = __str__
