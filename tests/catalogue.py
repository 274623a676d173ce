"""Every neuron family and configuration the nodes are tested on, with a runner for the library
neuron itself (the reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class Case:
    id: str
    make: Callable[[], nn.Module]  # a fresh library neuron
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # library forward over (T, ...)
    framework: str
    learnable: bool = False


def _run(m, x):
    from revpass.neurons import run_library

    return run_library(m, x)


def _sj(name, **kw):
    def make():
        from spikingjelly.activation_based import neuron, surrogate

        kw2 = dict(kw)
        if "surrogate_function" in kw2:
            kw2["surrogate_function"] = getattr(surrogate, kw2["surrogate_function"])()
        return getattr(neuron, name)(step_mode="m", **kw2)

    return make


def _snn(name, **kw):
    def make():
        import snntorch as snn

        kw2 = dict(kw)
        if "spike_grad" in kw2:
            kw2["spike_grad"] = getattr(snn.surrogate, kw2["spike_grad"])()
        if "beta" in kw2 and isinstance(kw2["beta"], list):
            kw2["beta"] = torch.tensor(kw2["beta"]).reshape(-1, 1)
        return getattr(snn, name)(**kw2)

    return make


def _norse(name, **kw):
    def make():
        import norse.torch as norse
        from norse.torch.functional.reset import reset_subtract

        if name == "LIFBoxCell":
            p = norse.LIFBoxParameters(**{k: v for k, v in kw.items() if k != "subtract"})
            if kw.get("subtract"):
                p = p._replace(reset_method=reset_subtract)
            return norse.LIFBoxCell(p)
        return getattr(norse, name)(norse.LIFParameters(**kw))

    return make


CASES = [
    Case("sj-lif", _sj("LIFNode"), _run, "spikingjelly"),
    Case("sj-lif-soft", _sj("LIFNode", v_reset=None), _run, "spikingjelly"),
    Case("sj-lif-detach", _sj("LIFNode", detach_reset=True), _run, "spikingjelly"),
    Case("sj-lif-nodecay-atan", _sj("LIFNode", decay_input=False, tau=3.0, surrogate_function="ATan"), _run, "spikingjelly"),
    Case("sj-lif-thr-reset", _sj("LIFNode", v_threshold=0.5, v_reset=-0.25, tau=4.0), _run, "spikingjelly"),
    Case("sj-lif-own-surrogate", _sj("LIFNode", surrogate_function="PiecewiseLeakyReLU"), _run, "spikingjelly"),
    Case("sj-if", _sj("IFNode"), _run, "spikingjelly"),
    Case("sj-if-soft-detach", _sj("IFNode", v_reset=None, detach_reset=True), _run, "spikingjelly"),
    Case("sj-plif", _sj("ParametricLIFNode"), _run, "spikingjelly", True),
    Case("sj-plif-nodecay-soft", _sj("ParametricLIFNode", decay_input=False, v_reset=None, init_tau=3.0), _run, "spikingjelly", True),
    Case("snn-leaky", _snn("Leaky", beta=0.9), _run, "snntorch"),
    Case("snn-leaky-zero", _snn("Leaky", beta=0.8, reset_mechanism="zero"), _run, "snntorch"),
    Case("snn-leaky-none", _snn("Leaky", beta=0.7, reset_mechanism="none"), _run, "snntorch"),
    Case("snn-leaky-nodelay", _snn("Leaky", beta=0.9, reset_delay=False), _run, "snntorch"),
    Case("snn-leaky-zero-nodelay", _snn("Leaky", beta=0.9, reset_mechanism="zero", reset_delay=False), _run, "snntorch"),
    Case("snn-leaky-learn", _snn("Leaky", beta=0.85, learn_beta=True, learn_threshold=True), _run, "snntorch", True),
    Case("snn-leaky-learn-nodelay", _snn("Leaky", beta=0.85, learn_beta=True, learn_threshold=True, reset_delay=False), _run, "snntorch", True),
    Case("snn-leaky-channel-beta", _snn("Leaky", beta=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95], learn_beta=True), _run, "snntorch", True),
    Case("snn-leaky-graded", _snn("Leaky", beta=0.9, graded_spikes_factor=0.5), _run, "snntorch"),
    Case("snn-leaky-fastsig", _snn("Leaky", beta=0.9, spike_grad="fast_sigmoid"), _run, "snntorch"),
    Case("snn-synaptic", _snn("Synaptic", alpha=0.8, beta=0.9), _run, "snntorch"),
    Case("snn-synaptic-zero", _snn("Synaptic", alpha=0.7, beta=0.9, reset_mechanism="zero"), _run, "snntorch"),
    Case("snn-synaptic-learn", _snn("Synaptic", alpha=0.8, beta=0.9, learn_alpha=True, learn_beta=True, learn_threshold=True), _run, "snntorch", True),
    Case("snn-synaptic-nodelay", _snn("Synaptic", alpha=0.8, beta=0.9, reset_delay=False), _run, "snntorch"),
    Case("norse-lif", _norse("LIF"), _run, "norse"),
    Case("norse-lifcell", _norse("LIFCell", v_th=torch.as_tensor(0.3)), _run, "norse"),
    Case("norse-lifcell-tanh", _norse("LIFCell", method="tanh", alpha=torch.as_tensor(5.0)), _run, "norse"),
    Case("norse-lifbox", _norse("LIFBoxCell"), _run, "norse"),
    Case("norse-lifbox-subtract", _norse("LIFBoxCell", subtract=True), _run, "norse"),
]

CASE_IDS = [c.id for c in CASES]


def input_for(case: Case, T: int, shape=(2, 6, 3), dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """An input that makes every family spike a realistic fraction of the time."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((T,) + tuple(shape), generator=g, dtype=torch.float64)
    if case.framework == "norse":
        x = x * 8.0 + 6.0  # norse integrates with dt * tau_inv = 0.1 per step
    else:
        x = x * 1.0 + 0.6
    return x.to(dtype)


def close(a: torch.Tensor, b: torch.Tensor, dtype=torch.float32) -> bool:
    """METHOD.md section 7: |a - b| <= atol + rtol * |b| elementwise."""
    atol, rtol = (1e-6, 1e-5) if dtype == torch.float32 else (1e-12, 1e-10)
    return bool(((a - b).abs() <= atol + rtol * b.abs()).all())


def worst(a: torch.Tensor, b: torch.Tensor, dtype=torch.float32) -> float:
    """The largest ratio |a - b| / (atol + rtol |b|) (<= 1 passes)."""
    atol, rtol = (1e-6, 1e-5) if dtype == torch.float32 else (1e-12, 1e-10)
    return float(((a - b).abs() / (atol + rtol * b.abs())).max()) if a.numel() else 0.0


def reduction_close(a: torch.Tensor, b: torch.Tensor, truth, dtype=torch.float32) -> bool:
    """A parameter's gradient is a sum over every element and step, and in float32 the
    reference's own summation error can exceed section 7's tolerance where the terms cancel
    (docs/method.md, 'Accuracy of reconstruction'). It passes when it is within the tolerance
    of the reference b, or, failing that, no farther from the float64 value than b is (or within
    the tolerance of it). ``truth`` is a callable giving the float64 gradient, called only then."""
    if close(a, b, dtype):
        return True
    t = truth().to(torch.float64)
    err, ref_err = (a.double() - t).abs(), (b.double() - t).abs()
    atol, rtol = (1e-6, 1e-5) if dtype == torch.float32 else (1e-12, 1e-10)
    return bool(((err <= ref_err) | (err <= atol + rtol * t.abs())).all())


def within_reconstruction_bound(a: torch.Tensor, b: torch.Tensor) -> bool:
    """docs/method.md, 'Accuracy of reconstruction': in float32, beyond T = 16, the reversible
    node's gradients carry the reconstruction of X2 = Y2 - S^G (one rounding per G spike,
    contracted by the leak). Bound held for T <= 1024: normwise relative error <= 1e-5, and
    elementwise |a - b| <= 1e-4 + 1e-3 |b| (100x the section 7 tolerance)."""
    if a.numel() == 0:
        return True
    normwise = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return normwise <= 1e-5 and bool(((a - b).abs() <= 1e-4 + 1e-3 * b.abs()).all())
