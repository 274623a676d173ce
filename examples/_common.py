"""What every example prints: the report, the plan, the verification, and a JSON summary for the
tests (--json)."""

from __future__ import annotations

import json
from typing import Any, Dict

import revpass


def summarize(net, x, modes=("reversible", "exact"), show: bool = True) -> Dict[str, Any]:
    """Convert ``net`` in each mode, verify, plan, measure a training step's peak (MemTracker,
    revpass.memory.step_peak); print it all unless ``show`` is False."""
    from revpass.memory import step_peak
    from revpass.planning.memory_plan import plan_of

    out: Dict[str, Any] = {}
    measured_before = step_peak(net, x)
    for mode in modes:
        gm = revpass.convert(net, x, mode=mode)
        rep, ver, plan = gm.revpass_report, revpass.verify(net, gm, x), plan_of(gm, mode)
        measured = step_peak(gm, x)
        if show:
            print(rep, "\n")
            print(str(plan).split("\n")[0])
            print(f"measured peak of a training step: {measured_before / 2**20:.2f} MiB -> {measured / 2**20:.2f} MiB")
            print(str(ver).split("\n")[0], "\n")
        out[mode] = {"sites": len(rep), "converted": rep.count(mode), "unchanged": rep.count("unchanged"),
                     "verified": ver.passed, "kept_before": plan.kept_before, "kept_after": plan.kept_after,
                     "peak_before": plan.peak_before, "peak_after": plan.peak_after,
                     "measured_peak_before": measured_before, "measured_peak_after": measured}
    return out


def emit(result: Dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=1))
