"""The revpass command: run in this process through revpass.cli.main (the same code the
installed script calls), and as a subprocess where the process itself is what is tested (the
installed script, ``python -m revpass``, a traceback with --debug)."""

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ZOO = "spikingjelly.activation_based.model.spiking_resnet:spiking_resnet18"
ZOO_ARGS = ["--kwargs", '{"spiking_neuron": "spikingjelly.activation_based.neuron:LIFNode", "num_classes": 10}',
            "--input-shape", "2,1,3,32,32", "--step-mode", "m"]
SNN = f"{ROOT / 'tests' / 'models.py'}:SnnTorchConv"
SNN_ARGS = ["--kwargs", '{"num_steps": 2, "batch_size": 2}', "--input-shape", "2,1,28,28", "--input-scale", "2"]


def revpass(*args, module=False, process=False):
    """The command's exit status, stdout and stderr: ``python -m revpass`` with ``module``, the
    installed script with ``process``, else revpass.cli.main in this process (a process start
    and the imports cost seconds a call), from the project root, warnings silenced as there."""
    if module or process:
        exe = [sys.executable, "-m", "revpass"] if module else [str(Path(sys.executable).parent / "revpass")]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        return subprocess.run(exe + list(args), capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    from revpass.cli import main

    out, err, path, cwd = io.StringIO(), io.StringIO(), list(sys.path), os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's usage errors and --help
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.chdir(cwd)
        sys.path[:] = path  # a model file's folder, put there to import it
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


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
    assert f"revpass load {out} --trust-file" in r.stdout and "trust=True" in r.stdout
    from revpass.cli import UntrustedFileError, load

    # the file names a factory (here a path/to/file.py, which would be executed): not run unless told to
    with pytest.raises(UntrustedFileError, match="SnnTorchConv") as e:
        load(str(out))
    assert "trust=True" in str(e.value) and "factory=" in str(e.value)
    gm = load(str(out), trust=True)  # our own file: trusted
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
    expected = net(x)
    assert all(torch.equal(a, b) for a, b in zip(expected, gm(x)))
    # the factory from the caller: the file's arguments are plain JSON, used as they are
    by_factory = load(str(out), factory=models.SnnTorchConv)
    reset_states(by_factory)
    assert all(torch.equal(a, b) for a, b in zip(expected, by_factory(x)))
    # the command: refuses without --trust-file, naming the factory; loads with it, or with --factory
    r = revpass("load", str(out))
    _one_line_error(r, 2, "asks to import and call")
    assert "SnnTorchConv" in r.stderr and "--trust-file" in r.stderr
    r = revpass("load", str(out), "--trust-file")
    assert r.returncode == 0, r.stderr
    assert f"{out} loads back: {len(blob['state_dict'])} saved tensors" in r.stdout
    assert "2 exact" in r.stdout
    r = revpass("load", str(out), "--factory", SNN, "--kwargs", '{"num_steps": 2, "batch_size": 2}', module=True)
    assert r.returncode == 0, r.stderr
    assert f"{out} loads back: {len(blob['state_dict'])} saved tensors" in r.stdout


PROBE = """
import os
from torch import nn
from spikingjelly.activation_based import layer, neuron

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log")


def _record(what):
    with open(LOG, "a") as f:
        f.write(what + "\\n")


_record("imported")


def Neuron(**kw):
    _record("Neuron")
    return neuron.LIFNode(**kw)


def make(spiking_neuron, width=4):
    _record("make")
    return nn.Sequential(layer.Conv2d(2, width, 3, padding=1), layer.BatchNorm2d(width), spiking_neuron(),
                         layer.Flatten(), layer.Linear(width * 16, 3), spiking_neuron())
"""


def _small_net(spiking_neuron, width=4):
    """The probe module's make, written here: the caller's own factory."""
    from spikingjelly.activation_based import layer

    return torch.nn.Sequential(layer.Conv2d(2, width, 3, padding=1), layer.BatchNorm2d(width), spiking_neuron(),
                               layer.Flatten(), layer.Linear(width * 16, 3), spiking_neuron())


def _crafted(path, recipe, state_dict=None):
    full = {"model": None, "kwargs": None, "step_mode": None, "seed": 0, "input_shape": [1], "input_scale": 1.0,
            "input_offset": 0.0, "mode": "reversible", "budget": None, "exclude": None}
    full.update(recipe)
    torch.save({"format": "revpass-converted-1", "recipe": full, "state_dict": state_dict or {}, "report": ""}, path)
    return str(path)


def test_load_calls_nothing_the_file_names_unless_trusted(tmp_path):
    from revpass.cli import CliError, UntrustedFileError, load
    from revpass.errors import RevpassError

    # the issue's file: loading it made the directory
    made = tmp_path / "made_by_the_file"
    bad = _crafted(tmp_path / "makedirs.pt", {"model": "os:makedirs", "kwargs": json.dumps({"name": str(made)})})
    with pytest.raises(UntrustedFileError) as e:
        load(bad)
    assert isinstance(e.value, RevpassError) and isinstance(e.value, CliError)
    msg = str(e.value)
    assert msg.startswith(f"{bad} asks to import and call 'os:makedirs'")
    assert f"load({bad!r}, trust=True)" in msg and "factory=" in msg and "--trust-file" in msg
    assert not made.exists()
    _one_line_error(revpass("load", bad), 2, "asks to import and call 'os:makedirs'")
    assert not made.exists()
    # trusted, it runs what it names, as torch.load(weights_only=False) would
    with pytest.raises(CliError, match="os:makedirs returned NoneType, not a torch.nn.Module"):
        load(bad, trust=True)
    assert made.is_dir()


def test_load_with_the_callers_factory_or_model_imports_nothing(tmp_path, monkeypatch):
    import revpass
    from revpass.cli import UntrustedFileError, load, save
    from revpass.state import reset_states
    from spikingjelly.activation_based import functional, neuron

    (tmp_path / "revpass_probe_mod.py").write_text(PROBE)
    log = tmp_path / "calls.log"
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "revpass_probe_mod", raising=False)
    # a converted model saved with a recipe that names the probe module's factory and neuron
    torch.manual_seed(0)
    net = _small_net(neuron.LIFNode)
    functional.set_step_mode(net, "m")
    for p in net.parameters():  # weights that are not the seeded initialisation
        p.data.normal_(0.0, 0.5)
    x = torch.randn(3, 2, 2, 4, 4) * 2
    gm = revpass.convert(net, x)
    reset_states(gm)
    before = gm(x).detach()
    assert before.unique().numel() > 2  # varied outputs (the coupling's): a comparison that can fail
    recipe = {"model": "revpass_probe_mod:make", "kwargs": json.dumps({"spiking_neuron": "revpass_probe_mod:Neuron"}),
              "step_mode": "m", "seed": 0, "input_shape": [3, 2, 2, 4, 4], "input_scale": 2.0, "input_offset": 0.0,
              "mode": "reversible", "budget": None, "exclude": None}
    path = str(tmp_path / "probe.pt")
    save(gm, recipe, path)

    def same_as_before(loaded):
        assert loaded.revpass_report.count("reversible") == 2
        reset_states(loaded)
        return torch.equal(loaded(x), before)

    with pytest.raises(UntrustedFileError) as e:
        load(path)
    assert "'revpass_probe_mod:make', with arguments naming 'revpass_probe_mod:Neuron'" in str(e.value)
    # the caller's factory, but the file's arguments name an object: still not imported
    with pytest.raises(UntrustedFileError, match="name objects to import: 'revpass_probe_mod:Neuron'"):
        load(path, factory=_small_net)
    assert not log.exists() and "revpass_probe_mod" not in sys.modules
    # the caller's factory and arguments, or the caller's model: the saved model, nothing of the file's run
    assert same_as_before(load(path, factory=_small_net, kwargs={"spiking_neuron": neuron.LIFNode}))
    mine = _small_net(neuron.LIFNode)
    assert same_as_before(load(path, mine))
    assert mine[2].step_mode == "s"  # the caller's model is not modified (the recipe's step mode set on a copy)
    assert not log.exists() and "revpass_probe_mod" not in sys.modules
    # trusted: the file's factory and neuron are imported and called, and give the same model
    assert same_as_before(load(path, trust=True))
    assert log.read_text().split() == ["imported", "make", "Neuron", "Neuron"]


def test_load_checks_the_file_and_the_arguments(tmp_path, capsys):
    from revpass.cli import CliError, load, parser

    not_saved = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, not_saved)
    with pytest.raises(CliError, match=f"{not_saved} is not a model saved by `revpass convert`"):
        load(str(not_saved), trust=True)
    odd = _crafted(tmp_path / "odd.pt", {"model": "os:makedirs", "input_shape": "1; rm"})
    with pytest.raises(CliError, match=r"recipe 'input_shape' is '1; rm', expected a list of positive integers"):
        load(odd, trust=True)
    with pytest.raises(CliError, match="no such file"):
        load(str(tmp_path / "missing.pt"), trust=True)
    with pytest.raises(CliError, match="pass model= or factory="):
        load(odd, torch.nn.Linear(1, 1), factory=torch.nn.Linear)
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["load", "--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--trust-file" in help_text and "torch.load(weights_only=False)" in help_text
    assert "only for files you trust" in help_text


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
    _one_line_error(revpass("inspect", "no.such.module:make", "--input-shape", "1", process=True), 2,
                    "cannot import 'no.such.module'")
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
    r = revpass("inspect", f"{bad}:make", "--input-shape", "2,3", "--debug", process=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_the_planner_says_its_stages_unless_told_not_to():
    r = revpass("inspect", SNN, *SNN_ARGS, "--mode", "exact", "--budget", "min")
    assert r.returncode == 0, r.stderr
    stages = [line for line in r.stderr.splitlines() if line.startswith("revpass.convert [")]
    assert "probe 1/2: exact at every site" in stages[1] and "probe 2/2: recompute at every site" in stages[2]
    assert stages[-1].endswith("sites left unchanged")
    r = revpass("inspect", SNN, *SNN_ARGS, "--mode", "exact", "--budget", "min", "--no-progress")
    assert r.returncode == 0 and r.stderr == "", r.stderr
