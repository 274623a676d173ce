"""tools/accuracy_digits.py: trains the digits example under each conversion and writes the
README's accuracy table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_accuracy_tool_writes_the_readme_table(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "accuracy_digits.py"), "--epochs", "1", "--seeds", "2",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "train_digits.json").read_text())
    runs = data.pop("runs")
    assert set(data) == set(runs) == {"direct", "rate"}
    md = (tmp_path / "train_digits.md").read_text()
    for enc, res in data.items():
        # the table's figure is the mean over the seeds
        assert len(runs[enc]) == 2
        mean = sum(r["original"]["accuracy"] for r in runs[enc]) / 2
        assert res["original"]["accuracy"] == pytest.approx(mean)
        assert f"| {enc} | {100 * mean:.2f}% |" in md
    # the exact conversion trains identically, with either backward, in every seed
    assert all(s[k]["accuracy"] == s["original"]["accuracy"] and s[k]["weights_identical"]
               for r in runs.values() for s in r for k in ("exact", "exact-autograd"))
    assert "exact identical (weights bit for bit)" in md
