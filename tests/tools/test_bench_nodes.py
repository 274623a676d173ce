"""tools/bench_nodes.py --quick runs and writes its reports; every figure it prints is one it
measured: each ratio is the ratio of the two measured bytes or times it is computed from (within
the print's rounding), each verdict agrees with its ratio and the target, and the byte counts are
the exact ones docs/method.md sections 1, 3 and 6 predict."""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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


def _result(data: dict, config_id: str, T: int | None = None) -> dict:
    rows = [r for r in data["results"] if r["id"] == config_id and (T is None or r["T"] == T)]
    assert rows, f"{config_id} missing from {[r['id'] for r in data['results']]}"
    return rows[0]


def _near(printed: str, value: float, rel: float = 0.005, abs_: float = 0.0) -> bool:
    """A printed figure is ``value`` up to its rounding: 3 significant digits are within 0.5% of
    it; ``abs_`` for figures printed with a fixed number of decimals."""
    p = float(printed)
    return abs(p - value) <= rel * abs(value) + abs_ + 1e-12


def _table(md: str, columns: int) -> dict:
    """{(id, T): cells} of the markdown table rows with ``columns`` cells."""
    out = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == columns and cells[1].isdigit():
            out[(cells[0], int(cells[1]))] = cells[2:]
    return out


def test_reports_written(bench: dict) -> None:
    assert bench["config"]["quick"] is True
    assert bench["torch"] and bench["device_name"] and bench["date"]
    assert "| neuron | T |" in bench["_stdout"]
    n_sj = sum(r["family"] == "spikingjelly" for r in bench["results"])
    assert n_sj == 5 * len(bench["config"]["T"])
    assert {r["family"] for r in bench["results"]} == {"spikingjelly", "snntorch", "norse"}
    assert len(bench["targets"]) == 3 * n_sj


def test_each_ratio_is_the_ratio_of_its_measured_figures(bench: dict) -> None:
    for r in bench["results"]:
        b, ra, sp = r["bytes"], r["ratios"], r["speed"]
        bw, fb, raw = r["time_s"]["backward"], r["time_s"]["fwd_bwd"], r["time_s"]["raw"]
        # times: measured (positive), each the median of its runs
        for kind, times in (("backward", bw), ("fwd_bwd", fb)):
            for name, t in times.items():
                runs = raw[kind][name]
                assert len(runs) == bench["config"]["repeat"] and all(x > 0 for x in runs), (r["id"], name)
                assert t == statistics.median(runs), (r["id"], kind, name)
        assert math.isclose(sp["recompute_over_optimized_backward"],
                            bw["reversible_recompute"] / bw["reversible_optimized"], rel_tol=1e-12)
        assert math.isclose(sp["autograd_over_optimized_backward"],
                            bw["reversible_autograd"] / bw["reversible_optimized"], rel_tol=1e-12)
        assert math.isclose(sp["reversible_over_library_fwd_bwd"], fb["reversible_optimized"] / fb["library"],
                            rel_tol=1e-12)
        assert math.isclose(sp["exact_over_library_fwd_bwd"], fb["exact"] / fb["library"], rel_tol=1e-12)
        # bytes: the summary figures are the detailed measurements', and the ratios theirs
        d = b["detail"]
        for name, m in d.items():
            assert m["total"] == m["shared_with_output"] + m["without_output"] and m["total"] > 0, (r["id"], name)
        assert b["library"] == d["library"]["total"] and b["exact"] == d["exact"]["total"]
        assert b["reversible"] == d["reversible_optimized"]["total"]
        assert b["reversible_without_output"] == d["reversible_optimized"]["without_output"]
        assert b["reversible_output_shared"] == d["reversible_optimized"]["shared_with_output"]
        assert math.isclose(ra["library_over_reversible_without_output"], b["library"] / b["reversible_without_output"],
                            rel_tol=1e-12)
        assert math.isclose(ra["library_over_reversible"], b["library"] / b["reversible"], rel_tol=1e-12)
        assert math.isclose(ra["library_over_exact"], b["library"] / b["exact"], rel_tol=1e-12)
        # the gradient checks' verdicts are their figures'
        c = r["checks"]
        worst7 = max(c["grads_optimized_vs_autograd"]["section7"], c["grads_recompute_vs_autograd"]["section7"])
        assert c["grads_within_section7"] == (worst7 <= 1)
        assert c["reversible_forward_identical"] and c["exact_spikes_equal_library"]
        # the input makes the neuron spike, not always (norse integrates dt / tau = 0.1 of it per
        # step: at --quick's T = 4 its LIFBoxCell does not reach the threshold)
        assert 0 <= c["library_spike_rate"] < 1 and (r["family"] == "norse" or c["library_spike_rate"] > 0)


def test_the_printed_tables_are_the_measured_figures(bench: dict) -> None:
    md = bench["_stdout"]
    mem, time = _table(md, 8), _table(md, 11)
    assert set(mem) == set(time) == {(r["id"], r["T"]) for r in bench["results"]}
    unit = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20}
    for r in bench["results"]:
        b, ib = r["bytes"], r["input_bytes"]
        cells = mem[(r["id"], r["T"])]
        for cell, n in zip(cells[:4], (b["library"], b["exact"], b["reversible"], b["reversible_without_output"])):
            m = re.fullmatch(r"([\d.]+) (B|KiB|MiB) \(([\d.e+-]+)x\)", cell)
            assert m, cell
            assert _near(m.group(1), n / unit[m.group(2)], rel=0, abs_=0.05 if m.group(2) != "B" else 0), (cell, n)
            assert _near(m.group(3), n / ib), (cell, n / ib)
        assert cells[4].endswith("x") and _near(cells[4][:-1], b["library"] / b["reversible_without_output"])
        assert cells[5].endswith("x") and _near(cells[5][:-1], b["library"] / b["exact"])
        bw, fb = r["time_s"]["backward"], r["time_s"]["fwd_bwd"]
        cells = time[(r["id"], r["T"])]
        ms = [bw["reversible_optimized"], bw["reversible_recompute"], bw["reversible_autograd"], None,
              fb["reversible_optimized"], fb["exact"], fb["library"]]
        for cell, t in zip(cells, ms):
            if t is not None:
                assert _near(cell, t * 1e3, rel=0, abs_=0.05), (r["id"], cell, t)
        ratios = {3: bw["reversible_recompute"] / bw["reversible_optimized"],
                  7: fb["reversible_optimized"] / fb["library"], 8: fb["exact"] / fb["library"]}
        for i, v in ratios.items():
            assert cells[i].endswith("x") and _near(cells[i][:-1], v), (r["id"], i, cells[i], v)
        # the progress line on stderr prints the same ratios
        line = next(x for x in bench["_stderr"].splitlines() if f"] {r['id']} T={r['T']}:" in x)
        got = re.findall(r"([\d.]+)x", line)
        want = [b["library"] / b["reversible_without_output"], bw["reversible_recompute"] / bw["reversible_optimized"],
                fb["reversible_optimized"] / fb["library"]]
        assert len(got) == 3 and all(_near(g, w) for g, w in zip(got, want)), (line, want)


def test_each_verdict_agrees_with_its_ratio_and_target(bench: dict) -> None:
    spec = bench["targets_spec"]
    source = {
        "memory: library / reversible (excl. Y)": (lambda r: r["ratios"]["library_over_reversible_without_output"],
                                                   ">=", spec["memory_min"]),
        "backward: recompute / optimized": (lambda r: r["speed"]["recompute_over_optimized_backward"],
                                            ">=", spec["backward_speedup_min"]),
        "fwd+bwd: reversible / library": (lambda r: r["speed"]["reversible_over_library_fwd_bwd"],
                                          "<=", spec["fwd_bwd_ratio_max"]),
    }
    lines = [x for x in bench["_stdout"].splitlines() if re.match(r"- (PASS|MISS) ", x)]
    assert len(lines) == len(bench["targets"])
    for t, line in zip(bench["targets"], lines):
        value_of, op, goal = source[t["target"]]
        r = _result(bench, t["id"], t["T"])
        assert r["family"] == "spikingjelly"
        assert t["value"] == value_of(r)  # the ratio measured for that configuration
        assert t["goal"] == f"{op} {goal:g}x"
        assert t["pass"] == (t["value"] >= goal if op == ">=" else t["value"] <= goal), t
        m = re.fullmatch(r"- (PASS|MISS) (.+) T=(\d+): (.+) = ([\d.]+)x \(target (.+)\)", line)
        assert m, line
        verdict, cid, T, target, printed, goal_text = m.groups()
        assert (verdict == "PASS") == t["pass"] and (cid, int(T), target, goal_text) == (t["id"], t["T"], t["target"],
                                                                                         t["goal"])
        assert _near(printed, t["value"], rel=0, abs_=0.05 if t["value"] >= 10 else 0.0005), (line, t["value"])
    met = sum(t["pass"] for t in bench["targets"])
    assert f"{met}/{len(bench['targets'])} targets met." in bench["_stdout"]


# docs/method.md section 1: SpikingJelly's multi-step neurons keep, per input byte, on the CPU
LIBRARY_PER_INPUT = {
    "spikingjelly/LIFNode": 3.0,
    "spikingjelly/LIFNode(detach_reset=True)": 2.0,
    "spikingjelly/LIFNode(v_reset=None)": 1.0,
    "spikingjelly/IFNode": 3.0,
    "spikingjelly/ParametricLIFNode": 4.0,  # 4.00 in the table: and its w's few bytes
}


def test_bytes_are_the_ones_docs_method_predicts(bench: dict) -> None:
    for r in bench["results"]:
        T, B, C, H, W = r["shape"]
        assert C % 2 == 0
        input_bytes = T * B * C * H * W * 4  # float32
        assert r["input_bytes"] == input_bytes
        b = r["bytes"]
        # section 6: the exact node keeps H, one float per element and step
        assert b["exact"] == input_bytes, r["id"]
        # section 3: the reversible node keeps Y (shared with its consumer) and F's decisions, one
        # bit per element of the F half per step (one plane: reset_delay is snnTorch's default)
        f_bits_bytes = T * math.ceil(B * (C // 2) * H * W / 8)
        assert b["reversible_without_output"] == f_bits_bytes == input_bytes // 64, r["id"]
        assert b["reversible_output_shared"] == input_bytes and b["reversible"] == input_bytes + f_bits_bytes
        assert b["detail"]["reversible_recompute"] == b["detail"]["reversible_optimized"], r["id"]
        if r["id"] in LIBRARY_PER_INPUT:  # section 1
            per = LIBRARY_PER_INPUT[r["id"]]
            if per == int(per) and "Parametric" not in r["id"]:
                assert b["library"] == per * input_bytes, r["id"]
            assert round(b["library"] / input_bytes, 2) == per, r["id"]
            assert r["ratios"]["library_over_exact"] == pytest.approx(per, abs=0.005)
            assert r["ratios"]["library_over_reversible_without_output"] == pytest.approx(64 * per, abs=0.5)
    assert {r["id"] for r in bench["results"]} >= set(LIBRARY_PER_INPUT)
