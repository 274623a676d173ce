"""revpass.verify checks a reversible conversion against the original model: each reversible
site replaced by the coupling of its original neuron (revpass/reference.py), not the converted
model against itself; and it runs the converted model in its own dtype too."""

import pytest
import torch
from torch import nn

import models
import revpass

# ---------------------------------------------------------------------------------------------
# small models, one per kind of site and framework
# ---------------------------------------------------------------------------------------------


class SJTwo(nn.Module):
    """Linear -> multi-step LIF -> Linear -> multi-step LIF (SpikingJelly, kind a)."""

    def __init__(self, c=8):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron

        self.fc1, self.sn1 = layer.Linear(6, c, step_mode="m"), neuron.LIFNode(step_mode="m")
        self.fc2, self.sn2 = layer.Linear(c, 4, step_mode="m"), neuron.ParametricLIFNode(step_mode="m")

    def forward(self, x):
        return self.sn2(self.fc2(self.sn1(self.fc1(x))))


class SnnLoop(nn.Module):
    """snnTorch Leaky with explicit membrane in a time loop (kind b), per-channel learned beta."""

    def __init__(self):
        super().__init__()
        import snntorch as snn

        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.lif1 = snn.Leaky(beta=torch.linspace(0.5, 0.95, 8), learn_beta=True)

    def forward(self, x):
        mem = self.lif1.init_leaky()
        out = []
        for t in range(x.shape[0]):
            s, mem = self.lif1(self.fc1(x[t]), mem)
            out.append(self.fc2(s))
        return torch.stack(out)


def _x(*shape, scale=2.0, shift=0.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def _set_threshold_sj(path):
    def mutate(net):
        net.get_submodule(path).v_threshold = 0.4
    return mutate


def _set_attr(name, value):
    def mutate(net):
        setattr(net, name, value)
    return mutate


def _snn_threshold(net):
    net.lif1.threshold.fill_(0.4)


def _norse_threshold(net):
    net.cell.p = net.cell.p._replace(v_th=torch.as_tensor(0.3))


def _norse_seq_threshold(net):
    net[1].p = net[1].p._replace(v_th=torch.as_tensor(0.3))


# name, model, input, the first site, a change of that site's neuron in the original, the first layer
CASES = [
    ("sj-multi-step", SJTwo, lambda: _x(4, 3, 6), "sn1", _set_threshold_sj("sn1"), "fc1.weight"),
    ("sj-odd-channels", lambda: SJTwo(c=5), lambda: _x(4, 3, 6), "sn1", _set_threshold_sj("sn1"), "fc1.weight"),
    ("sj-single-step-loop", models.SJSingleStepLoop, lambda: _x(4, 2, 8, scale=1.0, shift=0.5), "sn1",
     _set_threshold_sj("sn1"), "fc1.weight"),
    ("snntorch-leaky-loop", SnnLoop, lambda: _x(5, 3, 6), "lif1", _snn_threshold, "fc1.weight"),
    ("norse-lifcell-loop", models.NorseCellLoop, lambda: _x(4, 2, 8, scale=4.0), "cell", _norse_threshold,
     "fc.weight"),
    ("norse-lif-multi-step", models.norse_sequential, lambda: _x(4, 2, 8, scale=4.0), "1", _norse_seq_threshold,
     "0.weight"),
    ("hand-written", models.SnnTorchStyleHandNet, lambda: _x(5, 2, 8, scale=1.0, shift=0.5), "revpass_neuron_0",
     _set_attr("threshold", 0.4), "fc1.weight"),
]
IDS = [c[0] for c in CASES]


def _converted(make, inp):
    torch.manual_seed(0)
    net, x = make(), inp()
    gm = revpass.convert(net, x)
    return net, gm, x


@pytest.mark.parametrize("name,make,inp,site,mutate,weight", CASES, ids=IDS)
def test_a_correct_reversible_conversion_passes_against_the_original(name, make, inp, site, mutate, weight):
    net, gm, x = _converted(make, inp)
    assert gm.revpass_report.by_path(site).decision == "reversible"
    rep = revpass.verify(net, gm, x)
    assert rep.passed, str(rep)
    assert rep.against.startswith("the original model, each reversible site replaced by the coupling")
    assert rep.oracle is not None and rep.oracle.passed  # the second part: optimized vs autograd backward
    assert "second part:" in str(rep)
    # every parameter of the original is compared by name, the converted site's own included
    names = {c.name for c in rep.checks}
    assert {f"grad {n}" for n, p in net.named_parameters() if p.requires_grad} <= names
    assert not rep.problems and rep.first_site is None


@pytest.mark.parametrize("name,make,inp,site,mutate,weight", CASES, ids=IDS)
def test_corrupted_weights_of_a_reversible_conversion_fail(name, make, inp, site, mutate, weight):
    net, gm, x = _converted(make, inp)
    with torch.no_grad():
        gm.get_parameter(weight).mul_(1.25)
    rep = revpass.verify(net, gm, x)
    assert not rep.passed
    failed = {c.name for c in rep.failures()}
    assert "output[0]" in failed and f"grad {weight}" in failed, str(rep)
    assert rep.first_site == site and "its input differs already" in rep.site_note, str(rep)
    assert rep.oracle.passed  # the converted model agrees with itself: only the original shows it
    assert f"first site whose output differs (forward order): '{site}'" in str(rep)


@pytest.mark.parametrize("name,make,inp,site,mutate,weight", CASES, ids=IDS)
def test_a_neuron_that_is_not_the_converted_one_fails_at_its_site(name, make, inp, site, mutate, weight):
    """The original's neuron changed after conversion (the node's spec no longer describes it):
    the reference runs the original neuron, so the site is named, with the same input."""
    net, gm, x = _converted(make, inp)
    with torch.no_grad():
        mutate(net)
    rep = revpass.verify(net, gm, x)
    assert not rep.passed and "output[0]" in {c.name for c in rep.failures()}, str(rep)
    assert rep.first_site == site and "from the same input" in rep.site_note, str(rep)


# ---------------------------------------------------------------------------------------------
# registered neurons
# ---------------------------------------------------------------------------------------------


class WronglyRegisteredLIF(models.HandLIF):
    """tau 2 and threshold 1, registered below as tau 10 and threshold 0.2."""


class RegisteredNet(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.fc1, self.sn1, self.fc2, self.sn2 = nn.Linear(6, 8), cls(), nn.Linear(8, 4), cls()

    def forward(self, x):
        return self.sn2(self.fc2(self.sn1(self.fc1(x))))


def test_a_neuron_registered_with_a_wrong_spec_fails_and_the_report_names_the_site():
    revpass.register_neuron(WronglyRegisteredLIF, lambda m: revpass.lif_spec(tau=10.0, v_threshold=0.2))
    torch.manual_seed(0)
    net, x = RegisteredNet(WronglyRegisteredLIF), _x(6, 2, 6, scale=1.5, shift=0.5)
    gm = revpass.convert(net, x)
    assert gm.revpass_report.count("reversible") == 2
    rep = revpass.verify(net, gm, x)
    assert not rep.passed
    out = next(c for c in rep.checks if c.name == "output[0]")
    assert not out.passed and out.max_abs >= 0.5  # spikes differ: whole units
    assert rep.first_site == "sn1" and "from the same input" in rep.site_note
    assert "first site whose output differs (forward order): 'sn1'" in str(rep)
    assert rep.oracle.passed  # the converted model is consistent with itself: only the original shows it


class ChannelBound(models.HandLIF):
    """A LIF with a per-channel gain of shape (C, 1) that it squeezes: it runs on C channels only."""

    def __init__(self, channels=8):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels, 1))

    def forward(self, x_seq):
        return super().forward(x_seq * self.gain.squeeze(1))


def test_a_registered_neuron_that_cannot_run_on_half_its_channels_fails_with_the_reason():
    revpass.register_neuron(ChannelBound, lambda m: revpass.lif_spec(tau=m.tau, v_threshold=m.v_threshold))
    torch.manual_seed(0)
    net, x = RegisteredNet(ChannelBound), _x(6, 2, 6, scale=1.5, shift=0.5)
    net.sn2 = ChannelBound(4)
    gm = revpass.convert(net, x)
    assert gm.revpass_report.by_path("sn1").decision == "reversible"
    rep = revpass.verify(net, gm, x)
    assert not rep.passed and len(rep.problems) == 1, str(rep)
    why = rep.problems[0]
    assert why.startswith("the reference (the original model, its reversible sites coupled): its forward raised "
                          "CouplingError: ")
    assert "sn1: the reference runs the original ChannelBound on channels [4, 8) of its 8-channel input" in why
    assert "size of tensor" in why  # the neuron's own error
    assert "make ChannelBound's forward work on any number of channels" in why and "mode='exact'" in why
    assert why in str(rep)


# ---------------------------------------------------------------------------------------------
# the converted model in its own dtype
# ---------------------------------------------------------------------------------------------


class _Float32Fault(torch.autograd.Function):
    """Identity forward; a backward that fails in float32 only (raises, or returns NaN), as a
    kernel without a float32 path would: a float64 copy never sees it."""

    mode = "raise"

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if g.dtype == torch.float32:
            if _Float32Fault.mode == "raise":
                raise RuntimeError("no float32 backward kernel here")
            return g * torch.tensor(1e300, dtype=g.dtype) * 0.0  # inf * 0 in float32
        return g


class Faulty(SJTwo):
    def forward(self, x):
        return self.sn2(self.fc2(_Float32Fault.apply(self.sn1(self.fc1(x)))))


@pytest.mark.parametrize("fault", ["raise", "nan"])
def test_a_backward_that_fails_in_the_models_own_dtype_fails_verify(fault, monkeypatch):
    monkeypatch.setattr(_Float32Fault, "mode", fault)
    torch.manual_seed(0)
    net, x = Faulty(), _x(4, 3, 6)
    gm = revpass.convert(net, x)
    assert gm.revpass_report.count("reversible") == 2
    rep = revpass.verify(net, gm, x)
    assert rep.precision == "float64" and all(c.passed for c in rep.checks)  # the float64 copy is fine
    assert not rep.passed and len(rep.problems) == 1, str(rep)
    if fault == "raise":
        assert rep.problems[0] == ("the converted model's backward in its own dtype (float32) raised "
                                   "RuntimeError: no float32 backward kernel here")
    else:
        assert rep.problems[0] == ("non-finite values (inf or NaN) in the converted model's grad input[0], "
                                   "grad fc1.weight, grad fc1.bias, in its own dtype (float32)")
    assert "problem: " + rep.problems[0] in str(rep)


def test_exact_conversions_are_compared_with_the_original_as_before():
    net, gm, x = _converted(SJTwo, lambda: _x(4, 3, 6))
    exact = revpass.convert(net, x, mode="exact")
    rep = revpass.verify(net, exact, x)
    assert rep.passed and rep.against == "the original model" and rep.oracle is None
    with torch.no_grad():
        exact.fc2.weight.mul_(1.25)
    assert not revpass.verify(net, exact, x).passed
