"""Export: ONNX checked by onnx.checker and onnxruntime, and the annotated graph as files.

ONNX (:func:`export_onnx`). revpass nodes export as standard ONNX operators: for export each node
runs its forward in plain tensor ops (``Node.plain``: the neuron's step, unrolled over the T of
the example input; the reversible coupling Y1 = X1 + S^F(X2), Y2 = X2 + S^G(Y1) as the adds and
concatenation it is), and torch.onnx's exporter (torch.export based) writes those. No custom
domain: any ONNX runtime runs the file, and the graph shows what a node computes. The price is a
fixed T and batch shape (those of the example input). An unconverted model is exported through
its exact conversion, whose forward is the original's bit for bit (tested in tests/): the
frameworks' neurons keep Python state and call autograd.Functions, which exporters do not treat
alike. Recomputed segments export as the layers they hold.

Validation: ``onnx.checker.check_model(full_check=True)``, then onnxruntime runs the file on the
example inputs and every value that is all spikes in PyTorch (0 or 1: neuron outputs, and model
outputs made of spikes) must be equal exactly, compared at every model output and at the output
of each neuron site in the ONNX graph. Other values must agree within 1e-5 of their scale:
max |a - b| <= atol + rtol max(1, max |b|). A deep reversible network carries real-valued
activations (input plus spikes) whose float32 convolutions onnxruntime sums in another order:
on spiking_resnet18 the deepest layers differ by 3.6e-5 where the values reach 10 or more, which
an elementwise 1e-5 would call a failure although every spike agrees.

Annotations: every ONNX node that belongs to a module of the converted graph (torch.onnx records
the module path in ``pkg.torch.onnx.name_scopes``) gets that module's revpass annotations under
``metadata_props`` as ``revpass.<key>``; every other one (a residual add, a reshape: functions of
the graph itself) those of the fx node it came from, which torch.export carries in
``node.meta["custom"]`` (torch.onnx names that node in ``pkg.torch.onnx.fx_node``); the model
gets the memory plan's totals.

Graph files (:func:`graph_to_networkx`, :func:`write_graph`): the annotated torch.fx graph as a
networkx DiGraph (node attributes: op, target, and the annotations as ``revpass_<key>``), written
as node-link JSON, GraphML or DOT by the file's suffix.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import fx, nn

from revpass import meta
from revpass.api import convert
from revpass.errors import RevpassError
from revpass.neurons import is_neuron
from revpass.nodes import Node
from revpass.nodes.bits import is_binary
from revpass.nodes.segment import RecomputeSegment
from revpass.passes.graph import to_networkx
from revpass.planning.memory_plan import plan_of
from revpass.state import reset_states
from revpass.utils import as_tuple, flatten, safe_deepcopy


class ExportError(RevpassError, RuntimeError):
    """The model could not be exported, or the exported file does not reproduce it."""


@dataclass
class ValueCheck:
    name: str
    max_abs: float
    spikes: bool
    passed: bool


@dataclass
class OnnxReport:
    """What :func:`export_onnx` wrote and how the file compares with PyTorch under onnxruntime."""

    path: str
    nodes: int
    annotated_nodes: int
    checks: List[ValueCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def __str__(self) -> str:
        lines = [f"revpass export_onnx: {self.path}: {self.nodes} ONNX nodes, {self.annotated_nodes} with revpass "
                 f"annotations; onnx.checker (full_check) passed; onnxruntime "
                 f"{'matches' if self.passed else 'DOES NOT match'} PyTorch"]
        w = max([5] + [len(c.name) for c in self.checks])
        for c in self.checks:
            lines.append(f"  {c.name.ljust(w)}  max abs err {c.max_abs:.3e}  "
                         f"{'spikes, exact' if c.spikes else 'within 1e-5 of scale'}  {'pass' if c.passed else 'FAIL'}")
        return "\n".join(lines)

    __repr__ = __str__


def _plain(gm: nn.Module, on: bool) -> None:
    """Nodes and segments in plain tensor ops (for the exporter), or back."""
    for m in gm.modules():
        if isinstance(m, (Node, RecomputeSegment)):
            m.plain = on


def export_onnx(
    model: nn.Module,
    example_inputs,
    path: str,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    validate: bool = True,
) -> OnnxReport:
    """Export ``model`` (converted by revpass, or not: then through its exact conversion) to ONNX
    at ``path``, check it with onnx.checker (full_check) and onnxruntime, and write revpass's
    annotations into the nodes' metadata_props. Raises :class:`ExportError` when the export or
    the check fails. ``model`` is not changed."""
    import onnx

    inputs = as_tuple(example_inputs)
    if getattr(model, "revpass_report", None) is None:
        gm = convert(model, inputs, mode="exact")
    else:
        gm = safe_deepcopy(model)
        gm.revpass_report = model.revpass_report
    gm.eval()
    _plain(gm, True)
    reset_states(gm)
    sites = _site_outputs(gm, inputs)
    reset_states(gm)
    with torch.no_grad():
        ref = [t.detach().clone() for t in flatten(gm(*inputs))]
    reset_states(gm)
    try:
        program = torch.onnx.export(gm, inputs, dynamo=True, verbose=False)
    except Exception as exc:  # the exporter's errors are long; name the model and the way out
        raise ExportError(f"torch.onnx could not export {type(model).__name__}: {str(exc).splitlines()[0][:300]}. "
                          "If a module is not a supported neuron, exclude it from conversion or register "
                          "it (revpass.register_neuron)") from exc
    reset_states(gm)
    proto = program.model_proto
    annotated = _annotate_onnx(proto, gm, getattr(program, "exported_program", None))
    onnx.checker.check_model(proto, full_check=True)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    onnx.save(proto, path)
    report = OnnxReport(path, len(proto.graph.node), annotated)
    if validate:
        report.checks = _compare(proto, inputs, ref, sites, rtol, atol)
        if not report.passed:
            raise ExportError(f"{path}: onnxruntime does not reproduce PyTorch:\n{report}")
    return report


def _site_outputs(gm: fx.GraphModule, inputs) -> Dict[str, torch.Tensor]:
    """The output of every neuron site (revpass node or left unchanged) on the example inputs,
    by module path (the first call's)."""
    paths = {r.path for r in gm.revpass_report}
    out: Dict[str, torch.Tensor] = {}
    hooks = []
    for path in paths:
        try:
            m = gm.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(m, Node) or is_neuron(m):
            def hook(mod, args, res, path=path):
                if path not in out and isinstance(res, torch.Tensor):
                    out[path] = res.detach().clone()
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            gm(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return out


def _prop(node, key: str) -> Optional[str]:
    """An ONNX node's metadata_props entry, or None."""
    return next((p.value for p in node.metadata_props if p.key == key), None)


def _scopes(node) -> List[str]:
    try:
        return list(ast.literal_eval(_prop(node, "pkg.torch.onnx.name_scopes") or "[]"))
    except (ValueError, SyntaxError):
        return []


def _module_of(scopes: List[str], known) -> Optional[str]:
    """The innermost module path among an ONNX node's name scopes that ``known`` holds (scopes
    are cumulative qualified names, the last one the operator; inside a recomputed segment they
    are relative to it)."""
    for s in reversed(scopes[:-1]):
        if s in known:
            return s
    return None


def _fx_node(node) -> Optional[str]:
    """The name of the torch.export node an ONNX node came from (``pkg.torch.onnx.fx_node``)."""
    value = _prop(node, "pkg.torch.onnx.fx_node") or ""
    return value[1:].split(" ", 1)[0] if value.startswith("%") else None


def _annotate_onnx(proto, gm: fx.GraphModule, exported=None) -> int:
    """Write revpass's annotations into the ONNX nodes' metadata_props: a node inside a module
    of the converted graph gets that module's; any other (an add or a reshape of the graph itself)
    the annotations torch.export carried over from its fx node (``node.meta["custom"]``, kept
    through export for this); the model gets the plan's totals. Returns the nodes annotated."""
    annotations: Dict[str, Dict[str, Any]] = {}
    for n in gm.graph.nodes:
        info = meta.info(n)
        if info is not None and n.op == "call_module" and str(n.target) not in annotations:
            annotations[str(n.target)] = dict(info, fx_node=n.name)
    for name, seg in gm.named_children():  # modules inside a segment: their own annotations are gone
        if isinstance(seg, RecomputeSegment):
            for n in seg.body.graph.nodes:
                if n.op == "call_module" and str(n.target) not in annotations:
                    annotations[str(n.target)] = dict(annotations.get(name, {}), fx_node=n.name, segment=name)
    carried = {}
    if exported is not None:
        carried = {n.name: n.meta[meta.CUSTOM][meta.KEY] for n in exported.graph.nodes
                   if meta.KEY in n.meta.get(meta.CUSTOM, {})}
    count = 0
    for node in proto.graph.node:
        mod = _module_of(_scopes(node), annotations)
        if mod is not None:
            info, extra = annotations[mod], {"module": mod}
        elif _fx_node(node) in carried:
            info, extra = carried[_fx_node(node)], {}
        else:
            continue
        count += 1
        for k, v in {**info, **extra}.items():
            p = node.metadata_props.add()
            p.key, p.value = f"revpass.{k}", json.dumps(v) if not isinstance(v, str) else v
    if any(meta.info(n) is not None for n in gm.graph.nodes):
        plan = plan_of(gm, gm.revpass_report.mode)
        for k, v in (("revpass.kept_bytes_before", plan.kept_before), ("revpass.kept_bytes_after", plan.kept_after),
                     ("revpass.estimated_peak_after", plan.peak_after), ("revpass.mode", gm.revpass_report.mode)):
            p = proto.metadata_props.add()
            p.key, p.value = k, str(v)
    return count


def _compare(proto, inputs, ref, sites, rtol, atol) -> List[ValueCheck]:
    """Run the file under onnxruntime with each neuron site's output added as a graph output."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    exits = _site_exits(probe, set(sites))
    declared = {o.name for o in probe.graph.output}
    for value in exits.values():
        if value not in declared:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(value))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), [x for x in inputs
                                                                                     if isinstance(x, torch.Tensor)])}
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    checks = []
    for i, (o, r) in enumerate(zip(proto.graph.output, ref)):
        checks.append(_check(f"output[{i}]", torch.from_numpy(got[o.name]), r, rtol, atol))
    for path, value in sorted(exits.items()):
        r = sites[path]
        a = torch.from_numpy(got[value])
        if a.shape == r.shape:
            checks.append(_check(f"site {path}", a, r, rtol, atol))
    return checks


def _check(name, a: torch.Tensor, r: torch.Tensor, rtol, atol) -> ValueCheck:
    a = a.to(r.dtype)
    err = float((a - r).abs().max()) if r.numel() else 0.0
    if is_binary(r):
        return ValueCheck(name, err, True, torch.equal(a, r))
    scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
    return ValueCheck(name, err, False, err <= atol + rtol * scale)


def _site_exits(proto, paths) -> Dict[str, str]:
    """For each neuron site, the one value its ONNX nodes produce for nodes outside it (or for
    the graph's outputs), where there is exactly one."""
    owner: Dict[str, str] = {}
    for node in proto.graph.node:
        mod = _module_of(_scopes(node), paths)
        if mod is not None:
            for o in node.output:
                owner[o] = mod
    used_outside: Dict[str, set] = {}
    for node in proto.graph.node:
        mod = _module_of(_scopes(node), paths)
        for i in node.input:
            if i in owner and owner[i] != mod:
                used_outside.setdefault(owner[i], set()).add(i)
    for o in proto.graph.output:
        if o.name in owner:
            used_outside.setdefault(owner[o.name], set()).add(o.name)
    return {p: next(iter(v)) for p, v in used_outside.items() if len(v) == 1}


# ----------------------------------------------------------------------------------------------
# graph files
# ----------------------------------------------------------------------------------------------


def graph_to_networkx(gm: fx.GraphModule):
    """The torch.fx graph as a networkx DiGraph of node names, with op, target and revpass
    annotations (``revpass_<key>``) as node attributes; edges from producer to consumer."""
    def attrs(n: fx.Node) -> Dict[str, Any]:
        out: Dict[str, Any] = {"op": n.op, "target": _target(n)}
        out.update({f"revpass_{k}": v for k, v in (meta.info(n) or {}).items()})
        return out

    return to_networkx(gm.graph, by_name=True, attrs=attrs, name=type(gm).__name__)


def _target(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def _scalar(v):
    """GraphML and DOT take scalars: lists and None become their JSON text."""
    return v if isinstance(v, (str, int, float, bool)) else json.dumps(v)


def write_graph(gm: fx.GraphModule, path: str) -> str:
    """Write the annotated graph as node-link JSON (.json), GraphML (.graphml) or DOT (.dot /
    .gv), chosen by the suffix. Returns the path."""
    import networkx as nx

    g = graph_to_networkx(gm)
    ext = os.path.splitext(path)[1].lower()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    if ext == ".json":
        with open(path, "w") as f:
            json.dump(nx.node_link_data(g, edges="edges"), f, indent=1)
    elif ext == ".graphml":
        h = nx.DiGraph(**g.graph)
        h.add_nodes_from((n, {k: _scalar(v) for k, v in a.items()}) for n, a in g.nodes(data=True))
        h.add_edges_from(g.edges)
        nx.write_graphml(h, path)
    elif ext in (".dot", ".gv"):
        with open(path, "w") as f:
            f.write(_dot(g))
    else:
        raise ValueError(f"write_graph: unknown graph file type {ext!r} for {path}; use .json, .graphml or .dot")
    return path


def read_graph_json(path: str):
    """The DiGraph written by :func:`write_graph` as JSON."""
    import networkx as nx

    with open(path) as f:
        return nx.node_link_graph(json.load(f), edges="edges")


_COLORS = {"reversible": "palegreen", "exact": "lightblue", "recompute": "khaki", "unchanged": "lightpink"}


def _dot(g) -> str:
    def q(s) -> str:
        return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = ["digraph revpass {", "  node [shape=box, style=filled, fillcolor=white, fontsize=10];"]
    for n, a in g.nodes(data=True):
        kept = a.get("revpass_kept_bytes")
        attrs = {"label": f"{n}\n{a['target']}" + (f"\nkept {kept} B" if kept else ""),
                 "fillcolor": _COLORS.get(a.get("revpass_strategy", "-"), "white")}
        attrs.update({k: _scalar(v) for k, v in a.items()})
        lines.append(f"  {q(n)} [" + ", ".join(f"{k}={q(v)}" for k, v in attrs.items()) + "];")
    for u, v in g.edges:
        lines.append(f"  {q(u)} -> {q(v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
