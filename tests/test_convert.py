"""revpass.convert on models nobody here wrote: sites found, both modes, verify, exactness."""

import pytest
import torch
from torch import nn

import models
import revpass
from revpass.trace import TraceError


def _flat(o):
    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, (tuple, list)):
        return [t for p in o for t in _flat(p)]
    return []


def _reset(net):
    from revpass.state import reset_states

    reset_states(net)


# name, factory, input, expected sites, expected converted, unchanged site -> reason fragment
CASES = [
    ("spiking_resnet18", lambda: models.sj_zoo("spiking_resnet18"), lambda: torch.randn(2, 1, 3, 32, 32), 17, 17, {}),
    ("spiking_vgg11_bn", lambda: models.sj_zoo("spiking_vgg11_bn"), lambda: torch.randn(2, 1, 3, 32, 32), 10, 10, {}),
    ("snntorch_fc", models.SnnTorchFC, lambda: torch.randn(3, 20) * 2, 2, 1, {"lif2": "read by"}),
    ("snntorch_conv", models.SnnTorchConv, lambda: torch.randn(2, 1, 28, 28) * 2, 3, 2, {"lif3": "read by"}),
    ("snntorch_init_hidden_fc", lambda: models.OverTime(models.snntorch_init_hidden_fc()),
     lambda: torch.randn(3, 20) * 2, 2, 2, {}),
    ("snntorch_init_hidden_conv", lambda: models.OverTime(models.snntorch_init_hidden_conv()),
     lambda: torch.randn(2, 1, 28, 28) * 2, 3, 3, {}),
    ("norse_sequential", models.norse_sequential, lambda: torch.randn(4, 2, 8) * 4, 2, 2, {}),
    ("norse_cell_loop", models.NorseCellLoop, lambda: torch.randn(4, 2, 8) * 4, 1, 1, {}),
    ("sj_single_step_loop", models.SJSingleStepLoop, lambda: torch.randn(4, 2, 8) + 0.5, 2, 2, {}),
    ("registered_hand_lif", lambda: (models.register_hand_lif(), models.RegisteredHandNet())[1],
     lambda: torch.randn(6, 2, 8) + 0.5, 2, 2, {}),
    ("hand_written_lif_module", models.HandNet, lambda: torch.randn(6, 2, 8) + 0.5, 2, 2, {}),
    ("hand_written_snntorch_style", models.SnnTorchStyleHandNet, lambda: torch.randn(5, 2, 8) + 0.5, 1, 1, {}),
    ("snntorch_recurrent", models.SnnTorchRecurrent, lambda: torch.randn(4, 2, 8), 2, 1, {"rlif": "RLeaky"}),
]


@pytest.mark.parametrize("name,make,inp,n_sites,n_conv,unchanged", CASES, ids=[c[0] for c in CASES])
def test_convert_real_models(name, make, inp, n_sites, n_conv, unchanged):
    torch.manual_seed(0)
    net = make()
    x = inp()
    for mode in ("exact", "reversible", "recompute"):
        before = {k: v.clone() for k, v in net.state_dict().items()}
        modules_before = [type(m) for m in net.modules()]
        conv = revpass.convert(net, x, mode=mode)
        # the original is untouched: same modules, same tensors; and the measuring runs left no
        # trace in the converted copy (batch norm's running statistics are the original's)
        assert [type(m) for m in net.modules()] == modules_before
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
        assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())
        rep = conv.revpass_report
        assert len(rep) == n_sites
        assert rep.count(mode) == n_conv
        for path, why in unchanged.items():
            row = rep.by_path(path)
            assert row.decision == "unchanged" and why in row.reason
        assert path_table_ok(str(rep), rep)
        # state_dict keys unchanged; a checkpoint loads both ways with strict=True
        assert set(conv.state_dict()) == set(net.state_dict())
        conv.load_state_dict(net.state_dict(), strict=True)
        net.load_state_dict(conv.state_dict(), strict=True)
        # snnTorch init_hidden neurons are reset before every forward, as the tutorials do
        # (snntorch.utils.reset); a converted one starts each forward from the reset state
        per_call_reset = any(getattr(m, "init_hidden", False) for m in net.modules())

        def call(m, seed):  # the same dropout masks for every model
            if per_call_reset and m is net:
                _reset(m)
            torch.manual_seed(seed)
            return _flat(m(x))

        _reset(net)
        y_ref, y_ref2 = call(net, 1), call(net, 2)
        y1, y2 = call(conv, 1), call(conv, 2)
        _reset(conv)
        y3 = call(conv, 1)
        assert all(torch.equal(a, b) for a, b in zip(y1, y3)), "reset does not bring the state back"
        if mode == "exact":  # the same function, call after call (state carried as the original does)
            assert all(torch.equal(a, b) for a, b in zip(y_ref, y1)), "exact mode changed the output"
            assert all(torch.equal(a, b) for a, b in zip(y_ref2, y2)), "second call differs"
        result = revpass.verify(net, conv, x)
        assert result.passed, str(result)


def path_table_ok(text, rep):
    return all(r.path in text and r.decision in text for r in rep)


def test_inplace_converts_the_model_itself():
    net = models.SJSingleStepLoop()
    conv = revpass.convert(net, mode="exact", inplace=True)
    assert isinstance(net.sn1, revpass.ExactNode) and conv.sn1 is net.sn1


def test_include_and_exclude():
    net = models.sj_zoo("spiking_resnet18")
    conv = revpass.convert(net, include=["layer1.*"], exclude=["layer1.1.*"])
    rep = conv.revpass_report
    converted = sorted(r.path for r in rep if r.decision == "reversible")
    assert converted == ["layer1.0.sn1", "layer1.0.sn2"]
    assert rep.by_path("sn1").reason == "not in include"
    assert rep.by_path("layer1.1.sn1").reason == "excluded"


def test_a_recurrent_input_is_not_rolled():
    import snntorch as snn

    class SelfFed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.rec, self.lif = nn.Linear(4, 3), nn.Linear(3, 3), snn.Leaky(beta=0.9)

        def forward(self, x):
            mem = self.lif.init_leaky()
            spk = self.fc(x[0]) * 0.0
            out = []
            for t in range(3):
                spk, mem = self.lif(self.fc(x[t]) + self.rec(spk), mem)
                out.append(spk)
            return torch.stack(out)

    rep = revpass.convert(SelfFed()).revpass_report
    assert rep.by_path("lif").decision == "unchanged"
    assert "depends on this neuron's own outputs" in rep.by_path("lif").reason


def test_untraceable_model_names_the_line_and_the_fix():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    with pytest.raises(TraceError, match=r"test_convert\.py:\d+ in forward.*x\.sum\(\) > 0(.|\n)*register_leaf"):
        revpass.convert(Branchy())


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        revpass.convert(models.SJSingleStepLoop(), mode="fast")


def test_converting_twice_does_not_convert_again():
    net = models.SJSingleStepLoop()
    once = revpass.convert(net, mode="exact")
    twice = revpass.convert(once, mode="reversible")
    rep = twice.revpass_report
    assert [r.decision for r in rep] == ["unchanged", "unchanged"]
    assert all(r.reason == "already a revpass exact node" for r in rep)
    assert all(isinstance(m, revpass.ExactNode) for m in (twice.sn1, twice.sn2))
    x = torch.randn(4, 2, 8) + 0.5
    assert torch.equal(once(x), twice(x))


class _Variant(nn.Module):
    """A hand-written neuron in one of the table's forms, inline in a time loop."""

    def __init__(self, style, reset, T=6):
        super().__init__()
        self.style, self.reset, self.T = style, reset, T
        self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        v = torch.zeros_like(self.fc1(x[0]))
        out = []
        for t in range(self.T):
            cur = self.fc1(x[t])
            if self.style == "spikingjelly":
                h = v + (cur - v) / 2.0
            elif self.style == "spikingjelly-no-decay-input":
                h = v - v / 3.0 + cur
            elif self.style == "if":
                h = v + cur
            else:  # snntorch-style
                h = 0.8 * v + cur
            s = models._SigmoidSpike.apply(h - 0.5)
            if self.reset == "hard":
                v = s * 0.0 + (1.0 - s) * h
            elif self.reset == "zero":
                v = h * (1.0 - s)
            else:
                v = h - s * 0.5
            out.append(self.fc2(s))
        return torch.stack(out)


@pytest.mark.parametrize("style", ["spikingjelly", "spikingjelly-no-decay-input", "if", "snntorch"])
@pytest.mark.parametrize("reset", ["hard", "zero", "soft"])
def test_hand_written_neurons_are_recognised(style, reset):
    torch.manual_seed(0)
    net = _Variant(style, reset)
    x = torch.randn(6, 2, 8) + 0.5
    for mode in ("exact", "reversible"):
        conv = revpass.convert(net, x, mode=mode)
        rep = conv.revpass_report
        assert len(rep) == 1 and rep.rows[0].kind == "c" and rep.rows[0].decision == mode, str(rep)
        assert rep.rows[0].calls == 6
        # no primitive op of the neuron is left: the spike function is gone from the graph
        assert not any(hasattr(n.target, "revpass_function") for n in conv.graph.nodes)
        if mode == "exact":
            assert torch.equal(conv(x), net(x))
        assert revpass.verify(net, conv, x).passed


def test_a_hand_written_membrane_read_elsewhere_is_left_alone():
    class Leaky(nn.Module):
        def forward(self, x):
            v, out, mems = torch.zeros_like(x[0]), [], []
            for t in range(4):
                h = v + (x[t] - v) / 2.0
                s = models._SigmoidSpike.apply(h - 1.0)
                v = s * 0.0 + (1.0 - s) * h
                out.append(s)
                mems.append(h)  # the membrane feeds the output
            return torch.stack(out), torch.stack(mems)

    rep = revpass.convert(Leaky(), torch.randn(4, 2, 3)).revpass_report
    assert rep.rows[0].decision == "unchanged" and "is read by" in rep.rows[0].reason


def test_snntorch_init_hidden_stepped_from_outside_is_left_alone():
    net = models.snntorch_init_hidden_conv()  # the tutorial calls it once per step, in its own loop
    rep = revpass.convert(net, torch.randn(2, 1, 28, 28)).revpass_report
    assert [r.decision for r in rep] == ["unchanged"] * 3
    assert all("init_hidden=True called once per forward" in r.reason for r in rep)


@pytest.mark.parametrize("name", ["spiking_resnet18", "spiking_vgg11_bn"])
def test_exact_mode_has_the_original_gradients_bit_for_bit(name):
    """A SpikingJelly zoo model (LIFNode, its default Sigmoid surrogate) converted in exact mode, on
    the CPU, gives the original's outputs and every parameter's gradient bit for bit, over three
    Adam steps: training it is training the original."""
    torch.manual_seed(0)
    net = models.sj_zoo(name)
    x = torch.randn(2, 2, 3, 32, 32)
    conv = revpass.convert(net, x, mode="exact")
    assert conv.revpass_report.count("exact") > 0
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (net, conv)]
    for step in range(3):
        grads = []
        for model, opt in zip((net, conv), opts):
            _reset(model)
            opt.zero_grad(set_to_none=True)
            y = model(x * (1 + step))
            y.square().mean().backward()
            grads.append((y.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
            opt.step()
        (y_ref, g_ref), (y, g) = grads
        assert torch.equal(y, y_ref), f"step {step}: output differs"
        assert g.keys() == g_ref.keys()
        differ = [k for k in g if not torch.equal(g[k], g_ref[k])]
        assert not differ, f"step {step}: gradients differ for {differ[:5]}"


def _sj_conv_bn():
    """conv -> batch norm -> LIF, twice, multi-step SpikingJelly: the reversible nodes fold the
    batch norms (revpass/passes/fold.py)."""
    from spikingjelly.activation_based import layer, neuron

    torch.manual_seed(0)
    return nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, step_mode="m"), layer.BatchNorm2d(4, step_mode="m"),
        neuron.LIFNode(step_mode="m"),
        layer.Conv2d(4, 4, 3, padding=1, step_mode="m"), layer.BatchNorm2d(4, step_mode="m"),
        neuron.LIFNode(step_mode="m"),
        layer.Flatten(step_mode="m"), layer.Linear(4 * 5 * 5, 3, step_mode="m"),
    )


def _snntorch_fc():
    torch.manual_seed(0)
    return models.SnnTorchFC(num_inputs=6, num_hidden=4, num_outputs=3, num_steps=3)


INDEPENDENT = [
    ("sj_conv_bn", _sj_conv_bn, lambda: torch.randn(3, 2, 2, 5, 5) * 2 + 0.5),
    ("snntorch_fc", _snntorch_fc, lambda: torch.randn(2, 6) * 2),
]
HOW = [("reversible", {"mode": "reversible"}), ("exact", {"mode": "exact"}), ("recompute", {"mode": "recompute"}),
       ("budget_min", {"budget": "min"})]


def _tensors(m):
    """Every parameter, buffer and state_dict tensor of ``m``, by name."""
    out = dict(m.state_dict(keep_vars=True))
    out.update({f"param {k}": p for k, p in m.named_parameters(remove_duplicate=False)})
    out.update({f"buffer {k}": b for k, b in m.named_buffers(remove_duplicate=False)})
    return out


@pytest.mark.parametrize("how", [h for _, h in HOW], ids=[n for n, _ in HOW])
@pytest.mark.parametrize("make,inp", [c[1:] for c in INDEPENDENT], ids=[c[0] for c in INDEPENDENT])
def test_convert_returns_an_independent_copy(make, inp, how):
    """Without inplace, the converted model shares no parameter or buffer with the original, by
    object or by storage; a training step of the copy (forward, backward, optimizer step, batch
    norm's running statistics) leaves the original's state_dict bit for bit as it was."""
    from revpass.state import reset_states

    net, x = make(), inp()
    net(x)  # after a forward: the original's neurons hold state inside an autograd graph
    reset_states(net)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    conv = revpass.convert(net, x, **how)
    if "mode" in how:
        assert conv.revpass_report.count(how["mode"]) > 0
    else:  # on the small snnTorch network "min" may leave every site as it is: still a copy
        assert conv.revpass_budget["budget"] == "min"
    has_bn = any(k.endswith("running_mean") for k in before)
    if has_bn and how.get("mode") == "reversible":  # the nodes fold the copy's batch norms
        assert all("folds batch norm" in r.reason for r in conv.revpass_report), str(conv.revpass_report)
    mine = _tensors(net)
    ids = {id(t) for t in mine.values()}
    storages = {t.untyped_storage().data_ptr() for t in mine.values() if t.numel()}
    theirs = _tensors(conv)
    assert theirs.keys() >= set(before)  # the same state_dict keys, and more to check
    for name, t in theirs.items():
        assert id(t) not in ids, f"{name} is the original's own tensor"
        assert not t.numel() or t.untyped_storage().data_ptr() not in storages, f"{name} shares the original's storage"
    conv.train()
    reset_states(conv)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5, momentum=0.9)
    loss = sum(o.float().square().mean() + o.float().mean() for o in _flat(conv(x)))
    loss.backward()
    opt.step()
    after = conv.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.endswith("weight") for k in changed), changed  # the copy did train
    if has_bn:
        assert any(k.endswith("running_mean") for k in changed), changed
    now = net.state_dict()
    assert now.keys() == before.keys()
    for k, v in now.items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), f"the original's {k} changed"
    assert all(p.grad is None for p in net.parameters()), "the original's parameters got gradients"
