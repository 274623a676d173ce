"""ONNX export checked by onnx.checker and onnxruntime, annotations in metadata_props, and the
annotated graph as JSON, GraphML and DOT."""

import json

import networkx as nx
import onnx
import pytest
import torch

import models
import revpass
from revpass.export import export_onnx, graph_to_networkx, read_graph_json, write_graph
from revpass.nodes.modules import Node
from test_convert import CASES


@pytest.mark.parametrize("name,make,inp,n_sites,n_conv,unchanged", CASES, ids=[c[0] for c in CASES])
def test_every_model_exports_original_and_converted(name, make, inp, n_sites, n_conv, unchanged, tmp_path):
    torch.manual_seed(0)
    net = make()
    x = inp()
    # the original (through its exact conversion), then the reversible conversion
    for label, model in (("original", net), ("reversible", revpass.convert(net, x))):
        path = tmp_path / f"{label}.onnx"
        rep = export_onnx(model, x, str(path))
        assert rep.passed, str(rep)
        assert rep.checks[0].name == "output[0]" and rep.checks[0].passed
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        # every ONNX node carries revpass's annotations: its module's, or its own fx node's
        assert len(proto.graph.node) == rep.nodes and rep.annotated_nodes == rep.nodes
        assert all(any(p.key == "revpass.shape" for p in n.metadata_props) for n in proto.graph.node)
        path.unlink()  # a zoo network's file is hundreds of MB: one on disk at a time
        if name == "spiking_resnet18" and label == "reversible":
            # the residual adds are functions of the graph, in no module: their own fx node's
            # annotations (one per block)
            props = [{p.key: p.value for p in n.metadata_props} for n in proto.graph.node]
            adds = [p for n, p in zip(proto.graph.node, props) if n.op_type == "Add" and "revpass.module" not in p]
            assert len(adds) == 8 and all(p["revpass.strategy"] == "-" and p["revpass.kept_bytes"] == "0"
                                          for p in adds)
        if label == "original" and n_conv:
            # spikes compared exactly: at each site whose node returns one tensor, or at the
            # model's outputs where they are spikes (norse returns (spikes, state))
            assert any(c.spikes for c in rep.checks), str(rep)
            if name.startswith("spiking_"):
                assert sum(c.spikes and c.name.startswith("site ") for c in rep.checks) == n_sites
    # export worked on a copy: the converted model still runs its custom ops and keeps its state
    assert not any(m.plain for m in model.modules() if isinstance(m, Node))


def test_annotations_in_metadata_props(tmp_path):
    net = models.sj_zoo("spiking_resnet18")
    x = torch.randn(2, 1, 3, 32, 32)
    gm = revpass.convert(net, x, mode="recompute")
    rep = export_onnx(gm, x, str(tmp_path / "r.onnx"))
    assert rep.passed and sum(c.spikes for c in rep.checks) == 17  # every neuron site, spikes exact
    proto = onnx.load(str(tmp_path / "r.onnx"))
    props = [{p.key: p.value for p in n.metadata_props} for n in proto.graph.node]
    seg = {n.target: n.meta["revpass"] for n in gm.graph.nodes if str(n.target).startswith("revpass_segment_")}
    inside = [p for p in props if p.get("revpass.segment") == "revpass_segment_1"]
    assert inside, "the layers of a recomputed segment carry its annotations"
    assert all(json.loads(p["revpass.kept_bytes"]) == seg["revpass_segment_1"]["kept_bytes"] for p in inside)
    assert {p["revpass.strategy"] for p in inside} == {"recompute"}
    assert all("revpass.kept_bytes" in p for p in props)  # every node, inside a segment or not
    model_props = {p.key: p.value for p in proto.metadata_props}
    assert int(model_props["revpass.kept_bytes_before"]) > 50 * int(model_props["revpass.kept_bytes_after"])


def test_graph_files_round_trip(tmp_path):
    net = models.SnnTorchConv()
    x = torch.randn(2, 1, 28, 28) * 2
    gm = revpass.convert(net, x)
    g = graph_to_networkx(gm)
    assert set(g.nodes) == {n.name for n in gm.graph.nodes}
    assert g.number_of_edges() == sum(len(n.all_input_nodes) for n in gm.graph.nodes)
    site = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "lif1")
    assert g.nodes[site.name]["revpass_strategy"] == "reversible"
    assert g.nodes[site.name]["revpass_kept_bytes"] == site.meta["revpass"]["kept_bytes"]

    back = read_graph_json(write_graph(gm, str(tmp_path / "g.json")))
    assert set(back.nodes) == set(g.nodes) and set(back.edges) == set(g.edges)
    assert dict(back.nodes[site.name]) == dict(g.nodes[site.name])

    gml = nx.read_graphml(write_graph(gm, str(tmp_path / "g.graphml")))
    assert set(gml.nodes) == set(g.nodes) and set(gml.edges) == set(g.edges)
    assert gml.nodes[site.name]["revpass_kept_bytes"] == site.meta["revpass"]["kept_bytes"]

    dot = open(write_graph(gm, str(tmp_path / "g.dot"))).read()
    assert dot.startswith("digraph revpass {") and dot.count(" -> ") == g.number_of_edges()
    assert f'"{site.name}" [' in dot and 'fillcolor="palegreen"' in dot

    with pytest.raises(ValueError, match="unknown graph file type '.png'"):
        write_graph(gm, str(tmp_path / "g.png"))
