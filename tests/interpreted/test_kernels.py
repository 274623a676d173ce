"""The Triton kernels under triton's CPU interpreter (TRITON_INTERPRET=1, REVPASS_KERNELS=triton),
against the PyTorch path: forward bit for bit, every gradient within docs/method.md's tolerance.

Run by tests/test_interpreted.py in a process of its own (triton reads TRITON_INTERPRET when a
kernel is defined). Tensors are small: the interpreter runs numpy program by program."""

import os

import pytest
import torch

import revpass
from nodes.test_batchnorm_exact import NEURONS as EXACT_NEURONS
from catalogue import AT_THRESHOLD, CASES, at_threshold_input, close, input_for, reduction_close, worst
from revpass.neurons import spec_from_module
from revpass.neurons.spec import family_of
from revpass.nodes import exact as torch_exact
from revpass.nodes import kernels
from revpass.nodes import reversible as torch_rev

DTYPES = [torch.float32, torch.float64]
KERNEL_CASES = [c for c in CASES if kernels.unsupported(spec_from_module(c.make())) is None]
OTHER_CASES = [c for c in CASES if c not in KERNEL_CASES]


@pytest.fixture
def backend(monkeypatch):
    """Switch REVPASS_KERNELS within a test."""
    def use(name):
        monkeypatch.setenv("REVPASS_KERNELS", name)
    return use


class Launches:
    """Counts Triton kernel launches (the interpreter's InterpretedFunction.run)."""

    def __init__(self, monkeypatch):
        from triton.runtime.interpreter import InterpretedFunction

        self.names = []
        run = InterpretedFunction.run

        def counted(fn, *args, **kwargs):
            self.names.append(fn.fn.__name__)
            return run(fn, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", counted)


def _params(spec, dtype):
    return {k: (v.detach().to(dtype).requires_grad_(v.requires_grad) if v.is_floating_point() else v)
            for k, v in spec.params.items()}


def _state(spec, P, x, seed):
    """A non-reset initial state (snnTorch's reset signal derived from its membrane)."""
    fam = family_of(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        s0 = fam.init_state(spec, x[0], fam.prepare(spec, P))
        s = tuple(t + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype) for t in s0)
        if spec.family == "snntorch":
            s = fam.complete_state(spec, s[:-1], fam.prepare(spec, P))
    return s


def _need(spec):
    return tuple(k for k, v in spec.params.items() if v.requires_grad)


def _close_all(a, b, dtype):
    return all(close(u, v, dtype) for u, v in zip(a, b))


def _params_close(k, r, dtype, truth):
    """Parameter gradients: sums over every element and step, which in float32 may miss the
    tolerance where the terms cancel; then they pass if no farther from the float64 value than
    the PyTorch path's (catalogue.reduction_close). ``truth()`` gives the float64 gradients."""
    cache = []

    def exact(n):
        if not cache:
            cache.append(truth())
        return cache[0][n]

    return all(reduction_close(k[n], r[n], lambda n=n: exact(n), dtype) for n in r)


def _f64(spec, P, *ts):
    """The same call's arguments in float64 (tensors, tuples of them, and the parameters)."""
    def cast(t):
        if isinstance(t, tuple):
            return tuple(cast(u) for u in t)
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    return {k: cast(v) for k, v in P.items()}, [cast(t) for t in ts]


def test_environment():
    assert kernels.interpreting() and kernels.setting() == "triton" and kernels.triton_available()


def test_fallback_cases_exist():
    """The catalogue keeps neurons the kernels do not cover (a user's own surrogate, per-neuron
    parameters): they run the PyTorch path, tested below."""
    assert {c.id for c in OTHER_CASES} == {"sj-lif-own-surrogate", "snn-leaky-channel-beta", "norse-lifcell-tanh"}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c.id for c in KERNEL_CASES])
def test_exact_kernels(case, dtype):
    from revpass.nodes.kernels import exact as K

    spec = spec_from_module(case.make())
    P = _params(spec, dtype)
    need = _need(spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for T, shape, given in ((1, (2, 5, 3), True), (7, (3, 5, 7, 5), False), (7, (2, 5, 3), True)):
            x = input_for(case, T, shape=shape, dtype=dtype)
            s0 = _state(spec, P, x, T) if given else None
            ref = torch_exact.exact_forward(spec, x, s0, P, need)
            out = K.forward(spec, x, s0, P, need)
            for a, b in zip(ref[:2], out[:2]):
                assert torch.equal(a, b)
            assert all(torch.equal(a, b) for a, b in zip(ref[2], out[2]))
            gs = torch.randn_like(x)
            gT = tuple(torch.randn_like(s) for s in ref[2])
            for g_state in (gT, None):
                r = torch_exact.exact_backward(spec, gs, g_state, ref[1], s0, P, need)
                k = K.backward(spec, gs, g_state, ref[1], s0, P, need)
                assert close(k[0], r[0], dtype), worst(k[0], r[0], dtype)
                assert (k[1] is None) == (r[1] is None) and (r[1] is None or _close_all(k[1], r[1], dtype))
                assert set(k[2]) == set(r[2]) == set(need)

                def truth(gs=gs, g_state=g_state, kept=ref[1], s0=s0):
                    P64, (gs64, g64, kept64, s64) = _f64(spec, P, gs, g_state, kept, s0)
                    return torch_exact.exact_backward(spec, gs64, g64, kept64, s64, P64, need)[2]

                assert _params_close(k[2], r[2], dtype, truth)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c.id for c in KERNEL_CASES])
def test_reversible_kernels(case, dtype):
    """Even and odd channel counts (the unpaired channel through the exact kernels), one
    channel, no channel dim; carried state in and out; F's bits equal the PyTorch path's."""
    from revpass.nodes.kernels import reversible as K

    spec = spec_from_module(case.make())
    P = _params(spec, dtype)
    need = _need(spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for T, shape, given in ((6, (2, 6, 3), True), (6, (2, 5, 3), False), (1, (3, 7, 2, 3), True),
                                (5, (2, 1, 4), True), (4, (9,), False)):
            x = input_for(case, T, shape=shape, dtype=dtype)
            s0 = _state(spec, P, x, T) if given else None
            ref = torch_rev.reversible_forward(spec, x, s0, P, need)
            out = K.forward(spec, x, s0, P, need)
            assert torch.equal(ref[0], out[0]) and torch.equal(ref[2], out[2])
            if len(shape) > 1 and shape[1] > 1:
                assert torch.equal(ref[1], out[1])
            assert all(torch.equal(a, b) for a, b in zip(ref[3], out[3]))
            gy = torch.randn_like(x)
            gT = tuple(torch.randn_like(s) for s in ref[3])
            for g_state in (gT, None):
                r = torch_rev.reversible_backward(spec, gy, g_state, ref[0], ref[1], ref[2], s0, P, need)
                k = K.backward(spec, gy, g_state, ref[0], ref[1], ref[2], s0, P, need)
                assert close(k[0], r[0], dtype), worst(k[0], r[0], dtype)
                assert (k[1] is None) == (r[1] is None) and (r[1] is None or _close_all(k[1], r[1], dtype))

                def truth(gy=gy, g_state=g_state, y=ref[0], bits=ref[1], kept=ref[2], s0=s0):
                    P64, (gy64, g64, y64, kept64, s64) = _f64(spec, P, gy, g_state, y, kept, s0)
                    return torch_rev.reversible_backward(spec, gy64, g64, y64, bits, kept64, s64, P64, need)[2]

                assert set(k[2]) == set(r[2]) == set(need) and _params_close(k[2], r[2], dtype, truth)


AT_THRESHOLD_KERNEL = [c for c in AT_THRESHOLD if kernels.unsupported(spec_from_module(c.make())) is None]


@pytest.mark.parametrize("case", AT_THRESHOLD_KERNEL, ids=[c.id for c in AT_THRESHOLD_KERNEL])
def test_kernels_at_the_threshold(case):
    """Membranes exactly at the threshold (tests/catalogue.py, AT_THRESHOLD; the PyTorch path and
    the library are compared there in tests/neurons/test_threshold.py): the kernels compare as
    the frameworks do, >= for SpikingJelly (it fires) and > for snnTorch and norse (it does not),
    in the exact and the reversible forward, in the spikes G's rebuild recomputes in backward,
    and in the gradients."""
    from revpass.nodes.kernels import exact as KE
    from revpass.nodes.kernels import reversible as KR

    assert {c.framework for c in AT_THRESHOLD_KERNEL} == {"spikingjelly", "snntorch", "norse"}
    spec = spec_from_module(case.make())
    P = _params(spec, torch.float32)
    need = _need(spec)
    x = at_threshold_input(case, shape=(2, 2))
    s = torch.tensor(case.spikes).reshape(-1, 1, 1).expand_as(x).contiguous()
    assert bool((s[0] == (1.0 if case.framework == "spikingjelly" else 0.0)).all())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        xe = torch.cat([x, x[:, :, :1]], 2)
        ref = torch_exact.exact_forward(spec, xe, None, P, need)
        out = KE.forward(spec, xe, None, P, need)
        assert torch.equal(ref[0], torch.cat([s, s[:, :, :1]], 2))
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        gs = torch.randn(xe.shape, generator=gen)
        r = torch_exact.exact_backward(spec, gs, None, ref[1], None, P, need)
        k = KE.backward(spec, gs, None, ref[1], None, P, need)
        assert close(k[0], r[0]), worst(k[0], r[0])
        # reversible, channels [G | F | remainder]: G's part x - s makes G charge from x too
        xr = torch.cat([x - s, x, x[:, :, :1]], 2)
        ref = torch_rev.reversible_forward(spec, xr, None, P, need)
        out = KR.forward(spec, xr, None, P, need)
        assert torch.equal(ref[0], torch.cat([x, x + s, s[:, :, :1]], 2))
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])
        gy = torch.randn(xr.shape, generator=gen)
        r = torch_rev.reversible_backward(spec, gy, None, ref[0], ref[1], ref[2], None, P, need)
        k = KR.backward(spec, gy, None, ref[0], ref[1], ref[2], None, P, need)
        assert close(k[0], r[0]), worst(k[0], r[0])


def _node_grads(node, x, gy=None, calls=2):
    """Outputs and gradients (input, parameters) of ``calls`` calls carrying state."""
    node.reset()
    ys = [node(x[i]) for i in range(calls)]
    loss = sum((y * gy[i]).sum() if gy is not None else y.sum() for i, y in enumerate(ys))
    params = [p for p in node.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params])
    return [y.detach() for y in ys], grads


@pytest.mark.parametrize("cls", [revpass.ReversibleNode, revpass.ExactNode], ids=["reversible", "exact"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c.id for c in KERNEL_CASES])
def test_nodes_through_their_ops(case, cls, backend, monkeypatch):
    """The nodes' custom ops pick the kernels; two calls carry state (SpikingJelly), the second
    input is not contiguous, and y.sum().backward() sends a stride-0 gradient."""
    launches = Launches(monkeypatch)
    x = input_for(case, 2, shape=(5, 2, 5, 3)).transpose(-1, -2).contiguous().transpose(-1, -2)
    x = x.detach().requires_grad_(True)  # (calls, T, B, C, S), not contiguous
    assert not x[1].is_contiguous()
    res = {}
    for name in ("torch", "triton"):
        backend(name)
        node = cls.from_neuron(case.make(), carry_state=True)
        res[name] = _node_grads(node, x)
        if name == "torch":
            assert launches.names == []
    assert len(launches.names) >= 4  # forward and backward, twice
    for a, b in zip(res["torch"][0], res["triton"][0]):
        assert torch.equal(a, b)
    for a, b in zip(res["torch"][1], res["triton"][1]):
        assert close(b, a), worst(b, a)


@pytest.mark.parametrize("cls", [revpass.ReversibleNode, revpass.ExactNode], ids=["reversible", "exact"])
def test_batch_zero_and_one_step(cls, backend):
    from spikingjelly.activation_based import neuron

    backend("triton")
    node = cls.from_neuron(neuron.ParametricLIFNode(step_mode="m"), carry_state=False)
    for shape in ((3, 0, 4, 2), (1, 2, 4, 2)):
        x = torch.randn(shape, requires_grad=True)
        y = node(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
        backend("torch")
        x2 = x.detach().clone().requires_grad_(True)
        y2 = node(x2)
        y2.sum().backward()
        backend("triton")
        assert torch.equal(y.detach(), y2.detach()) and close(x.grad, x2.grad)


@pytest.mark.parametrize("cls", [revpass.ReversibleNode, revpass.ExactNode], ids=["reversible", "exact"])
def test_launches_do_not_grow_with_T(cls, backend, monkeypatch):
    """A node call launches a fixed number of kernels, whatever T (odd channels: the unpaired
    one's exact kernels too)."""
    from spikingjelly.activation_based import neuron

    backend("triton")
    counts = []
    for T in (2, 9):
        launches = Launches(monkeypatch)
        node = cls.from_neuron(neuron.ParametricLIFNode(step_mode="m"), carry_state=False)
        x = torch.randn(T, 2, 5, 3, requires_grad=True)
        node(x).sum().backward()
        counts.append(list(launches.names))
    assert counts[0] == counts[1]
    expected = ({"_rev_forward", "_exact_forward", "_rev_backward", "_exact_backward"}
                if cls is revpass.ReversibleNode else {"_exact_forward", "_exact_backward"})
    assert set(counts[0]) == expected and len(counts[0]) == len(expected)


@pytest.mark.parametrize("case", [c for c in KERNEL_CASES if c.learnable], ids=lambda c: c.id)
def test_parameter_gradients_repeat(case, backend):
    """Parameter gradients are sums over every element and step, reduced in a fixed order: the
    same bits run after run."""
    backend("triton")
    x = input_for(case, 6, shape=(2, 6, 3)).requires_grad_(True)
    out = []
    for _ in range(2):
        node = revpass.ReversibleNode.from_neuron(case.make(), carry_state=False)
        grads = torch.autograd.grad(node(x).sum(), [p for p in node.parameters() if p.requires_grad])
        out.append(grads)
    assert out[0] and all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.parametrize("case", OTHER_CASES, ids=[c.id for c in OTHER_CASES])
def test_other_neurons_run_the_pytorch_path(case, backend, monkeypatch):
    """A neuron the kernels do not cover runs the PyTorch path, with a warning under
    REVPASS_KERNELS=triton that names it and why."""
    backend("triton")
    launches = Launches(monkeypatch)
    node = revpass.ReversibleNode.from_neuron(case.make(), carry_state=False)
    x = input_for(case, 4, shape=(2, 6, 3)).requires_grad_(True)
    kernels._warned.clear()
    with pytest.warns(UserWarning, match="runs the PyTorch path"):
        node(x).sum().backward()
    assert launches.names == []


@pytest.mark.parametrize("node_kind", ["reversible", "exact"])
@pytest.mark.parametrize("kind", ["lif", "plif"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("small_gamma", [False, True], ids=["rebuilt", "input-kept"])
def test_folded_batch_norm(node_kind, kind, dtype, small_gamma, backend, monkeypatch):
    """The folded batch norm runs the kernels: outputs equal the PyTorch path's, gradients within
    tolerance (folded into an exact node: as accurate), two calls carrying state. Into a
    reversible node its first pass is the node's backward kernel, then one kernel for the input
    gradient; into an exact node (under a budget) it runs the exact node's kernels, forward and
    backward, then the batch norm's backward as one kernel launched twice (the sums, the input
    gradient)."""
    from nodes.test_batchnorm import _bn, _node, _run, assert_grads_close
    from nodes.test_batchnorm_exact import _exact, assert_as_accurate

    shape = (3, 2, 8, 4, 5)
    gen = torch.Generator().manual_seed(1)
    c = (torch.randn((2, *shape), generator=gen, dtype=dtype) * 2 + 0.3).requires_grad_(True)
    g = torch.randn((2, *shape), generator=gen, dtype=dtype)
    node, bn = (_node if node_kind == "reversible" else _exact)(kind, dtype), _bn(shape[2], dtype)
    if small_gamma:
        with torch.no_grad():
            bn.weight[3] = 1e-3  # below GAMMA_MIN: the batch norm keeps its input
    backend("torch")
    ys_t, gr_t, bn_t = _run(node, bn, c, g, fold=True)
    backend("triton")
    launches = Launches(monkeypatch)
    ys_k, gr_k, bn_k = _run(node, bn, c, g, fold=True)
    if node_kind == "reversible":
        assert launches.names.count("_input_grad") == 2 and launches.names.count("_rev_backward") == 2
    else:
        assert launches.names.count("_exact_forward") == 2 and launches.names.count("_exact_backward") == 2
        assert launches.names.count("_exact_bn") == 4
    assert all(torch.equal(a, b) for a, b in zip(ys_t, ys_k))
    assert torch.equal(bn_t.running_mean, bn_k.running_mean)
    (assert_grads_close if node_kind == "reversible" else assert_as_accurate)(gr_k, gr_t, node, bn, c, g, dtype)


@pytest.mark.parametrize("kind", list(EXACT_NEURONS))
def test_folded_exact_every_neuron(kind, backend, monkeypatch):
    """The exact node's folded batch norm in the kernels for each SpikingJelly neuron that
    rebuilds its input (hard and soft reset, a nonzero v_reset, decay_input or not, IF, PLIF):
    outputs equal the PyTorch path's, gradients as accurate as the unfolded node's, two calls
    carrying state; the batch norm's backward is the kernel's (two launches a call)."""
    from nodes.test_batchnorm import _bn, _run
    from nodes.test_batchnorm_exact import _exact, assert_as_accurate

    shape = (3, 2, 4, 3, 5)
    gen = torch.Generator().manual_seed(2)
    c = (torch.randn((2, *shape), generator=gen) * 2 + 0.3).requires_grad_(True)
    g = torch.randn((2, *shape), generator=gen)
    node, bn = _exact(kind), _bn(shape[2])
    backend("torch")
    ys_t, _, _ = _run(node, bn, c, g, fold=True)
    backend("triton")
    launches = Launches(monkeypatch)
    ys_k, gr_k, _ = _run(node, bn, c, g, fold=True)
    assert launches.names.count("_exact_bn") == 4 and launches.names.count("_exact_backward") == 2
    assert all(torch.equal(a, b) for a, b in zip(ys_t, ys_k))
    gr_u = _run(node, bn, c, g, fold=False)[1]
    assert_as_accurate(gr_k, gr_u, node, bn, c, g, torch.float32)


@pytest.mark.parametrize("residual", ["spikes", "float"])
def test_folded_exact_with_a_residual(residual, backend, monkeypatch):
    """bn(c) + r -> exact node in the kernels (a ResNet block's bn2 and its identity; spikes r
    kept as bits and read so by the kernel, a step of 630 elements, not a whole number of
    bytes): the forward equals the unfolded one's, every gradient (c, r, gamma, beta) close."""
    from nodes.test_batchnorm_exact import residual_case

    c, r, g, node, bn, fold, fbn = residual_case(residual)
    backend("torch")
    y_u = node(bn(c) + r)
    g_u = torch.autograd.grad((y_u * g).sum(), [c, r, bn.weight, bn.bias])
    backend("triton")
    launches = Launches(monkeypatch)
    y_f = fold(c, residual=r)
    g_f = torch.autograd.grad((y_f * g).sum(), [c, r, fbn.weight, fbn.bias])
    assert launches.names.count("_exact_bn") == 2
    assert torch.equal(y_u, y_f)
    for i, (a, b) in enumerate(zip(g_f, g_u)):
        assert close(a, b) or i >= 2 and float((a - b).abs().max()) < 1e-5 * float(b.abs().max()), (i, worst(a, b))


def test_zoo_model_converts_and_verifies(backend, monkeypatch):
    """spiking_resnet18 converted, reversible and exact, with the kernels: outputs equal the
    PyTorch path's, gradients within tolerance, and revpass.verify passes."""
    from models import sj_zoo

    torch.manual_seed(0)
    net = sj_zoo("spiking_resnet18")
    x = torch.randn(2, 1, 3, 16, 16)
    for mode in ("reversible", "exact"):
        out = _on_both_backends(backend, monkeypatch, x, lambda: revpass.convert(net, x, mode=mode))
        _assert_backends_agree(net, out, x)


def _on_both_backends(backend, monkeypatch, x, make):
    """{backend: (output, float64 input gradient, the converted model, the kernels its backward
    launched)} of ``make()`` (a conversion) under REVPASS_KERNELS=torch, then triton."""
    out = {}
    for name in ("torch", "triton"):
        backend(name)
        conv = make()
        y = conv(x)
        launches = Launches(monkeypatch)
        # gradients in float64: float32 rounding compounds through 17 batch norms
        conv64, x64 = conv.double(), x.double().requires_grad_(True)
        conv64(x64).sum().backward()
        out[name] = (y.detach(), x64.grad, conv.float(), list(launches.names))  # a later run counts on
    return out


def _assert_backends_agree(net, out, x):
    """Outputs equal, input gradients close, and revpass.verify passes with the kernels."""
    assert torch.equal(out["torch"][0], out["triton"][0])
    g_t, g_k = out["torch"][1], out["triton"][1]
    assert close(g_k, g_t, torch.float64), worst(g_k, g_t, torch.float64)
    report = revpass.verify(net, out["triton"][2], x)
    assert report.passed and len(report.checks) > 10, report


def test_zoo_model_under_a_budget_runs_the_exact_fold_kernel(backend, monkeypatch):
    """spiking_resnet18 under mode="exact" and a budget that exact nodes meet: its batch norms
    fold into the exact nodes (a block's second one with the identity's spikes added too), whose
    backward runs the fold's kernel, twice per folded site; outputs equal the PyTorch path's, the
    input gradient (float64) close, and revpass.verify passes."""
    from models import sj_zoo

    torch.manual_seed(0)
    net = sj_zoo("spiking_resnet18")
    x = torch.randn(2, 1, 3, 16, 16)
    backend("torch")
    budget = revpass.Peak(revpass.convert(net, x, mode="exact").revpass_peak_before - 1)  # the original misses it
    out = _on_both_backends(backend, monkeypatch, x, lambda: revpass.convert(net, x, mode="exact", budget=budget))
    for name, (_, _, conv, launched) in out.items():
        folds = sum("folds batch norm" in r.reason for r in conv.revpass_report.rows)
        assert folds == 14 and conv.revpass_report.count("exact") == 17  # a downsample adds floats: not folded
        assert launched.count("_exact_bn") == (2 * folds if name == "triton" else 0)
    _assert_backends_agree(net, out, x)


def test_environment_choice(monkeypatch):
    """REVPASS_KERNELS=torch turns the kernels off; auto keeps CPU tensors on PyTorch."""
    spec = spec_from_module(CASES[0].make())
    x = torch.zeros(2, 2, 4)
    for name, want in (("torch", "torch"), ("auto", "torch"), ("triton", "triton")):
        monkeypatch.setenv("REVPASS_KERNELS", name)
        assert kernels.choose(x, spec, {}) == want
    monkeypatch.setenv("REVPASS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="REVPASS_KERNELS"):
        kernels.choose(x, spec, {})
    assert os.environ.get("TRITON_INTERPRET") == "1"


def test_torch_compile_runs_the_kernels(backend, monkeypatch):
    """torch.compile of a converted model keeps the custom ops opaque: they run the kernels, and
    outputs and gradients are eager's."""
    from spikingjelly.activation_based import layer, neuron

    backend("triton")
    torch.manual_seed(0)
    net = torch.nn.Sequential(layer.Linear(6, 6, step_mode="m"), neuron.ParametricLIFNode(step_mode="m"),
                              layer.Linear(6, 5, step_mode="m"), neuron.LIFNode(step_mode="m"))
    x = torch.randn(4, 2, 6)
    conv = revpass.convert(net, x)

    def run(m):
        from revpass.state import reset_states

        reset_states(m)
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        return [y.detach(), *torch.autograd.grad(y.sum(), [xx, *conv.parameters()])]

    eager = run(conv)
    launches = Launches(monkeypatch)
    compiled = run(torch.compile(conv))
    assert "_rev_forward" in launches.names and "_rev_backward" in launches.names
    assert torch.equal(eager[0], compiled[0])
    for a, b in zip(compiled[1:], eager[1:]):
        assert close(a, b), worst(a, b)


def test_node_benchmark_runs_the_kernels(tmp_path):
    """tools/bench_nodes.py puts the kernels beside the PyTorch path: here, under the interpreter,
    as a check that they run and agree (their times measure numpy)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "tools" / "bench_nodes.py"), "--quick", "--only",
                           "LIFNode(v_reset=None)", "--out", str(tmp_path)], cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "bench_nodes.json").read_text())
    (r,) = data["results"]
    assert data["kernels"] == "triton and torch"
    assert {"reversible_triton", "exact_triton"} <= set(r["time_s"]["fwd_bwd"])
    assert r["checks"]["triton_forward_identical"] and r["checks"]["exact_triton_spikes_equal_library"]
    assert r["checks"]["grads_triton_vs_autograd"]["section7"] <= 1
    assert "## The Triton kernels" in (tmp_path / "bench_nodes.md").read_text()


@pytest.mark.parametrize("kind", sorted(__import__("revpass.neurons.surrogate", fromlist=["BUILTIN"]).BUILTIN))
def test_every_builtin_surrogate_in_the_kernels(kind):
    """Each built-in surrogate's derivative inside the kernels agrees with its PyTorch formula
    (tests/neurons/test_families.py checks that against the framework's own), in the exact and
    the reversible node's backward, float32 and float64."""
    from revpass.neurons import lif_spec
    from revpass.neurons.surrogate import builtin
    from revpass.nodes.kernels import exact as KE
    from revpass.nodes.kernels import reversible as KR

    spec = lif_spec(tau=2.0, surrogate=builtin(kind, 2.0, kind.startswith("spikingjelly")))
    gen = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        x = (torch.randn(6, 2, 6, 5, generator=gen, dtype=torch.float64) + 0.6).to(dtype)
        g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
        with torch.no_grad():
            y, kept, _ = torch_exact.exact_forward(spec, x, None, {}, ())
            r = torch_exact.exact_backward(spec, g, None, kept, None, {}, ())
            k = KE.backward(spec, g, None, kept, None, {}, ())
            assert close(k[0], r[0], dtype), (dtype, worst(k[0], r[0], dtype))
            y, bits, kept, _ = torch_rev.reversible_forward(spec, x, None, {}, ())
            r = torch_rev.reversible_backward(spec, g, None, y, bits, kept, None, {}, ())
            k = KR.backward(spec, g, None, y, bits, kept, None, {}, ())
            assert close(k[0], r[0], dtype), (dtype, worst(k[0], r[0], dtype))


@pytest.mark.parametrize("case_id", ["snn-leaky-learn-nodelay", "snn-synaptic-learn"])
def test_recurrences_scratch_is_bounded(case_id, monkeypatch):
    """snnTorch neurons whose backward records their recurrences (no reset_delay, a learnable
    alpha) run it over groups of pairs (revpass.nodes.kernels.reversible.SCRATCH_PARTS), so that
    the record holds a fraction of them: launches then depend on the size, not on T, and the
    gradients are the PyTorch path's."""
    from revpass.nodes.kernels import common
    from revpass.nodes.kernels import reversible as K

    case = next(c for c in CASES if c.id == case_id)
    spec = spec_from_module(case.make())
    P = _params(spec, torch.float32)
    need = _need(spec)
    monkeypatch.setattr(common, "BLOCK_INTERPRETER", 64)
    torch.manual_seed(0)
    with torch.no_grad():
        x = input_for(case, 3, shape=(4, 6, 50))  # 600 pairs: 10 blocks, in groups of 2
        y, bits, kept, _ = torch_rev.reversible_forward(spec, x, None, P, need)
        gy = torch.randn_like(x)
        r = torch_rev.reversible_backward(spec, gy, None, y, bits, kept, None, P, need)
        launches = Launches(monkeypatch)
        k = K.backward(spec, gy, None, y, bits, kept, None, P, need)
    assert launches.names == ["_rev_backward"] * 5
    assert close(k[0], r[0]), worst(k[0], r[0])
    assert all(close(k[2][n], r[2][n]) for n in need)
