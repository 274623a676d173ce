"""snnTorch 1.0.0 adapter: Leaky and Synaptic -> NeuronSpec; ``init_leaky()`` & co. traced as
"start from the reset state", ``reset_mem``, and ``init_hidden`` (docs/frameworks/snntorch.md).

Imported only when a model contains an snnTorch module.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

import snntorch as snn  # noqa: E402
from snntorch import surrogate as snn_surrogate  # noqa: E402

from revpass.errors import UnsupportedNeuronError
from revpass.neurons.adapter import Adapter, Patch
from revpass.neurons.spec import NeuronSpec
from revpass.neurons.surrogate import Surrogate, builtin, check_derivative, derivative_from_function

SUPPORTED = (snn.Leaky, snn.Synaptic)


def is_neuron(m: nn.Module) -> bool:
    # LeakyParallel (an nn.RNN over the whole sequence) is a neuron that is not a SpikingNeuron
    return isinstance(m, (snn.SpikingNeuron, *_PARALLEL))


_PARALLEL = tuple(c for c in (getattr(snn, "LeakyParallel", None),) if c is not None)


is_leaf = is_neuron


#: snnTorch's surrogate factories that revpass knows in closed form, and the argument each keeps
_BUILTIN = {"atan": "alpha", "fast_sigmoid": "slope", "sigmoid": "slope", "triangular": "threshold"}


def _closure_value(fn, name):
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ is None:
        return None
    for var, cell in zip(code.co_freevars, fn.__closure__):
        if var == name:
            return cell.cell_contents
    return None


def surrogate_of(m: nn.Module, where: str) -> Surrogate:
    fn = m.spike_grad
    if getattr(m, "surrogate_disable", False):
        raise UnsupportedNeuronError(
            f"{where}: surrogate_disable=True has no spike gradient. Set surrogate_disable=False "
            "or exclude this module from conversion."
        )
    probe = torch.tensor([-1.0, -1e-3, 0.0, 1e-3, 1.0])
    fired = fn(probe)
    if not torch.equal(fired.float(), (probe > 0).float()):
        raise UnsupportedNeuronError(
            f"{where}: spike_grad's forward is not the Heaviside step 1[x > 0]; revpass needs a "
            "deterministic Heaviside spike. Use an snntorch.surrogate function, or exclude this module."
        )
    qual = getattr(fn, "__qualname__", "")
    factory = qual.split(".")[0]
    if getattr(fn, "__module__", "") == snn_surrogate.__name__ and qual == f"{factory}.<locals>.inner" \
            and factory in _BUILTIN:
        arg = _closure_value(fn, _BUILTIN[factory])
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            # snntorch.surrogate's backward with a unit gradient, built in
            return builtin(f"snntorch.{factory}", float(arg), False)
    deriv = derivative_from_function(_picklable(fn))
    check_derivative(deriv, where, f"spike_grad={qual or fn!r}")
    return Surrogate(f"{qual.split('.')[0] or 'spike_grad'} (own derivative)", deriv, False)


class _Rebuilt:
    """An snnTorch surrogate closure (``fast_sigmoid(slope=25)`` returns ``inner``), held as its
    factory's name and arguments so that it pickles; rebuilt on first use after loading."""

    def __init__(self, factory: str, kwargs: dict, fn=None):
        self.factory, self.kwargs, self._fn = factory, kwargs, fn

    def __call__(self, x):
        if self._fn is None:
            self._fn = getattr(snn_surrogate, self.factory)(**self.kwargs)
        return self._fn(x)

    def __getstate__(self):
        return {"factory": self.factory, "kwargs": self.kwargs, "_fn": None}


def _picklable(fn):
    """``fn``, or, for a closure made by one of snnTorch's surrogate factories whose captured
    values are its arguments, a :class:`_Rebuilt` of it."""
    qual = getattr(fn, "__qualname__", "")
    factory = qual.split(".")[0]
    if (getattr(fn, "__module__", "") != snn_surrogate.__name__ or not qual.endswith("<locals>.inner")
            or not callable(getattr(snn_surrogate, factory, None)) or fn.__closure__ is None):
        return fn
    params = inspect.signature(getattr(snn_surrogate, factory)).parameters
    names = fn.__code__.co_freevars
    kwargs = {n: c.cell_contents for n, c in zip(names, fn.__closure__) if n in params}
    if set(kwargs) != set(names):
        return fn
    return _Rebuilt(factory, kwargs, fn)


def to_spec(m: nn.Module, where: str = "") -> NeuronSpec:
    where = where or type(m).__name__
    if type(m) not in SUPPORTED:
        raise UnsupportedNeuronError(
            f"{where}: snnTorch {type(m).__name__} is not supported; revpass converts Leaky and "
            "Synaptic (recurrent neurons such as RLeaky feed themselves and are left as they are)."
        )
    for flag in ("inhibition", "state_quant"):
        if getattr(m, flag, False):
            raise UnsupportedNeuronError(
                f"{where}: {flag}={getattr(m, flag)!r} is not supported; set it to False or "
                "exclude this module from conversion."
            )
    syn = isinstance(m, snn.Synaptic)
    params = {"beta": m.beta, "threshold": m.threshold, "graded": m.graded_spikes_factor}
    attr = {"beta": "beta", "threshold": "threshold", "graded": "graded_spikes_factor"}
    if syn:
        params["alpha"] = m.alpha
        attr["alpha"] = "alpha"
    return NeuronSpec(
        family="snntorch",
        consts=dict(
            kind="synaptic" if syn else "leaky",
            reset=m.reset_mechanism,
            reset_delay=bool(m.reset_delay),
        ),
        params=params,
        surrogate=surrogate_of(m, where),
        origin=f"snntorch.{type(m).__name__}",
        attr_names=attr,
    )


def run_library(m: nn.Module, x_seq: torch.Tensor) -> torch.Tensor:
    """The neuron itself over a (T, ...) sequence, from its reset state (explicit state)."""
    mem = torch.zeros_like(x_seq[0])
    syn = torch.zeros_like(x_seq[0])
    out = []
    for x in x_seq:
        if isinstance(m, snn.Synaptic):
            s, syn, mem = m(x, syn, mem)
        else:
            s, mem = m(x, mem)
        out.append(s)
    return torch.stack(out)


class SnnTorchAdapter(Adapter):
    package = "snntorch"
    # the module's functions above are the protocol's methods of the same names
    is_neuron = staticmethod(is_neuron)
    to_spec = staticmethod(to_spec)
    run_library = staticmethod(run_library)

    def reset(self, m: nn.Module) -> None:
        fn = getattr(m, "reset_mem", None)  # not every SpikingNeuron has one (StateLeaky, LinearLeaky)
        if callable(fn):
            fn()

    def trace_patches(self, patch: Patch, make_node: Callable[..., Any]) -> None:
        # init_leaky() & co. inside forward would become reads of the module's current state:
        # they return fresh empty tensors made in the graph ("start from the reset state")
        def fresh_like(original):
            def fresh(self, *args, **kwargs):
                out = original(self, *args, **kwargs)  # None where the reset state is None
                if isinstance(out, tuple):
                    return tuple(None if o is None else make_node("fresh_state") for o in out)
                return None if out is None else make_node("fresh_state")

            return fresh

        for cls in {c for c in vars(snn).values() if isinstance(c, type) and issubclass(c, snn.SpikingNeuron)}:
            for name, fn in list(vars(cls).items()):
                if (name.startswith("init_") or name == "reset_mem") and callable(fn):
                    patch(cls, name, fresh_like(fn))

    def site_rule(self, m: nn.Module, n_calls: int) -> Tuple[Optional[str], str]:
        if not getattr(m, "init_hidden", False):
            return None, ""
        if n_calls == 1:
            return (
                "snnTorch init_hidden=True called once per forward: its state lives between calls "
                "and snntorch.utils.reset cannot reach a revpass node; put the time loop inside a "
                "module (for step in range(num_steps): net(x)) so that convert rolls it"
            ), ""
        return None, " (starting each forward from the reset state, as after snntorch.utils.reset)"

    #: the constants of snnTorch's neurons, buffers unless learned (mem and syn are the state)
    _NEURON_TENSORS = ("beta", "alpha", "threshold", "graded_spikes_factor")

    def neuron_tensors(self, m: nn.Module) -> Dict[str, torch.Tensor]:
        """Its parameters, and beta, alpha, threshold and graded_spikes_factor where they are
        buffers (not learned): a per-channel beta is sliced per half like a learned one. (The
        default :meth:`on_channels` then fits snnTorch: a copy called without ``mem``/``syn``
        keeps them itself from call to call, and returns ``(spk, mem)``, ``(spk, syn, mem)`` or,
        with ``init_hidden``, ``spk``, as the original's calls do.)"""
        out = dict(m.named_parameters())
        for name, buf in m.named_buffers(recurse=False):
            if name in self._NEURON_TENSORS:
                out[name] = buf
        return out


ADAPTER = SnnTorchAdapter()
