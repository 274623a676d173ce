"""tools/coverage.py --quick --planner: a few small models across the frameworks, each built,
converted in both modes and with the planner's variants, checked and written as a table row; the
JSON it writes says per model what was found and decided, and the printed table is the written
one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "coverage.py"

pytest.importorskip("spikingjelly")
pytest.importorskip("snntorch")
pytest.importorskip("norse")

QUICK = {"sj.plif_net.mnist", "snntorch.tutorial_fc", "snntorch.class.Alpha", "norse.sequential_lif",
         "hand.inline_lif"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("coverage")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--planner", "--json", str(out / "coverage.json"),
         "--md", str(out / "coverage.md")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((out / "coverage.json").read_text())
    data["_stdout"], data["_stderr"], data["_md"] = proc.stdout, proc.stderr, (out / "coverage.md").read_text()
    data["by_name"] = {m["name"]: m for m in data["models"]}
    return data


def _decisions(model: dict, mode: str) -> dict:
    return {s["path"]: s["decision"][mode] for s in model["sites_detail"]}


def test_quick_runs_its_subset_and_prints_what_it_writes(quick: dict) -> None:
    assert quick["quick"] is True and quick["T"] == 2
    assert set(quick["by_name"]) == QUICK
    assert {m["framework"] for m in quick["models"]} == {"spikingjelly", "snntorch", "norse", "hand-written"}
    assert quick["_md"].strip() in quick["_stdout"]
    assert "Machine: " in quick["_md"] and "Command: `python tools/coverage.py --quick" in quick["_md"]
    # one progress line per model on stderr, in order
    lines = [ln for ln in quick["_stderr"].splitlines() if ln.startswith("[")]
    assert [ln.split("]")[1].split(":")[0].strip() for ln in lines] == [m["name"] for m in quick["models"]]
    # one row per model in each table (the modes', the planner's)
    for name in QUICK:
        assert sum(ln.startswith(f"| {name} |") for ln in quick["_md"].splitlines()) == 2


def test_every_quick_model_converts_checks_and_trains(quick: dict) -> None:
    for m in quick["models"]:
        assert m["status"] == "ok" and not m["errors"], (m["name"], m["errors"])
        assert m["exact_equal"] is True, m["name"]
        assert m["verify"] == {"reversible": True, "exact": True}, (m["name"], m["verify_detail"])
        assert m["train"] == {"original": True, "reversible": True, "exact": True}, m["name"]
        assert set(m["convert_s"]) == {"reversible", "exact"} and all(t > 0 for t in m["convert_s"].values())
        assert m["not_found"] == [], m["name"]


def test_sites_and_decisions(quick: dict) -> None:
    by = quick["by_name"]
    # SpikingJelly parametric_lif_net MNISTNet: four multi-step ParametricLIFNodes, all converted
    sj = by["sj.plif_net.mnist"]
    assert sj["sites"] == sj["supported"] == 4
    assert sj["converted"] == {"reversible": 4, "exact": 4}
    assert {s["framework"] for s in sj["sites_detail"]} == {"spikingjelly.ParametricLIFNode"}
    assert set(_decisions(sj, "reversible").values()) == {"reversible"}
    assert set(_decisions(sj, "exact").values()) == {"exact"}
    # snnTorch tutorial 5: the hidden Leaky rolled; the output Leaky, whose membrane is recorded, left
    # as it is with the reason
    fc = by["snntorch.tutorial_fc"]
    assert fc["sites"] == fc["supported"] == 2 and fc["converted"] == {"reversible": 1, "exact": 1}
    assert _decisions(fc, "reversible") == {"lif1": "reversible", "lif2": "unchanged"}
    assert _decisions(fc, "exact") == {"lif1": "exact", "lif2": "unchanged"}
    assert [u["neuron"] for u in fc["unchanged"]] == ["snntorch.Leaky"] and fc["unchanged"][0]["reason"]
    # a neuron class revpass does not convert is named with its reason, and is not counted as supported
    al = by["snntorch.class.Alpha"]
    assert al["sites"] == 2 and al["supported"] == 1 and al["converted"] == {"reversible": 1, "exact": 1}
    assert _decisions(al, "reversible") == {"lif": "unchanged", "out": "reversible"}
    assert [(u["count"], u["neuron"]) for u in al["unchanged"]] == [(1, "snntorch.Alpha")]
    assert "not supported" in al["unchanged"][0]["reason"]
    # norse SequentialState with multi-step LIF, and a hand-written LIF recognised from its operations
    ns = by["norse.sequential_lif"]
    assert ns["sites"] == 2 and ns["converted"] == {"reversible": 2, "exact": 2}
    assert {s["framework"] for s in ns["sites_detail"]} == {"norse.LIF"}
    hw = by["hand.inline_lif"]
    assert hw["sites"] == hw["supported"] == 2 and hw["converted"] == {"reversible": 2, "exact": 2}
    assert {s["kind"] for s in hw["sites_detail"]} == {"c"}


def test_the_planner_variants_convert_check_and_train(quick: dict) -> None:
    """--planner: each model converted with mode="recompute", mode="exact" with budget="min",
    budget="min", and mode="exact" with a Peak budget of 0.8x its estimated peak; those that keep
    the function give the original's outputs bit for bit; every variant verifies and trains; its
    decisions cover every site; the Peak budget is met or refused with the smallest figure; and
    the second table says so."""
    refused = 0
    for m in quick["models"]:
        assert set(m["planned"]) == {"recompute", "exact min", "min", "exact peak"}, m["name"]
        for label, p in m["planned"].items():
            assert not any(k.endswith(label) for k in m["errors"]), (m["name"], m["errors"])
            if p.get("refused"):
                assert label == "exact peak" and "the smallest reachable estimated peak is" in p["refused"]
                refused += 1
                continue
            assert sum(p["decisions"].values()) == m["sites"], (m["name"], label)
            assert p["verify"] is True and p["train"] is True and p["convert_s"] > 0, (m["name"], label)
            assert p["same_forward"] is (None if label == "min" else True), (m["name"], label)
            assert p.get("fits") is (True if label == "exact peak" else None), (m["name"], label)
        assert "reversible" not in m["planned"]["exact min"]["decisions"], m["name"]
    assert quick["by_name"]["sj.plif_net.mnist"]["planned"]["recompute"]["decisions"] == {"recompute": 4}
    assert refused == 2  # snnTorch's Alpha (not supported) and the hand-written LIF reach no lower
    assert quick["planned_summary"] == (
        "recompute: converts 5/5, output equal 5/5, verify passes 5/5, training step runs 5/5; exact min: converts "
        "5/5, output equal 5/5, verify passes 5/5, training step runs 5/5; min: converts 5/5, verify passes 5/5, "
        "training step runs 5/5; exact peak: converts 3/5 (refused with the smallest reachable figure: 2; the "
        "estimate within the budget: 3/3), output equal 3/3, verify passes 3/3, training step runs 3/3")
    assert f"Summary: {quick['planned_summary']}." in quick["_md"]
    rows = quick["_md"].split("## Recomputed segments and the planner")[1].split("## Errors")[0]
    assert sum(ln.startswith("| ") for ln in rows.splitlines()) == 1 + len(QUICK)  # a header and a row each


def test_summary_counts_the_rows(quick: dict) -> None:
    # every supported neuron converted in the models but the tutorial (its recorded output layer)
    assert "every neuron of a supported family converted in both modes in 4/5 converted models" in quick["summary"]
    assert "exact output equal 5/5" in quick["summary"]
    assert f"Summary: {quick['summary']}." in quick["_md"]


def test_only_filters_and_a_failing_model_is_a_row(tmp_path: Path) -> None:
    """--only selects by name; a model that raises is a row with the error's first line (norse
    1.1.0's MobileNetV2 with a residual block: the original itself raises), and the tool still
    exits 0."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "hand.inline_if,norse.mobilenet_residual",
         "--json", str(tmp_path / "c.json"), "--md", str(tmp_path / "c.md")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = {m["name"]: m for m in json.loads((tmp_path / "c.json").read_text())["models"]}
    assert set(data) == {"hand.inline_if", "norse.mobilenet_residual"}
    assert data["hand.inline_if"]["status"] == "ok"
    bad = data["norse.mobilenet_residual"]
    assert bad["status"] == "errors" and list(bad["errors"]) == ["original"]
    assert bad["errors"]["original"].startswith("TypeError: ") and "\n" not in bad["errors"]["original"]
    assert bad["sites"] is None and bad["verify"] == {} and bad["train"] == {}
    md = (tmp_path / "c.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| norse.mobilenet_residual |"))
    assert bad["errors"]["original"][:60] in row
    assert "norse.mobilenet_residual" in md.split("## Errors and failed checks, grouped")[1]
