"""What every example prints: the report, the plan, the verification, and a JSON summary for the
tests (--json)."""

from __future__ import annotations

import json
from typing import Any, Dict

import revpass


def summarize(net, x, modes=("reversible", "exact"), show: bool = True) -> Dict[str, Any]:
    """Convert ``net`` in each mode, verify, plan; print it all unless ``show`` is False."""
    out: Dict[str, Any] = {}
    for mode in modes:
        gm = revpass.convert(net, x, mode=mode)
        rep, ver, plan = gm.revpass_report, revpass.verify(net, gm, x), revpass.plan(net, x, mode=mode)
        if show:
            print(rep, "\n")
            print(str(plan).split("\n")[0])
            print(str(ver).split("\n")[0], "\n")
        out[mode] = {"sites": len(rep), "converted": rep.count(mode), "unchanged": rep.count("unchanged"),
                     "verified": ver.passed, "kept_before": plan.kept_before, "kept_after": plan.kept_after,
                     "peak_before": plan.peak_before, "peak_after": plan.peak_after}
    return out


def emit(result: Dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=1))
