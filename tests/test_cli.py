"""The revpass command, driven as a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
ZOO = "spikingjelly.activation_based.model.spiking_resnet:spiking_resnet18"
ZOO_ARGS = ["--kwargs", '{"spiking_neuron": "spikingjelly.activation_based.neuron:LIFNode", "num_classes": 10}',
            "--input-shape", "2,1,3,32,32", "--step-mode", "m"]
SNN = f"{ROOT / 'tests' / 'models.py'}:SnnTorchConv"
SNN_ARGS = ["--kwargs", '{"num_steps": 2, "batch_size": 2}', "--input-shape", "2,1,28,28", "--input-scale", "2"]


def revpass(*args, module=False):
    exe = [sys.executable, "-m", "revpass"] if module else [str(Path(sys.executable).parent / "revpass")]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(exe + list(args), capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def test_inspect_the_issue_command_line_and_json():
    r = revpass("inspect", ZOO, *ZOO_ARGS)
    assert r.returncode == 0, r.stderr
    assert "17 neuron sites, 17 reversible" in r.stdout and "memory plan" in r.stdout
    r = revpass("inspect", ZOO, *ZOO_ARGS, "--json", "--mode", "exact", module=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["sites"]) == 17 and {s["decision"] for s in out["sites"]} == {"exact"}
    assert out["input_shape"] == [2, 1, 3, 32, 32]
    plan = out["plan"]
    assert 0 < plan["kept_bytes_after"] < plan["kept_bytes_before"]
    assert sum(r["kept_bytes_after"] for r in plan["rows"]) == plan["kept_bytes_after"]


def test_convert_saves_a_model_that_loads_back(tmp_path):
    out = tmp_path / "snn.pt"
    r = revpass("convert", SNN, *SNN_ARGS, "--mode", "exact", "-o", str(out))
    assert r.returncode == 0, r.stderr
    from revpass.cli import load

    gm = load(str(out))
    blob = torch.load(out, weights_only=True)
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in blob["state_dict"].items())
    assert gm.revpass_report.count("exact") == 2
    # the exact conversion is the original function: the loaded model equals the original
    sys.path.insert(0, str(ROOT / "tests"))
    import models
    from revpass.state import reset_states

    net = models.SnnTorchConv(num_steps=2, batch_size=2)
    net.load_state_dict(blob["state_dict"])
    x = torch.randn(2, 1, 28, 28) * 2
    reset_states(net), reset_states(gm)
    assert all(torch.equal(a, b) for a, b in zip(net(x), gm(x)))


def test_verify_passes_and_fails_with_exit_codes():
    r = revpass("verify", SNN, *SNN_ARGS)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "PASS" in r.stdout
    # against the original model (its reversible sites coupled), then the node's own backward
    assert "revpass verify against the original model, each reversible site replaced by the coupling" in r.stdout
    assert "second part: revpass verify against the same converted model with backward='autograd'" in r.stdout
    r = revpass("verify", SNN, *SNN_ARGS, "--rtol", "0", "--atol", "0")  # bit-identical gradients: no
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_export_onnx_and_graph_files(tmp_path):
    r = revpass("export", SNN, *SNN_ARGS, "--onnx", str(tmp_path / "m.onnx"), "--graph", str(tmp_path / "g.json"),
                "--graph", str(tmp_path / "g.dot"))
    assert r.returncode == 0, r.stderr
    assert "onnxruntime matches PyTorch" in r.stdout
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")), full_check=True)
    g = json.loads((tmp_path / "g.json").read_text())
    assert any(n.get("revpass_strategy") == "reversible" for n in g["nodes"])
    assert (tmp_path / "g.dot").read_text().startswith("digraph revpass")


def test_bench_prints_ratios_with_a_progress_bar():
    r = revpass("bench", SNN, *SNN_ARGS, "--repeat", "1", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [row["variant"] for row in rows] == ["original", "reversible"]
    assert all(row["peak_bytes"] > 0 and row["step_s"] > 0 for row in rows)
    assert rows[1]["kept_bytes"] < rows[0]["kept_bytes"]
    assert "8/8 done" in r.stderr


def _one_line_error(r, code, fragment):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("revpass ") and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_input_is_one_line_without_traceback(tmp_path):
    _one_line_error(revpass("inspect", "no.such.module:make", "--input-shape", "1"), 2, "cannot import 'no.such.module'")
    _one_line_error(revpass("inspect", "tests/models.py", "--input-shape", "1"), 2, "not of the form")
    _one_line_error(revpass("inspect", ZOO, "--kwargs", '{"bogus": 1}', "--input-shape", "1"), 2,
                    "spiking_resnet18(bogus) raised TypeError")
    _one_line_error(revpass("inspect", ZOO, *ZOO_ARGS[:2], "--input-shape", "2,1,5,32,32", "--step-mode", "m"), 2,
                    "does not run on an input of shape (2, 1, 5, 32, 32)")
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\nclass Bad(torch.nn.Module):\n    def forward(self, x):\n"
                   "        if x.sum() > 0:\n            return x\n        return -x\n\n\ndef make():\n    return Bad()\n")
    r = revpass("inspect", f"{bad}:make", "--input-shape", "2,3")
    _one_line_error(r, 1, "TraceError")
    assert "bad.py" in r.stderr  # the error names the file and line
    r = revpass("inspect", f"{bad}:make", "--input-shape", "2,3", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr
