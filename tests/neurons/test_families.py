"""The spec of every family reproduces the library neuron: forward bit for bit over T=16, and its
analytic sequence VJP matches the library's autograd gradients within docs/method.md section 7."""

import pytest
import torch

from catalogue import CASES, close, input_for, worst
from revpass.neurons import family_of, run_sequence, spec_from_module

T = 16


def _dtypes(case):
    # snnTorch computes spikes in float32 whatever the input dtype, so its float64 gradients
    # carry float32 rounding: compare against it in float32 only
    return [torch.float32] if case.framework == "snntorch" else [torch.float32, torch.float64]


PAIRS = [(c, d) for c in CASES for d in _dtypes(c)]


@pytest.mark.parametrize("case,dtype", PAIRS, ids=[f"{c.id}-{str(d)[6:]}" for c, d in PAIRS])
def test_spec_step_reproduces_library(case, dtype):
    lib = case.make().to(dtype)
    spec = spec_from_module(lib)
    x = input_for(case, T, dtype=dtype).requires_grad_(True)
    y_lib = case.run(lib, x)
    P = dict(spec.params)
    with torch.no_grad():
        s, _, recs, _ = run_sequence(spec, x.detach(), None, P, record=True)
    # forward: bit for bit (snnTorch returns float32 spikes for any input dtype)
    assert torch.equal(s, y_lib.detach().to(s.dtype)), "forward differs from the library"
    assert 0.02 < float((s != 0).float().mean()) < 0.98, "test input does not exercise spiking"
    # backward: the family's analytic VJP against the library under autograd
    g = torch.randn(y_lib.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    learn = [k for k, v in P.items() if isinstance(v, torch.nn.Parameter) and v.requires_grad]
    refs = torch.autograd.grad(y_lib, [x] + [P[k] for k in learn], g.to(y_lib.dtype))
    fam = family_of(spec)
    Pp = fam.prepare(spec, {k: v.detach() for k, v in P.items()})
    gx, _, gP = fam.vjp(spec, recs, g, None, Pp, learn)
    assert close(gx, refs[0].to(dtype), dtype), f"input grad: worst {worst(gx, refs[0].to(dtype), dtype):.3g}"
    for k, ref in zip(learn, refs[1:]):
        assert close(gP[k].reshape(ref.shape), ref.to(dtype), dtype), f"grad of {k}"


def _framework_spike_fn(kind: str, alpha: float):
    """The framework's own spike function for a built-in surrogate kind."""
    framework, name = kind.split(".")
    if framework == "spikingjelly":
        from spikingjelly.activation_based import surrogate

        return getattr(surrogate, name)(alpha=alpha)
    if framework == "snntorch":
        from snntorch import surrogate

        arg = {"atan": "alpha", "fast_sigmoid": "slope", "sigmoid": "slope", "triangular": "threshold"}[name]
        return getattr(surrogate, name)(**{arg: alpha})
    from norse.torch.functional.threshold import threshold

    return lambda x: threshold(x, "super", alpha)


@pytest.mark.parametrize("kind", sorted(__import__("revpass.neurons.surrogate", fromlist=["BUILTIN"]).BUILTIN))
def test_builtin_surrogates_are_the_frameworks_formulas(kind):
    """Each built-in surrogate (its closed form, the formula the kernels compute too) equals the
    derivative the framework's own spike function gives under autograd; and the adapters read the
    framework's objects into that built-in."""
    from revpass.neurons.surrogate import builtin, derivative_from_function

    alpha = {"spikingjelly.SoftSign": 2.0, "snntorch.triangular": 1.0}.get(kind, 3.0)
    sg = builtin(kind, alpha, kind.startswith("spikingjelly"))
    x = torch.linspace(-1.5, 1.5, 301, dtype=torch.float64)
    x = x[x != 0]  # the kink of the piecewise surrogates
    ref = derivative_from_function(_framework_spike_fn(kind, alpha))(x)
    assert close(sg.deriv(x), ref, torch.float64), worst(sg.deriv(x), ref, torch.float64)
    assert close(sg.deriv_(x.clone()), ref, torch.float64)
    assert sg.kernel_id is not None and sg.key == (kind, alpha)
    framework, name = kind.split(".")
    if framework == "spikingjelly":
        from spikingjelly.activation_based import neuron

        from revpass.neurons import spec_from_module

        spec = spec_from_module(neuron.LIFNode(surrogate_function=_framework_spike_fn(kind, alpha)))
        assert spec.surrogate.key == (kind, alpha)
    elif framework == "snntorch":
        import snntorch as snn

        from revpass.neurons import spec_from_module

        spec = spec_from_module(snn.Leaky(beta=0.9, spike_grad=_framework_spike_fn(kind, alpha)))
        assert spec.surrogate.key == (kind, alpha)
