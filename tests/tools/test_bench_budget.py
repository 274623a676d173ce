import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import bench_budget  # noqa: E402


def test_the_budget_report_gives_each_variants_ratios_and_the_lowest_reachable_peak_of_a_budget_it_cannot_meet():
    MiB = 2**20
    rows = [{"model": "m", "T": 4, "batch": 4, "variant": "original", "budget": None, "peak_bytes": 12 * MiB,
             "step_s": 0.100},
            {"model": "m", "T": 4, "batch": 4, "variant": "exact, Peak(P/4)", "budget": "Peak(3)",
             "estimated_bytes": int(2.9 * MiB), "peak_bytes": 3 * MiB, "step_s": 0.150},
            {"model": "m", "T": 4, "batch": 4, "variant": "exact, Peak(P/9)", "budget": "Peak(1)",
             "error": "Peak(1398101) cannot be met: the smallest reachable estimated peak is 2150000 bytes "
                      "(2.05 MiB; budget='min'); before conversion the estimate is 15309000 bytes"}]
    lines = bench_budget._markdown(rows, ["--repeat", "15"]).splitlines()
    assert "`python tools/bench_budget.py --repeat 15`" in lines
    assert "| m | 4 | 4 | original |  | 12.00 MiB | 1.00x | 100 ms | 1.00x |" in lines
    assert "| m | 4 | 4 | exact, Peak(P/4) | 2.90 MiB | 3.00 MiB | 4.00x | 150 ms | 1.50x |" in lines
    assert "| m | 4 | 4 | exact, Peak(P/9) | cannot be met (the lowest reachable: 2.05 MiB) | | | | |" in lines
