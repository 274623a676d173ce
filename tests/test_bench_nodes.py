"""tools/bench_nodes.py --quick runs, writes its reports, and its memory figures are the exact ones
METHOD.md sections 1 and 3 predict."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "bench_nodes.py"

pytest.importorskip("spikingjelly")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench_out")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "bench_nodes.md").read_text() in proc.stdout
    data = json.loads((out / "bench_nodes.json").read_text())
    data["_stdout"], data["_stderr"] = proc.stdout, proc.stderr
    return data


def _result(data: dict, config_id: str) -> dict:
    rows = [r for r in data["results"] if r["id"] == config_id]
    assert rows, f"{config_id} missing from {[r['id'] for r in data['results']]}"
    return rows[0]


def test_reports_written(bench: dict) -> None:
    assert bench["config"]["quick"] is True
    assert bench["torch"] and bench["device_name"] and bench["date"]
    assert "| neuron | T |" in bench["_stdout"]
    assert "[1/" in bench["_stderr"]  # one progress line per configuration
    n_sj = sum(r["family"] == "spikingjelly" for r in bench["results"])
    assert n_sj == 5 * len(bench["config"]["T"])
    assert len(bench["targets"]) == 3 * n_sj
    for t in bench["targets"]:
        assert f"{'PASS' if t['pass'] else 'MISS'} {t['id']} T={t['T']}" in bench["_stdout"]


def test_lifnode_hard_reset_bytes(bench: dict) -> None:
    r = _result(bench, "spikingjelly/LIFNode")
    T, B, C, H, W = r["shape"]
    assert C % 2 == 0
    input_bytes = T * B * C * H * W * 4  # float32
    assert r["input_bytes"] == input_bytes
    b = r["bytes"]
    assert b["library"] == 3 * input_bytes  # METHOD.md section 1
    assert b["exact"] == input_bytes  # one float per element and step (section 6)
    # F half, 1 bit per element per step: T * B * (C/2) * H * W / 8 bytes = input bytes / 64
    f_bits_bytes = T * math.ceil(B * (C // 2) * H * W / 8)
    assert b["reversible_without_output"] == f_bits_bytes == input_bytes // 64
    assert b["reversible"] == input_bytes + f_bits_bytes  # plus its output Y
    assert b["reversible_output_shared"] == input_bytes
    assert r["ratios"]["library_over_reversible_without_output"] == 192
    assert r["ratios"]["library_over_exact"] == 3


def test_soft_reset_ratio_is_64(bench: dict) -> None:
    r = _result(bench, "spikingjelly/LIFNode(v_reset=None)")
    assert r["bytes"]["library"] == r["input_bytes"]
    assert r["ratios"]["library_over_reversible_without_output"] == 64
