import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_memory_quick(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_memory.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "bench_memory.json").read_text())
    (row,) = data["results"]
    v = row["variants"]
    assert set(v) >= {"original", "exact", "reversible", "recompute", "planner-min"}
    # bytes kept: exact < original (one float per element instead of three), reversible < exact
    assert v["reversible"]["kept_bytes"] < v["exact"]["kept_bytes"] < v["original"]["kept_bytes"]
    # recomputed segments keep spikes as bits: more than 50x less than the original at the end of
    # the forward
    assert v["recompute"]["kept_bytes"] * 50 < v["original"]["kept_bytes"]
    # a measured peak exists for every variant and the conversions lower it
    assert all(d["peak_bytes"] > 0 for d in v.values())
    assert v["reversible"]["peak_bytes"] < v["original"]["peak_bytes"]
    assert "| spiking_resnet18 | 4 | reversible |" in (tmp_path / "bench_memory.md").read_text()
    # the summary table (the README's) holds the same ratios, and --render writes it again from
    # the JSON alone
    o = v["original"]["peak_bytes"]
    row_md = next(line for line in (tmp_path / "bench_memory.md").read_text().splitlines()
                  if line.startswith("| spiking_resnet18 | 4 | ") and line.count("x |") >= 4)
    assert f"| {o / v['reversible']['peak_bytes']:.2f}x |" in row_md
    again = tmp_path / "again"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_memory.py"), "--render",
                        str(tmp_path / "bench_memory.json"), "--out", str(again)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (again / "bench_memory.md").read_text() == (tmp_path / "bench_memory.md").read_text()
