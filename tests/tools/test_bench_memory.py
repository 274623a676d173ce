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
    assert "| spiking_resnet18 | 4 | 4 | reversible |" in (tmp_path / "bench_memory.md").read_text()
    # the summary table (docs/results.md's) holds the same ratios, and --render writes it again from
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


def test_the_scaling_targets_read_the_ratio_along_T_and_along_the_batch():
    """The report's scaling targets: per model, the exact 'min' peak ratio against T at the run's
    batch and against the batch at the sweep's T, each step at least 95% of the one before."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_memory
    finally:
        sys.path.remove(str(ROOT / "tools"))

    def row(T, batch, original, exact_min):
        return {"model": "m", "T": T, "batch": batch, "variants": {"original": {"peak_bytes": original},
                                                                   "exact-min": {"peak_bytes": exact_min}}}

    rows = [row(4, 4, 60, 10), row(8, 4, 120, 19), row(4, 8, 120, 21), row(4, 16, 240, 40)]
    along_T, along_batch = bench_memory._scaling(rows, batch=4)
    assert "with T (batch 4): 4: 6.00x, 8: 6.32x" in along_T["target"]
    assert along_T["pass"] and abs(along_T["value"] - (120 / 19) / 6) < 1e-9
    # 6.00x, 5.71x, 6.00x: the step from batch 4 to 8 falls by 4.8%, within the 5% allowed
    assert "with the batch (T = 4): 4: 6.00x, 8: 5.71x, 16: 6.00x" in along_batch["target"]
    assert along_batch["pass"] and abs(along_batch["value"] - (120 / 21) / 6) < 1e-9
    rows[2] = row(4, 8, 120, 22)  # 5.45x: 9% below batch 4's
    assert not bench_memory._scaling(rows, batch=4)[1]["pass"]


def test_the_memopt_target_asks_for_a_revpass_variant_as_low_at_no_worse_time():
    """Per memopt level, every run (model, T, batch) that ran it needs a revpass variant whose
    measured peak is at least as low and whose step time is no worse; the lowest such is named."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_memory
    finally:
        sys.path.remove(str(ROOT / "tools"))

    def row(T, **variants):  # variant: (peak, step time)
        return {"model": "m", "T": T, "batch": 4, "variants": {
            k: {"peak_bytes": p, "step_s": t} for k, (p, t) in {"original": (100, 1.0), **variants}.items()}}

    rows = [row(4, exact=(40, 0.9), **{"exact-min": (10, 2.0), "memopt-L1": (90, 1.1)}),
            row(8, exact=(40, 1.2), **{"exact-min": (10, 2.0), "memopt-L1": (90, 1.1)})]
    (t,) = bench_memory._against_memopt(rows)
    # at T = 4 exact is lower (2.5x against 1.11x) and faster; at T = 8 no variant is both
    assert not t["pass"] and t["value"] == 0.5
    assert "in 1 of 2 runs (the lowest such: exact in 1; none at m T=8 batch 4)" in t["target"]
    rows[1]["variants"]["exact"]["step_s"] = 1.1  # as fast as memopt: no worse
    (t,) = bench_memory._against_memopt(rows)
    assert t["pass"] and "in 2 of 2 runs (the lowest such: exact in 2)" in t["target"]
