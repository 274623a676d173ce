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
    """docs/method.md section 7: |a - b| <= atol + rtol * |b| elementwise."""
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


# ----------------------------------------------------------------------------------------------
# Inputs exactly at the threshold. SpikingJelly fires where H - v_threshold >= 0, snnTorch and
# norse where mem - threshold > 0: a membrane that lands exactly on the threshold spikes in the
# first and not in the others. Every input below is a number whose arithmetic is exact (halves,
# quarters and eighths; for norse, its float32 dt * tau_mem_inv = 0.1 times 10, which rounds to
# 1.0 in float32 only), so that the pre-spike membrane is the threshold itself, not a rounding away
# from it: tests/neurons/test_threshold.py checks that on the library's own membrane.
# ----------------------------------------------------------------------------------------------


@dataclass
class AtThreshold:
    id: str
    make: Callable[[], nn.Module]  # a fresh library neuron
    framework: str
    steps: tuple  # the input at each step, the same for every element
    spikes: tuple  # the library's spikes at each step (step 0 is exactly at the threshold)
    at: tuple  # the steps whose pre-spike membrane is exactly the threshold


# SpikingJelly: H = v + (x - (v - v_reset)) / tau from v = v_reset; every step lands on the
# threshold again after the reset, and fires
# snnTorch Leaky (beta 0.5, threshold 1): mem = 1.0 at step 0, 0.5 * 1.0 + 0.5 = 1.0 at step 1 (no
# spike, no reset), 0.5 + 0.625 at step 2 (fires); Synaptic (alpha = beta = 0.5): syn 1, 0.5, 0.625
# norse (dt 1e-3, tau_mem_inv 100, v_th 1): v = 0.1 * 10 = 1.0 at step 0 (no spike), then above it
AT_THRESHOLD = [
    AtThreshold("sj-if", _sj("IFNode"), "spikingjelly", (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0, 1, 2)),
    AtThreshold("sj-if-soft", _sj("IFNode", v_reset=None), "spikingjelly", (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0, 1, 2)),
    AtThreshold("sj-lif", _sj("LIFNode"), "spikingjelly", (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), (0, 1, 2)),
    AtThreshold("sj-lif-soft-detach", _sj("LIFNode", v_reset=None, detach_reset=True), "spikingjelly",
                (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), (0, 1, 2)),
    AtThreshold("sj-lif-nodecay", _sj("LIFNode", decay_input=False), "spikingjelly", (1.0, 1.0, 1.0),
                (1.0, 1.0, 1.0), (0, 1, 2)),
    AtThreshold("sj-lif-thr-reset", _sj("LIFNode", v_threshold=0.5, v_reset=-0.25, tau=4.0), "spikingjelly",
                (3.0, 3.0, 3.0), (1.0, 1.0, 1.0), (0, 1, 2)),
    AtThreshold("sj-plif", _sj("ParametricLIFNode"), "spikingjelly", (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), (0, 1, 2)),
    AtThreshold("snn-leaky", _snn("Leaky", beta=0.5), "snntorch", (1.0, 0.5, 0.625), (0.0, 0.0, 1.0), (0, 1)),
    AtThreshold("snn-leaky-zero", _snn("Leaky", beta=0.5, reset_mechanism="zero"), "snntorch", (1.0, 0.5, 0.625),
                (0.0, 0.0, 1.0), (0, 1)),
    AtThreshold("snn-leaky-nodelay", _snn("Leaky", beta=0.5, reset_delay=False), "snntorch", (1.0, 0.5, 0.625),
                (0.0, 0.0, 1.0), (0, 1)),
    AtThreshold("snn-leaky-learn", _snn("Leaky", beta=0.5, learn_beta=True, learn_threshold=True), "snntorch",
                (1.0, 0.5, 0.625), (0.0, 0.0, 1.0), (0, 1)),
    AtThreshold("snn-synaptic", _snn("Synaptic", alpha=0.5, beta=0.5), "snntorch", (1.0, 0.0, 0.375),
                (0.0, 0.0, 1.0), (0, 1)),
    AtThreshold("norse-lif", _norse("LIF"), "norse", (10.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0,)),
    AtThreshold("norse-lifcell", _norse("LIFCell"), "norse", (10.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0,)),
    AtThreshold("norse-lifbox", _norse("LIFBoxCell"), "norse", (10.0, 12.0, 0.0), (0.0, 1.0, 0.0), (0,)),
    AtThreshold("norse-lifbox-subtract", _norse("LIFBoxCell", subtract=True), "norse", (10.0, 12.0, 0.0),
                (0.0, 1.0, 0.0), (0,)),
]


def at_threshold_input(case: AtThreshold, shape=(2, 5), dtype=torch.float32) -> torch.Tensor:
    """(T, *shape): every element driven by ``case.steps``."""
    steps = torch.tensor(case.steps, dtype=dtype)
    return steps.reshape((-1,) + (1,) * len(shape)).expand((len(case.steps),) + tuple(shape)).contiguous()


def threshold_of(m: nn.Module) -> float:
    """The library neuron's own threshold."""
    if hasattr(m, "v_threshold"):
        return float(m.v_threshold)
    if hasattr(m, "p"):
        return float(m.p.v_th)
    return float(m.threshold.detach())


def library_membranes(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The membrane each step of the library neuron compares with its threshold, (T, ...), in
    the library's own run with its threshold out of reach (nothing fires, nothing resets): the
    real run's membranes up to its first spike."""
    import copy

    m = copy.deepcopy(m)
    far = 1e30
    out = []
    if hasattr(m, "v_threshold"):  # SpikingJelly: v after a step without a spike is H
        m.v_threshold = far
        m.step_mode = "s"
        m.reset()
        for xt in x:
            m(xt)
            out.append(m.v.detach().clone())
    elif hasattr(m, "p"):  # norse: the state's v after a step without a spike is v_decayed
        m.p = m.p._replace(v_th=torch.as_tensor(far))
        state = None
        for xt in x:
            if type(m).__name__ == "LIF":
                _, state = m(xt.unsqueeze(0), state)
            else:
                _, state = m(xt, state)
            out.append(state.v.detach().clone())
    else:  # snnTorch: the membrane it returns (no spike: no reset at any step)
        with torch.no_grad():
            m.threshold.fill_(far)
        zeros = torch.zeros_like(x[0])
        state = (zeros, zeros) if type(m).__name__ == "Synaptic" else (zeros,)
        for xt in x:
            _, *state = m(xt, *state)
            out.append(state[-1].detach().clone())
    return torch.stack(out)
