"""Every example runs at a reduced size (--quick) and prints sane figures (--json)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_example(name, *args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--quick", "--json", *args],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout[r.stdout.index("{"):])


def _sane(summary, sites, converted, unchanged=0):
    for mode, s in summary.items():
        assert s["sites"] == sites and s["unchanged"] == unchanged, (mode, s)
        assert s["converted"] == converted, (mode, s)
        assert s["verified"], mode
        assert 0 < s["kept_after"] <= s["kept_before"], (mode, s)
        assert s["peak_after"] > 0 and s["peak_before"] > 0, (mode, s)
        assert s["measured_peak_after"] > 0 and s["measured_peak_before"] > 0, (mode, s)


def test_quickstart():
    out = run_example("quickstart.py")
    _sane(out, 17, 17)
    assert out["recompute"]["kept_before"] > 50 * out["recompute"]["kept_after"]
    for mode in out:  # on a deep network the estimated peak falls too
        assert out[mode]["peak_after"] < out[mode]["peak_before"], mode
    assert out["reversible"]["kept_after"] < out["exact"]["kept_after"]


def test_snntorch_tutorial():
    out = run_example("snntorch_tutorial.py")
    _sane(out, 2, 1, unchanged=1)  # the output neuron's membrane is returned: left as it is
    assert out["reversible"]["kept_after"] < out["reversible"]["kept_before"]


def test_norse_network():
    out = run_example("norse_network.py")
    _sane(out, 2, 2)
    ex, rev = out["exact"], out["reversible"]
    # --quick: two LIF layers of H = 32 over (T, B) = (8, 4); each neuron's input is E bytes
    T, B, H = 8, 4, 32
    E = T * B * H * 4
    # exact: each node keeps H, one float per element and step (docs/method.md section 6), and
    # the linear layer after each keeps its spikes as bits (section 11): 2 E + 2 E / 32
    assert ex["kept_after"] == 2 * E + 2 * (T * B * H // 8) == 2 * E + 2 * E // 32
    # reversible: its output (shared with the linear layer after it) and F's bits, 1 bit per element
    # of half the channels per step (section 3): 2 (E + E / 64)
    assert rev["kept_after"] == 2 * (E + T * math.ceil(B * H // 2 / 8)) == 2 * E + 2 * E // 64
    assert rev["kept_before"] == ex["kept_before"] > ex["kept_after"]  # the same unconverted model
    # norse's LIF keeps more than its input (docs/method.md section 1): more than the exact node
    assert ex["kept_before"] - 2 * E > 2 * E
    assert ex["peak_before"] == rev["peak_before"] and ex["measured_peak_before"] == rev["measured_peak_before"]
    for s in (ex, rev):  # both lower the estimated and the measured peak of a training step
        assert s["peak_after"] < s["peak_before"] and s["measured_peak_after"] < s["measured_peak_before"]
    assert rev["peak_after"] < ex["peak_after"] and rev["measured_peak_after"] < ex["measured_peak_after"]


def test_custom_neuron():
    out = run_example("custom_neuron.py")
    _sane(out["registered"], 2, 2)
    _sane(out["inline"], 1, 1)  # recognised from its operations
    # the re-stacked spikes are the node's output itself (no copy): reversible keeps about half
    assert out["inline"]["reversible"]["kept_after"] * 1.9 < out["inline"]["reversible"]["kept_before"]


@pytest.mark.parametrize("encoding", ["direct", "rate"])
def test_train_digits(encoding):
    out = run_example("train_digits.py", "--encoding", encoding)
    assert set(out) == {"original", "reversible", "exact", "exact-autograd", "exact-min"}
    for r in out.values():
        assert 0.8 < r["accuracy"] <= 1.0 and r["train_s"] > 0  # 5 epochs: far above chance (0.1)
    # the exact conversion trains to the original's weights bit for bit (its optimized backward
    # repeats SpikingJelly's own CPU backward), so its accuracy is the original's
    for name in ("exact", "exact-autograd"):
        assert out[name]["weights_identical"], name
        assert out[name]["accuracy"] == out["original"]["accuracy"], name
    # exact-min keeps the forward and folds the batch norms (docs/method.md section 12): gradients
    # within rounding, so training takes its own path; 5 epochs: within 2 points (7 of 359 digits)
    assert not out["exact-min"]["weights_identical"]
    assert abs(out["exact-min"]["accuracy"] - out["original"]["accuracy"]) <= 0.02
    assert not out["reversible"]["weights_identical"]  # a different function: a real comparison
    assert out["reversible"]["accuracy"] >= out["original"]["accuracy"] - 0.03
    assert out["exact"]["kept_bytes"] < out["original"]["kept_bytes"]
    assert out["reversible"]["kept_bytes"] < out["exact"]["kept_bytes"]
    assert out["exact-min"]["peak_bytes"] <= out["exact"]["peak_bytes"] < out["original"]["peak_bytes"]
