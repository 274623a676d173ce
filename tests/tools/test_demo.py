import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_prints_sane_figures():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "17 neuron sites, 17 reversible" in out
    assert out.count(": PASS (") == 2
    assert "output identical to the original: True" in out
    m = re.search(r"reversible mode: keeps ([\d.]+) MiB instead of ([\d.]+) MiB \(([\d.]+)x less\)", out)
    keeps, was, ratio = map(float, m.groups())
    assert was > keeps * 1.5 and abs(was / keeps - ratio) < 0.02
    peaks = dict(re.findall(r"^  (original|exact|reversible|recompute|planner min|exact, min) +([\d.]+) MiB", out,
                            re.M))
    assert set(peaks) == {"original", "exact", "reversible", "recompute", "planner min", "exact, min"}
    peaks = {k: float(v) for k, v in peaks.items()}
    assert all(peaks[k] < peaks["original"] for k in peaks if k != "original")
    assert peaks["planner min"] <= min(peaks["reversible"], peaks["recompute"]) * 1.05
    assert peaks["exact, min"] < peaks["exact"]  # the function kept: recomputed, chunked segments and bits
