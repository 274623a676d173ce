import subprocess
import sys


def test_import_revpass_imports_no_snn_framework():
    code = (
        "import sys, revpass\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'spikingjelly', 'snntorch', 'norse'})\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'matplotlib', 'onnxruntime', 'onnxscript', 'sklearn'})\n"
        "print(bad, heavy)\n"
        "assert not bad and not heavy, (bad, heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "[] []"


def test_the_public_face():
    import revpass
    from revpass import export

    assert revpass.export_onnx is export.export_onnx and revpass.write_graph is export.write_graph
    assert {"convert", "verify", "plan", "export_onnx", "register_neuron"} <= set(revpass.__all__)
