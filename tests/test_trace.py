"""Tracing what users write (revpass/trace.py): shapes read in forward, tensor constructors
with traced arguments, tensor constants, the location of an error, and parts that cannot be
traced kept whole (revpass/passes/untraced.py converts the multi-step neurons inside them)."""

import copy
import importlib.util
import os
import sys

import pytest
import torch
from torch import nn

import revpass
from revpass.errors import RevpassError
from revpass.passes.decide import decide
from revpass.passes.detect import find_sites
from revpass.passes.rewrite import rewrite
from revpass.passes.untraced import settle, untraced_parts, untraced_sites
from revpass.state import reset_states
from revpass.trace import TraceError, register_leaf, trace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from custom_neuron import Spike  # noqa: E402

HERE = os.path.basename(__file__)


def _same(net, conv, x):
    """The converted model's output is the original's, bit for bit, from the reset state."""
    reset_states(net)
    reset_states(conv)
    a, b = net(x), conv(x)
    assert torch.equal(a, b)


def _sj():
    from spikingjelly.activation_based import layer, neuron

    return layer, neuron


# ---------------------------------------------------------------------------------------------
# where an error is: torch's own package and revpass's are skipped, by file location
# ---------------------------------------------------------------------------------------------


def test_an_error_in_a_package_under_a_torch_folder_is_located(tmp_path):
    """norse's models live in norse/torch/: a path containing /torch/ is user code unless it is
    torch's own package."""
    pkg = tmp_path / "somelib" / "torch"
    pkg.mkdir(parents=True)
    src = pkg / "models.py"
    src.write_text("import torch\n\nclass Net(torch.nn.Module):\n    def forward(self, x):\n"
                   "        if x.sum() > 0:\n            return x\n        return -x\n")
    spec = importlib.util.spec_from_file_location("somelib_torch_models", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(TraceError, match=r"somelib/torch/models\.py:5 in forward: if x\.sum\(\) > 0"):
        revpass.convert(mod.Net(), torch.randn(3, 2))


def test_an_untraceable_model_is_a_revpass_error_at_the_users_line_also_with_example_inputs():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            if h.ndim == 3 and h.mean() > 0:  # the shape is known from the example; the value is not
                return h
            return -h

    with pytest.raises(RevpassError, match=HERE + r":\d+ in forward: if h\.ndim == 3 and h\.mean\(\) > 0") as err:
        revpass.convert(Bad(), torch.randn(3, 2, 4))
    assert isinstance(err.value, TraceError) and "register_leaf" in str(err.value)


def test_without_keeping_parts_whole_the_error_names_the_part():
    class Inner(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x) * 2

    with pytest.raises(TraceError, match=r"inside 'inner', a Inner(.|\n)*" + HERE + r":\d+ in forward: if x\.sum"):
        trace(Outer(), keep_untraceable=False)
    assert set(trace(Outer()).revpass_untraced) == {"inner"}


# ---------------------------------------------------------------------------------------------
# shapes of intermediate values read in forward
# ---------------------------------------------------------------------------------------------


class _NdimBranch(nn.Module):
    """Spikformer's pattern: a branch on the number of dimensions of an intermediate value,
    shapes unpacked and used to reshape, around SpikingJelly multi-step neurons."""

    def __init__(self):
        super().__init__()
        layer, neuron = _sj()
        self.conv = layer.Conv2d(2, 4, 3, padding=1, step_mode="m")
        self.sn1 = neuron.LIFNode(step_mode="m")
        self.fc = layer.Linear(4 * 4 * 4, 6, step_mode="m")
        self.sn2 = neuron.LIFNode(tau=3.0, step_mode="m")

    def forward(self, x):
        h = self.sn1(self.conv(x))
        if h.ndim != 5:
            raise ValueError(f"expected [T, N, C, H, W], got {h.shape}")
        T, N, C, H, W = h.shape
        return self.sn2(self.fc(h.reshape(T, N, C * H * W)))


def test_a_branch_on_an_intermediate_shape_traces_and_converts():
    torch.manual_seed(0)
    net, x = _NdimBranch(), torch.randn(3, 2, 2, 4, 4) * 2
    conv = revpass.convert(net, x, mode="exact")
    rep = conv.revpass_report
    assert [(r.path, r.kind, r.decision) for r in rep] == [("sn1", "a", "exact"), ("sn2", "a", "exact")]
    assert conv.revpass_untraced == {}
    _same(net, conv, x)


def test_spikformer_tiny_converts():
    from spikingjelly.activation_based.model.spikformer import Spikformer

    torch.manual_seed(0)
    net = Spikformer(T=2, in_channels=3, img_size_h=16, img_size_w=16, patch_size=4, num_classes=4,
                     embed_dims=16, num_heads=2, mlp_ratio=2.0, depths=1)
    x = torch.randn(1, 3, 16, 16)
    conv = revpass.convert(net, x, mode="exact")
    rep = conv.revpass_report
    assert len(rep) == rep.count("exact") == 10 and conv.revpass_untraced == {}
    _same(net, conv, x)


class _LoopLIF(nn.Module):
    """A hand-written multi-step LIF whose loop reads the sequence's length."""

    def __init__(self, tau=2.0):
        super().__init__()
        self.tau = tau

    def forward(self, x_seq):
        v = torch.zeros_like(x_seq[0])
        out = []
        for t in range(x_seq.shape[0]):
            h = v + (x_seq[t] - v) / self.tau
            s = Spike.apply(h - 1.0)
            v = s * 0.0 + (1.0 - s) * h
            out.append(s)
        return torch.stack(out)


class _LoopNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.sn1 = nn.Linear(8, 6), _LoopLIF()
        self.fc2, self.sn2 = nn.Linear(6, 4), _LoopLIF(3.0)

    def forward(self, x):
        return self.sn2(self.fc2(self.sn1(self.fc1(x))))


def test_a_neuron_looping_over_its_inputs_length_is_recognised():
    torch.manual_seed(0)
    net, x = _LoopNet(), torch.randn(5, 2, 8) + 0.5
    conv = revpass.convert(net, x, mode="exact")
    rep = conv.revpass_report
    assert [(r.path, r.kind, r.decision) for r in rep] == [("sn1", "c", "exact"), ("sn2", "c", "exact")]
    _same(net, conv, x)


def test_without_example_inputs_the_loop_is_kept_whole_and_said_why():
    torch.manual_seed(0)
    net, x = _LoopNet(), torch.randn(5, 2, 8) + 0.5
    conv = revpass.convert(net, mode="exact")  # no shapes: the loop cannot be unrolled
    assert set(conv.revpass_untraced) == {"sn1", "sn2"}
    why = conv.revpass_untraced["sn1"]
    assert HERE in why and "range(x_seq.shape[0])" in why and "example_inputs" in why
    _same(net, conv, x)


class _VoltageLoop(nn.Module):
    """norse's ConvNet pattern: an output buffer made from the input's shape and device, written
    step by step, around a single-step cell."""

    def __init__(self):
        super().__init__()
        import norse.torch as norse

        self.fc, self.cell, self.out = nn.Linear(8, 6), norse.LIFCell(), nn.Linear(6, 3)

    def forward(self, x):
        seq_length, batch = x.shape[0], x.shape[1]
        voltages = torch.zeros(seq_length, batch, 3, device=x.device, dtype=x.dtype)
        s = None
        for ts in range(seq_length):
            z, s = self.cell(self.fc(x[ts]), s)
            voltages[ts, :, :] = self.out(z)
        return voltages


def test_a_constructor_with_traced_shape_and_device_and_a_written_buffer():
    torch.manual_seed(0)
    net, x = _VoltageLoop(), torch.randn(4, 2, 8) * 4
    conv = revpass.convert(net, x, mode="exact")
    rep = conv.revpass_report
    assert [(r.path, r.kind, r.calls, r.decision) for r in rep] == [("cell", "b", 4, "exact")]
    zeros = [n for n in conv.graph.nodes if n.target is torch.zeros]
    assert len(zeros) == 1 and "device" in zeros[0].kwargs  # the real device, read at run time
    _same(net, conv, x)


def test_norse_convnet_converts():
    from norse.torch.models.conv import ConvNet

    torch.manual_seed(0)
    net, x = ConvNet(), torch.randn(2, 1, 1, 28, 28) * 2
    conv = revpass.convert(net, x, mode="exact")
    rep = conv.revpass_report
    assert {r.path for r in rep} == {"lif0", "lif1", "lif2"} and rep.count("exact") == 3
    _same(net, conv, x)


# ---------------------------------------------------------------------------------------------
# tensor constants
# ---------------------------------------------------------------------------------------------


class _Constants(nn.Module):
    """A tensor attribute (neither parameter nor buffer) and a tensor made in forward."""

    def __init__(self):
        super().__init__()
        layer, neuron = _sj()
        self.fc = layer.Linear(8, 6, step_mode="m")
        self.gain = torch.linspace(0.5, 2.0, 6)
        self.sn = neuron.LIFNode(step_mode="m")

    def forward(self, x):
        return self.sn(self.fc(x) * self.gain + torch.tensor(0.25))


@pytest.mark.parametrize("with_inputs", [True, False], ids=["inputs", "no_inputs"])
def test_tensor_constants_trace_and_stay_out_of_the_state_dict(with_inputs):
    torch.manual_seed(0)
    net, x = _Constants(), torch.randn(5, 2, 8) + 0.5
    gm = trace(copy.deepcopy(net))
    assert set(gm.state_dict()) == set(net.state_dict())
    conv = revpass.convert(net, x if with_inputs else None, mode="exact")
    assert set(conv.state_dict()) == set(net.state_dict())
    assert [(r.path, r.kind, r.decision) for r in conv.revpass_report] == [("sn", "a", "exact")]
    _same(net, conv, x)
    revpass.convert(net, x if with_inputs else None, mode="exact", inplace=True)
    assert not [k for k in vars(net) if k.startswith("_tensor_constant")]  # nothing left on the user's model


# ---------------------------------------------------------------------------------------------
# parts that cannot be traced: kept whole, reported, their multi-step neurons swapped
# ---------------------------------------------------------------------------------------------


class _Gated(nn.Module):
    """Data-dependent control flow around SpikingJelly neurons: not traceable."""

    def __init__(self):
        super().__init__()
        layer, neuron = _sj()
        self.fc = layer.Linear(6, 6, step_mode="m")
        self.sn = neuron.LIFNode(step_mode="m")
        self.single = neuron.IFNode()  # single-step: its calls are in the untraced code

    def forward(self, x):
        h = self.fc(x)
        if h.mean() > 0:
            h = -h
        return self.sn(h) + torch.stack([self.single(t) for t in h])


class _WithGated(nn.Module):
    def __init__(self):
        super().__init__()
        layer, neuron = _sj()
        self.fc = layer.Linear(8, 6, step_mode="m")
        self.sn0 = neuron.LIFNode(step_mode="m")
        self.block = _Gated()
        self.out = layer.Linear(6, 2, step_mode="m")

    def forward(self, x):
        return self.out(self.block(self.sn0(self.fc(x))))


def _pipeline(gm, mode):
    """trace's result through detect, decide and rewrite, with the untraced parts' sites (what
    revpass.api does with them)."""
    sites = find_sites(gm) + untraced_sites(gm)
    decide(gm, sites, [], mode=mode)
    settle(sites)
    rewrite(gm, sites, [], "optimized")
    return {s.path: s for s in sites}


@pytest.mark.parametrize("with_inputs", [True, False], ids=["inputs", "no_inputs"])
def test_an_untraceable_block_is_kept_whole_and_its_multi_step_neurons_swapped(with_inputs):
    torch.manual_seed(0)
    net, x = _WithGated(), torch.randn(4, 2, 8) + 0.5
    gm = trace(copy.deepcopy(net), input_shapes=[tuple(x.shape)] if with_inputs else None)
    assert set(gm.revpass_untraced) == {"block"}
    why = gm.revpass_untraced["block"]
    assert "_Gated could not be traced" in why and f"{HERE}:" in why and "if h.mean() > 0" in why
    assert untraced_parts(gm) == [("block", why)]
    sites = _pipeline(gm, "recompute")
    assert sites["sn0"].decision == "recompute"
    inner = sites["block.sn"]
    assert inner.kind == "a" and inner.decision == "exact" and "kept whole" in inner.reason
    assert sites["block.single"].decision == "unchanged" and "cannot be rolled" in sites["block.single"].reason
    assert type(gm.block.sn).__name__ == "ExactNode" and type(gm.block.single).__name__ == "IFNode"
    _same(net, gm, x)


def test_the_planner_and_a_copy_keep_the_parts_kept_whole():
    """budget="min" converts copies of one trace, and a user copies a converted model: fx's own
    deepcopy keeps only what the graph calls, and dropped ``revpass_untraced`` (and the report):
    the planner's conversions then listed no neuron inside a part kept whole."""
    torch.manual_seed(0)
    net, x = _WithGated(), torch.randn(4, 2, 8) + 0.5
    with pytest.warns(revpass.RevpassWarning):
        plain = revpass.convert(net, x, mode="exact")
        least = revpass.convert(net, x, mode="exact", budget="min")
    assert least.revpass_untraced == plain.revpass_untraced and set(least.revpass_untraced) == {"block"}
    rows = {r.path: r.decision for r in least.revpass_report.rows}
    assert rows == {"sn0": rows["sn0"], "block.sn": "exact", "block.single": "unchanged"}
    assert type(least.block.sn).__name__ == "ExactNode"
    _same(net, least, x)
    dup = copy.deepcopy(plain)
    assert dup.revpass_untraced == plain.revpass_untraced and dup.revpass_untraced is not plain.revpass_untraced
    assert [(r.path, r.decision, r.reason) for r in dup.revpass_report.rows] == [
        (r.path, r.decision, r.reason) for r in plain.revpass_report.rows]


def test_a_registered_leaf_is_reported_and_its_multi_step_neurons_swapped():
    class KeptWhole(nn.Module):
        def __init__(self):
            super().__init__()
            layer, neuron = _sj()
            self.fc = layer.Linear(6, 6, step_mode="m")
            self.sn = neuron.LIFNode(step_mode="m")

        def forward(self, x):
            return self.sn(self.fc(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.part = nn.Linear(8, 6), KeptWhole()

        def forward(self, x):
            return self.part(self.fc(x))

    register_leaf(KeptWhole)
    torch.manual_seed(0)
    net, x = Net(), torch.randn(4, 2, 8) + 0.5
    gm = trace(copy.deepcopy(net))
    assert "register_leaf" in gm.revpass_untraced["part"]
    sites = _pipeline(gm, "exact")
    assert sites["part.sn"].decision == "exact" and type(gm.part.sn).__name__ == "ExactNode"
    _same(net, gm, x)


def test_convert_reports_and_converts_inside_an_untraceable_block():
    torch.manual_seed(0)
    net, x = _WithGated(), torch.randn(4, 2, 8) + 0.5
    conv = revpass.convert(net, x, mode="exact")
    rep = conv.revpass_report
    assert rep.by_path("sn0").decision == "exact" and rep.by_path("block.sn").decision == "exact"
    assert rep.by_path("block.single").decision == "unchanged"
    _same(net, conv, x)


def test_a_recompute_conversion_around_an_untraceable_block_keeps_the_gradients():
    """A part kept whole may hold state the graph does not show (a single-step neuron): a
    recomputed segment must not run it again in backward."""
    torch.manual_seed(0)
    net, x = _WithGated(), torch.randn(4, 2, 8) + 0.5
    conv = revpass.convert(net, x, mode="recompute")
    assert conv.revpass_report.by_path("block.sn").decision == "exact"
    result = revpass.verify(net, conv, x)
    assert result.passed, str(result)
