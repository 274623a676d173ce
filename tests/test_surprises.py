"""What a user would otherwise meet silently: neurons whose behaviour a node cannot keep are left
with the reason, registered neurons' state behaves as declared."""

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


def test_a_trace_that_does_not_compute_the_model_is_refused():
    """isinstance() on a neuron's output while tracing sees a proxy, not the tuple the neuron
    returns: the traced graph takes the other branch. convert compares it with the model on the
    example inputs and refuses rather than convert something else."""
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
    with pytest.raises(revpass.trace.TraceError, match=r"does not compute what the model does on the example "
                                                        r"inputs: output 0: the model gives \(3, 2, 4\)"):
        revpass.convert(net, x)


def test_a_trace_that_fails_where_the_model_runs_is_a_trace_error_not_an_input_error():
    import snntorch as snn

    class Delta(nn.Module):  # DeltaLeaky.init_leaky() returns (None, None): traced, a fresh state breaks it
        def __init__(self):
            super().__init__()
            self.fc, self.lif = nn.Linear(6, 4), snn.DeltaLeaky(beta=0.9)

        def forward(self, x):
            state, out = (self.lif.init_leaky(),), []
            for t in range(x.shape[0]):
                spk, *state = self.lif(self.fc(x[t]), *state)
                out.append(spk)
            return torch.stack(out)

    net, x = Delta(), torch.randn(3, 2, 6)
    net(x)  # the model itself runs
    with pytest.raises(revpass.trace.TraceError, match="fails on the example inputs, which the model itself runs"):
        revpass.convert(net, x)
