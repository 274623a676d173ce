"""tools/peak_estimate.py: the estimated peak of a training step against a measured one, per
variant, written as a table."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_peak_estimate_tool(tmp_path):
    """tools/peak_estimate.py on the CPU: one row per variant, the estimate within 10% (at the
    size tests/test_plan.py's test_peak_estimate_against_memtracker checks; tiny models deviate more)."""
    tool = ROOT / "tools" / "peak_estimate.py"
    r = subprocess.run([sys.executable, str(tool), "--device", "cpu", "--models", "snntorch_conv", "--T", "4",
                        "--batch", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split("|") for line in (tmp_path / "peak_estimate_cpu.md").read_text().splitlines()
            if line.startswith("| snntorch_conv |")]
    assert [row[3].strip() for row in rows] == ["original", "exact", "reversible", "recompute", "planner-min",
                                                "exact-min"]
    assert all(abs(float(row[6]) - 1) <= 0.10 for row in rows), rows
