"""tools/accuracy_digits.py: trains the digits example under each conversion and writes the
README's accuracy table."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_accuracy_tool_writes_the_readme_table(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "accuracy_digits.py"), "--epochs", "1", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "train_digits.json").read_text())
    assert set(data) == {"direct", "rate"}
    md = (tmp_path / "train_digits.md").read_text()
    for enc, res in data.items():
        assert f"| {enc} | {100 * res['original']['accuracy']:.2f}% |" in md
    # the exact conversion trains identically, with either backward
    assert all(r[k]["accuracy"] == r["original"]["accuracy"] and r[k]["weights_identical"]
               for r in data.values() for k in ("exact", "exact-autograd"))
    assert "exact identical (weights bit for bit)" in md
