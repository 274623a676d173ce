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


# -- the house: imports run one way, frameworks stay behind the adapters ---------------------------

import ast  # noqa: E402
import pathlib  # noqa: E402

import networkx as nx  # noqa: E402

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "revpass"
FRAMEWORKS = ("spikingjelly", "snntorch", "norse")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path, known):
    """Every revpass module ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("revpass"):
                out.add(name)
    return out


def _import_graph():
    mods = _modules()
    g = nx.DiGraph()
    for name, path in mods.items():
        g.add_node(name)
        for dep in _imports(path, mods):
            parent = name if path.name == "__init__.py" else name.rpartition(".")[0]
            # a package's __init__ and its own submodules, and a submodule importing its package's
            # __init__ for a sibling, are one unit: count edges between different packages' files
            if dep != name and not (dep == parent or dep.startswith(name + ".")):
                g.add_edge(name, dep)
    return g


def test_no_import_cycle_in_the_package():
    g = _import_graph()
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:5])
    # the driver is on top: nothing below it imports it (verify and export may use convert)
    assert set(nx.ancestors(g, "revpass.api")) <= {"revpass", "revpass.verify", "revpass.export", "revpass.cli",
                                                   "revpass.__main__"}


def test_only_the_adapters_know_a_framework():
    """Nothing outside revpass/neurons/ imports a framework or compares a value with a framework's
    name (docs/frameworks/)."""
    offenders = []
    for name, path in _modules().items():
        if name.startswith("revpass.neurons"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] in FRAMEWORKS for m in mods):
                    offenders.append(f"{name}:{node.lineno} imports {mods}")
            if isinstance(node, ast.Compare):
                for c in [node.left, *node.comparators]:
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and \
                            c.value.split(".")[0] in FRAMEWORKS:
                        offenders.append(f"{name}:{node.lineno} compares with {c.value!r}")
                    if isinstance(c, (ast.Tuple, ast.List, ast.Set)) and any(
                            isinstance(e, ast.Constant) and isinstance(e.value, str)
                            and e.value.split(".")[0] in FRAMEWORKS for e in c.elts):
                        offenders.append(f"{name}:{node.lineno} compares with a framework's name")
    assert not offenders, "\n".join(offenders)


def test_no_private_name_imported_across_modules():
    offenders = []
    mods = _modules()
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("revpass"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        offenders.append(f"{name}:{node.lineno} imports {node.module}.{a.name}")
    assert not offenders, "\n".join(offenders)
