"""What a user would otherwise meet silently: neurons whose behaviour a node cannot keep are left
with the reason, registered neurons' state behaves as declared."""

import warnings

import pytest
import torch
from torch import nn

import revpass
from revpass.state import reset_states


def _sj_net(**kw):
    from spikingjelly.activation_based import layer, neuron

    torch.manual_seed(0)
    return nn.Sequential(layer.Linear(6, 8), neuron.LIFNode(step_mode="m", **kw),
                         layer.Linear(8, 4), neuron.LIFNode(step_mode="m"))


def test_store_v_seq_is_left_unchanged_with_the_reason_and_keeps_recording():
    net = _sj_net(store_v_seq=True)
    x = torch.randn(5, 3, 6) * 2
    for mode in ("reversible", "exact"):
        gm = revpass.convert(net, x, mode=mode)
        rows = {r.path: r for r in gm.revpass_report}
        assert rows["1"].decision == "unchanged" and "store_v_seq=True" in rows["1"].reason
        assert rows["3"].decision == mode
        reset_states(gm)
        gm(x)
        assert gm.get_submodule("1").v_seq is not None and gm.get_submodule("1").v_seq.shape == (5, 3, 8)


class _Restarting(nn.Module):
    """Starts every call from rest (no reset method)."""

    def __init__(self, tau=2.0):
        super().__init__()
        self.tau = tau

    def forward(self, x_seq):
        v, out = torch.zeros_like(x_seq[0]), []
        for x in x_seq:
            h = v + (x - v) / self.tau
            s = revpass.neurons.surrogate.builtin("spikingjelly.Sigmoid", 4.0, True).spike(h - 1.0)
            v = h * (1 - s)
            out.append(s)
        return torch.stack(out)


class _Carrying(_Restarting):
    """Carries v from one call to the next until reset()."""

    def __init__(self, tau=2.0):
        super().__init__(tau)
        self.v = None

    def reset(self):
        self.v = None


def _spec(m):
    return revpass.lif_spec(tau=m.tau, v_threshold=1.0, v_reset=0.0)


@pytest.mark.parametrize("declared", [None, "restart"])
def test_a_registered_neuron_that_restarts_each_call_trains_step_after_step(declared):
    revpass.register_neuron(_Restarting, _spec, state=declared)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), _Restarting())
    x = torch.randn(4, 3, 6) * 2
    gm = revpass.convert(net, mode="exact")
    assert gm.revpass_report.count("exact") == 1
    node = gm.get_submodule("1")
    assert node.carry_state is False
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    first = gm(x).detach()
    for _ in range(2):  # no reset between steps: the module does not need one
        opt.zero_grad()
        gm(x).sum().backward()
        opt.step()
    with torch.no_grad():
        gm.get_submodule("0").load_state_dict(net[0].state_dict())
        assert torch.equal(gm(x), first) and torch.equal(gm(x), first)  # every call from rest


def test_a_registered_neuron_with_reset_carries_state_like_spikingjelly():
    revpass.register_neuron(_Carrying, _spec)
    node = revpass.ExactNode.from_neuron(_Carrying())
    assert node.carry_state is True
    revpass.register_neuron(_Carrying, _spec, state="restart")
    assert revpass.ExactNode.from_neuron(_Carrying()).carry_state is False
    with pytest.raises(ValueError, match="state must be one of"):
        revpass.register_neuron(_Carrying, _spec, state="sometimes")


def _dropout_net():
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 8, 3, padding=1), layer.BatchNorm2d(8), neuron.LIFNode(),
                        layer.Dropout(0.5), layer.Conv2d(8, 8, 3, padding=1), neuron.LIFNode(),
                        layer.Flatten(), layer.Linear(8 * 6 * 6, 4))
    functional.set_step_mode(net, "m")
    return net


@pytest.mark.parametrize("how", [dict(mode="exact"), dict(mode="recompute"), dict(mode="reversible"),
                                 dict(budget="min")])
def test_measuring_runs_leave_no_trace(how):
    """convert's measuring runs leave no framework state (a dropout's mask), no batch norm
    statistics and no draw of the random number generator behind: the first forward after
    convert is the original's (exact and recompute keep the function)."""
    from spikingjelly.activation_based import functional, layer

    net = _dropout_net()
    x = torch.randn(4, 2, 2, 6, 6) * 2
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    gm = revpass.convert(net, x, **how)
    assert torch.equal(torch.get_rng_state(), rng)
    masks = [m for m in gm.modules() if isinstance(m, layer.Dropout)]
    assert masks and all(m._memories.get("mask") is None for m in masks)
    assert all(torch.equal(stats[k], v) for k, v in gm.state_dict().items() if k in stats)
    if how.get("mode") in ("exact", "recompute"):
        torch.manual_seed(1)
        ref = net(x)
        functional.reset_net(net)
        torch.manual_seed(1)
        assert torch.equal(gm(x), ref)


@pytest.mark.parametrize("bad,says", [
    (lambda x: x[:, :, :1], r"\(4, 2, 1, 6, 6\) float32\): RuntimeError"),  # wrong channel count
    (lambda x: x.long(), r"\(4, 2, 2, 6, 6\) int64\): RuntimeError"),  # integer input
    (lambda x: x.double(), r"\(4, 2, 2, 6, 6\) float64\): RuntimeError"),  # a float32 model, float64 input
])
def test_inputs_the_model_does_not_take_raise_one_clear_revpass_error(bad, says):
    net = _dropout_net()
    x = torch.randn(4, 2, 2, 6, 6)
    with pytest.raises(revpass.ExampleInputError, match=r"the model does not run on the example inputs \(" + says) as e:
        revpass.convert(net, bad(x))
    assert "ShapeProp" not in str(e.value) and "\n" not in str(e.value)
    assert e.value.__suppress_context__


def test_sites_left_unchanged_warn_once_and_the_report_keeps_every_reason_whole():
    import warnings

    import models

    net, x = models.SnnTorchConv(), torch.randn(2, 1, 28, 28)
    for how in (dict(mode="reversible"), dict(budget="min")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gm = revpass.convert(net, x, **how)
        ours = [w for w in caught if issubclass(w.category, revpass.RevpassWarning)]
        left = [r for r in gm.revpass_report if r.decision == "unchanged"]
        assert len(ours) == 1 and left, [str(w.message) for w in caught]
        assert str(ours[0].message).startswith(f"revpass.convert left {len(left)} of {len(gm.revpass_report)} "
                                               "neuron sites unchanged (")
        assert "print(converted.revpass_report)" in str(ours[0].message)
    text = " ".join(str(gm.revpass_report).split())
    for r in gm.revpass_report:  # wrapped, not cut
        assert " ".join(r.reason.split()) in text
    assert max(len(r.reason) for r in gm.revpass_report) > 80
    with warnings.catch_warnings(record=True) as caught:  # nothing left: no warning
        warnings.simplefilter("always")
        revpass.convert(_sj_net(), torch.randn(3, 2, 6))
    assert not [w for w in caught if issubclass(w.category, revpass.RevpassWarning)]


@pytest.mark.parametrize("mode", ["exact", "reversible"])
def test_a_time_loop_converted_at_one_T_refuses_another_T(mode):
    import models

    class Loop(models.LeakyLoop):  # the loop over the input's own steps: for x in x_seq
        def forward(self, x_seq):
            mem, out = self.lif.init_leaky(), []
            for x in x_seq:
                spk, mem = self.lif(self.fc(x), mem)
                out.append(spk)
            return torch.stack(out)

    net, x4 = Loop(seed=0), torch.randn(4, 3, 4) * 2
    gm = revpass.convert(net, x4, mode=mode)
    assert gm.revpass_report.count(mode) == 1
    assert mode == "reversible" or torch.equal(gm(x4), net(x4))
    with pytest.raises(revpass.TimeStepsError, match="has 6 time steps, but this model was converted with "
                                                      "example inputs of 4"):
        gm(torch.randn(6, 3, 4))
    gm(torch.randn(4, 5, 4))  # another batch size is fine


def test_a_multi_step_model_runs_at_any_T():
    net = _sj_net()
    gm = revpass.convert(net, torch.randn(4, 3, 6), mode="exact")
    from spikingjelly.activation_based import functional

    for T in (2, 7):
        x = torch.randn(T, 3, 6) * 2
        functional.reset_net(net)
        reset_states(gm)
        assert torch.equal(gm(x), net(x))


def test_a_model_traced_at_the_examples_shapes_refuses_others():
    import models

    class ShapeReader(models.LeakyLoop):  # reads shapes as numbers: traced at the example's shapes
        def forward(self, x_seq):
            mem, out = self.lif.init_leaky(), []
            bias = torch.zeros(x_seq.shape[1], 3)
            for t in range(x_seq.shape[0]):
                spk, mem = self.lif(self.fc(x_seq[t]) + bias, mem)
                out.append(spk)
            return torch.stack(out)

    net, x = ShapeReader(seed=0), torch.randn(4, 3, 4) * 2
    gm = revpass.convert(net, x, mode="exact")
    assert gm.revpass_shapes_assumed and gm.revpass_report.count("exact") == 1
    assert torch.equal(gm(x), net(x))
    with pytest.raises(revpass.TimeStepsError, match=r"has shape \(4, 5, 4\), but .* traced at the example's "
                                                      r"\(4, 3, 4\)"):
        gm(torch.randn(4, 5, 4))


def _same_outputs(net, gm, x):
    reset_states(net), reset_states(gm)
    with torch.no_grad():
        a, b = revpass.utils.flatten(net(x)), revpass.utils.flatten(gm(x))
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


def test_isinstance_on_a_neurons_tuple_output_traces_as_the_model_runs():
    """isinstance() on a neuron's output sees a proxy, not the tuple the neuron returns, in a
    plain symbolic trace: the graph took the other branch. convert finds that the graph is not the
    model and traces again with example values, where a leaf's tuple output is a tuple."""
    import snntorch as snn

    class Tupled(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc, self.sl = nn.Linear(6, 4), snn.StateLeaky(beta=0.9, channels=4)

        def forward(self, x):
            out = self.sl(self.fc(x))  # (spikes, mem)
            out = out[0] if isinstance(out, tuple) else out
            return torch.stack(list(out))

    net, x = Tupled(), torch.randn(3, 2, 6)
    gm = _quiet_convert(net, x)
    assert _same_outputs(net, gm, x)
    (row,) = gm.revpass_report.rows
    assert row.decision == "unchanged" and "StateLeaky is not supported" in row.reason


def _quiet_convert(net, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", revpass.RevpassWarning)
        return revpass.convert(net, x, mode="exact", **kw)


def test_a_neuron_whose_reset_state_is_none_traces():
    """DeltaLeaky.init_leaky() returns (None, None): traced, its reset state stays None (a fresh
    empty tensor in its place made the graph fail where the model runs)."""
    import snntorch as snn

    class Delta(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc, self.lif = nn.Linear(6, 4), snn.DeltaLeaky(beta=0.9)

        def forward(self, x):
            state, out = self.lif.init_leaky(), []
            for t in range(x.shape[0]):
                spk, state = self.lif(self.fc(x[t]), state)
                out.append(spk)
            return torch.stack(out)

    net, x = Delta(), torch.randn(3, 2, 6)
    gm = _quiet_convert(net, x)
    assert _same_outputs(net, gm, x)
    assert not gm.revpass_untraced  # traced through, not kept whole


class _Checked(nn.Module):
    """A block whose forward branches on isinstance(): traced, the Linear's output is a proxy."""

    def __init__(self):
        super().__init__()
        from spikingjelly.activation_based import neuron

        self.fc, self.lif = nn.Linear(6, 6), neuron.LIFNode(step_mode="m")

    def forward(self, x):
        y = self.fc(x)
        return self.lif(y) if isinstance(y, torch.Tensor) else y


def test_a_part_that_traces_wrong_is_kept_whole_and_its_neurons_converted():
    """The graph traced through _Checked is not the model: convert finds that part (and only it),
    keeps it whole, says so, and still converts the multi-step neuron inside it by module swap."""
    from spikingjelly.activation_based import neuron

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.pre = nn.Sequential(nn.Linear(6, 6), neuron.LIFNode(step_mode="m"))
            self.block = _Checked()
            self.head = nn.Sequential(nn.Linear(6, 6), neuron.LIFNode(step_mode="m"))

        def forward(self, x):
            z = self.block(self.pre(x))
            return self.head(z), z

    net, x = Net(), torch.randn(3, 2, 6) * 3
    gm = _quiet_convert(net, x)
    assert list(gm.revpass_untraced) == ["block"]
    assert "the graph traced through it does not compute what the model does" in gm.revpass_untraced["block"]
    assert {r.path: r.decision for r in gm.revpass_report.rows} == {
        "pre.1": "exact", "block.lif": "exact", "head.1": "exact"}
    assert _same_outputs(net, gm, x)
    assert type(gm.block.lif) is not neuron.LIFNode  # swapped inside the part kept whole


def test_a_part_that_traces_wrong_in_a_module_list_is_found():
    """The items of a ModuleList (never called itself) are searched as children of its owner."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.blocks = nn.ModuleList([nn.Linear(6, 6), _Checked()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x, x * 2

    net, x = Net(), torch.randn(3, 2, 6) * 3
    gm = _quiet_convert(net, x)
    assert list(gm.revpass_untraced) == ["blocks.1"]
    assert _same_outputs(net, gm, x)


def test_a_trace_tried_on_the_example_inputs_prints_no_traceback(capfd):
    """convert runs traces that may fail on the example inputs (a part traced wrong, before it is
    kept whole): fx's ShapeProp prints the failing node's traceback before it raises, which
    looked like a crash of convert; the failure is revpass's one-line error, stderr stays empty,
    and what a run that succeeds writes there (the model's own warnings) still appears."""
    import sys

    from torch import fx

    from revpass.analysis.measure import site_shapes
    from revpass.errors import ExampleInputError

    class Wrong(nn.Module):
        def forward(self, x):
            return x.reshape(5, 7)

    class Noisy(nn.Module):
        def forward(self, x):
            print("the model's own note", file=sys.stderr)
            return x * 2

    with pytest.raises(ExampleInputError, match="does not run on the example inputs"):
        site_shapes(fx.symbolic_trace(Wrong()), (torch.randn(2, 3),))
    assert capfd.readouterr().err == ""
    assert site_shapes(fx.symbolic_trace(Noisy()), (torch.randn(2, 3),))["mul"] == (2, 3)
    assert capfd.readouterr().err == "the model's own note\n"


def test_a_trace_wrong_in_the_models_own_forward_is_refused():
    """No part kept whole helps when the model's own forward branches on a traced value: convert
    refuses rather than convert something else."""
    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            y = self.fc(x)
            return y * 2 if isinstance(y, torch.Tensor) else y

    with pytest.raises(revpass.trace.TraceError, match=r"does not compute what the model does on the example "
                                                        r"inputs: output 0: values differ .*keeping no part of it "
                                                        r"whole helps"):
        revpass.convert(Own(), torch.randn(3, 2, 6))


def test_a_zoo_subclass_of_a_library_neuron_is_a_site():
    """A model zoo's own subclass of LIFNode (SpikeDHS's save_v_LIFNode) is a neuron: converted
    when it only sets itself up differently, left with a reason naming what it redefines when it
    has its own step (what that step records would be lost)."""
    from spikingjelly.activation_based import neuron

    class Tuned(neuron.LIFNode):
        def __init__(self):
            super().__init__(tau=3.0, step_mode="m")

    class Recording(neuron.LIFNode):
        def multi_step_forward(self, x_seq):
            self.mean_input = x_seq.mean()
            return super().multi_step_forward(x_seq)

    net = nn.Sequential(nn.Linear(6, 6), Tuned(), nn.Linear(6, 6), Recording(step_mode="m"))
    torch.manual_seed(0)
    x = torch.randn(3, 2, 6) * 3
    gm = _quiet_convert(net, x)
    rows = {r.path: r for r in gm.revpass_report.rows}
    assert rows["1"].decision == "exact" and rows["3"].decision == "unchanged"
    assert "subclasses SpikingJelly's LIFNode and defines its own multi_step_forward" in rows["3"].reason
    assert type(gm.get_submodule("3")) is Recording
    assert _same_outputs(net, gm, x)


def test_a_module_made_in_forward_is_traced_through():
    """nn.Upsample(...)(x) in forward (SpikeDHS's cells): not a submodule, so fx cannot call it as
    one; it holds no tensor, so its operations are traced and the block is not kept whole."""
    from spikingjelly.activation_based import layer, neuron

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lif = layer.Conv2d(2, 2, 3, padding=1, step_mode="m"), neuron.LIFNode(step_mode="m")

        def forward(self, x):
            return self.lif(layer.SeqToANNContainer(nn.Upsample(scale_factor=2))(self.conv(x)))

    torch.manual_seed(0)
    net, x = Up(), torch.randn(2, 1, 2, 4, 4) * 3
    gm = _quiet_convert(net, x)
    assert not gm.revpass_untraced
    assert [r.decision for r in gm.revpass_report.rows] == ["exact"]
    assert _same_outputs(net, gm, x)


def test_snntorch_leaky_parallel_is_named_and_keeps_the_input_gradient():
    """LeakyParallel (an nn.RNN over the sequence, not a SpikingNeuron) is a neuron the report
    names as unsupported, called whole: the converted model's input gradient is the model's."""
    import snntorch as snn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), snn.LeakyParallel(4, 4, beta=0.9))
    x = torch.randn(3, 2, 6) * 3
    gm = _quiet_convert(net, x)
    (row,) = gm.revpass_report.rows
    assert row.decision == "unchanged" and "LeakyParallel is not supported" in row.reason
    grads = []
    for m in (net, gm):
        xi = x.clone().requires_grad_()
        m(xi).sum().backward()
        grads.append(xi.grad)
    assert grads[1] is not None and torch.equal(grads[0], grads[1])


def test_norse_box_cells_sharing_default_parameters_train_under_the_smallest_budget():
    """Two LIFBoxCell() share their default parameters' tensors; with mode="recompute" both become
    recomputed segments, with budget="min" the first (the second's rebuild does not set the
    peak: it is an exact node). Two training steps run, with the original's gradients (exact
    function)."""
    import norse.torch as norse

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.c1 = nn.Linear(8, 16), norse.LIFBoxCell()
            self.fc2, self.c2 = nn.Linear(16, 8), norse.LIFBoxCell()

        def forward(self, x_seq):
            s1 = s2 = None
            out = []
            for t in range(x_seq.shape[0]):
                z, s1 = self.c1(self.fc1(x_seq[t]), s1)
                z, s2 = self.c2(self.fc2(z), s2)
                out.append(z)
            return torch.stack(out)

    torch.manual_seed(0)
    net, x = Loop(), torch.randn(6, 4, 8) * 8 + 4
    assert net.c1.p.tau_mem_inv is net.c2.p.tau_mem_inv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", revpass.RevpassWarning)
        every = revpass.convert(net, x, mode="recompute")
        least = revpass.convert(net, x, budget="min")
    assert [r.decision for r in every.revpass_report.rows] == ["recompute", "recompute"]
    assert [r.decision for r in least.revpass_report.rows] == ["recompute", "exact"]
    w = torch.randn(6, 4, 8)
    for gm in (every, least):
        for step in range(2):
            grads = []
            for m in (net, gm):
                m.zero_grad()
                (m(x) * w).sum().backward()
                grads.append([p.grad.clone() for p in (m.fc1.weight, m.fc2.weight)])
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b)
            assert grads[0][0].abs().sum() > 0
