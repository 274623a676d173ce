"""What a neuron is, to revpass: one spec type, and one family (step + analytic VJP) per framework.

A :class:`NeuronSpec` is a plain description of a library neuron: which family's equations it
follows, its constants (tau, reset kind, ...), the tensors its step reads (learnable or not), and
its surrogate. A :class:`Family` owns the equations:

* ``step``: one time step, written with the same floating-point operations in the same order as
  the framework, so that the forward is bit-identical;
* ``vjp``: the gradient of a whole sequence, computed directly (docs/method.md section 5): per-step
  factors are evaluated once over all T in vectorized form, then one reverse-time sweep.

The nodes (revpass.nodes) are written against this interface only.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from revpass.errors import RevpassError
from revpass.neurons import surrogate as _surrogates
from revpass.neurons.surrogate import Surrogate

Tensor = torch.Tensor
State = Tuple[Tensor, ...]
Params = Dict[str, Tensor]


@dataclass
class NeuronSpec:
    """A library neuron, read into revpass's terms.

    Attributes:
        family: key of the :class:`Family` that implements its equations.
        consts: Python constants of the equations (floats, bools, strings).
        params: tensors the step reads, by name (learnable parameters or buffers). The node that
            replaces the neuron registers them under ``attr_names`` so state_dict keys stay.
        surrogate: the spike function's forward threshold convention and derivative.
        origin: where the spec came from (class name), for reports and errors.
        attr_names: name of each param on the original module (``params`` key -> attribute).
    """

    family: str
    consts: Dict[str, Any]
    params: Params
    surrogate: Surrogate
    origin: str = ""
    attr_names: Dict[str, str] = field(default_factory=dict)
    #: builds the framework's own state object from the public state tensors (norse's
    #: LIFFeedForwardState, say), so that code reading ``state.v`` keeps working
    make_state: Optional[Any] = None

    def describe(self) -> str:
        kv = ", ".join(f"{k}={v}" for k, v in self.consts.items())
        return f"{self.origin or self.family}({kv}, surrogate={self.surrogate.name})"


class Family:
    """The equations of one neuron family. Stateless: everything comes from the spec."""

    name: str = "family"
    #: names of the state tensors that are the framework's visible state (others are derived)
    public_state: Tuple[str, ...] = ("v",)
    #: every spike is exactly 0 or 1 (no graded spikes): a reversible node's input is then its
    #: output less its spikes, which a folded batch norm relies on (revpass/nodes/batchnorm.py),
    #: and a layer reading an exact node's spikes keeps them as bits (revpass/passes/spikes.py)
    binary_spikes: bool = False
    #: the form of its equations, which fused kernels key on (revpass/nodes/kernels): "lif"
    #: (H = charge(V, X), fire, reset), "leaky_synaptic" (a reset signal carried in the state),
    #: "current_lif" (a synaptic current and a membrane), "lif_box" (a membrane alone)
    equations: str = ""

    def n_public(self, spec: NeuronSpec) -> int:
        """How many leading state tensors the framework itself exposes."""
        return len(self.public_state)

    def n_state(self, spec: NeuronSpec) -> int:
        """How many state tensors the family carries (the public ones and any derived)."""
        return len(self.public_state)

    def n_bits(self, spec: NeuronSpec) -> int:
        """Number of discrete decisions per element and step that reconstruction must pin."""
        return 1

    def prepare(self, spec: NeuronSpec, P: Params) -> Params:
        """Derived tensors computed once per sequence (e.g. clamped beta). Autograd-aware."""
        return dict(P)

    def init_state(self, spec: NeuronSpec, x0: Tensor, P: Params) -> State:
        """The reset state for one step's input ``x0``."""
        raise NotImplementedError

    def complete_state(self, spec: NeuronSpec, public: State, P: Params) -> State:
        """Full internal state from the framework-visible state (default: identical)."""
        return tuple(public)

    def step(
        self,
        spec: NeuronSpec,
        x: Tensor,
        state: State,
        P: Params,
        bits: Optional[Tuple[Tensor, ...]] = None,
        autograd: bool = False,
    ) -> Tuple[Tensor, State, Dict[str, Tensor], Tuple[Tensor, ...]]:
        """One time step. Returns (spike, next state, records for the VJP, pinnable decisions).

        The decisions are 0/1 tensors (the unit spike, and for some families a reset signal);
        ``bits`` passes stored ones back in to pin them during reconstruction."""
        raise NotImplementedError

    def rebuild_step(
        self, spec: NeuronSpec, x: Tensor, state: State, P: Params, bits: Tuple[Tensor, ...]
    ) -> Tuple[State, Dict[str, Tensor]]:
        """One step of a neuron being rebuilt with its decisions pinned (the reversible node's F,
        docs/method.md): (next state, records). Only its gradients depend on it, so a family may
        compute it with fewer operations than :meth:`step` (rounding differently by an ulp)."""
        _, state, rec, _ = self.step(spec, x, state, P, bits=bits)
        return state, rec

    def vjp(
        self,
        spec: NeuronSpec,
        recs: Dict[str, Tensor],
        g_spike: Tensor,
        g_state: Optional[State],
        P: Params,
        need_params: Sequence[str],
    ) -> Tuple[Tensor, Optional[State], Dict[str, Tensor]]:
        """Gradient of a sequence: (grad of inputs, grad of initial state, grads of params)."""
        raise NotImplementedError

    def exact_stream(
        self,
        spec: NeuronSpec,
        kept: Dict[str, Tensor],
        g_spike: Tensor,
        g_state: Optional[State],
        P: Params,
        need_params: Sequence[str],
    ) -> Optional[Tuple[Tensor, Optional[State], Dict[str, Tensor]]]:
        """The exact node's whole backward from its kept records, as the framework itself
        computes it (same ops, same rounding), one whole step at a time: then exact-mode training
        repeats the original's bit for bit. None where the family has none: the exact node then
        runs :meth:`vjp` (within docs/method.md section 7's tolerance) in slices."""
        return None

    # exact node: what it keeps (one float per element and step) and how it rebuilds records
    def exact_keep(self, spec: NeuronSpec, need_params: Sequence[str]) -> Tuple[str, ...]:
        return ("h",)

    def recs_from_kept(
        self, spec: NeuronSpec, kept: Dict[str, Tensor], state0: State, P: Params
    ) -> Dict[str, Tensor]:
        raise NotImplementedError

    def input_steps(
        self, spec: NeuronSpec, kept: Dict[str, Tensor], state: State, P: Params
    ) -> Tuple[Tensor, State]:
        """The exact node's input over consecutive steps, rebuilt from its kept records over
        those steps (n, ...) and the state before the first: (X (n, ...), the state after the
        last step). The charge solved for its input, so within a rounding step of the input the
        node saw; a family that cannot (:meth:`rebuilds_input` False) keeps its batch norm's
        input instead of folding it (revpass/nodes/batchnorm.py)."""
        raise NotImplementedError(f"{self.name}: the exact node's input is not rebuilt from its records")

    def rebuilds_input(self, spec: NeuronSpec) -> bool:
        """Whether :meth:`input_steps` rebuilds this spec's input."""
        return False


FAMILIES: Dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_of(spec: NeuronSpec) -> Family:
    return FAMILIES[spec.family]


_CONSTS: Dict[Tuple[float, torch.dtype, torch.device], Tensor] = {}


def const(value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-d tensor of ``like``'s dtype and device (cached). An operation with it
    computes exactly as with the Python number (which PyTorch converts to the tensor's dtype
    first, a small conversion per operation that per-step loops pay thousands of times)."""
    key = (value, like.dtype, like.device)
    t = _CONSTS.get(key)
    if t is None:
        t = _CONSTS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return t


def pin(s: Tensor, bit: Optional[Tensor], autograd: bool) -> Tensor:
    """Replace a spike's value by a stored bit; under autograd keep the surrogate's gradient."""
    if bit is None:
        return s
    b = bit.to(s.dtype)
    return s + (b - s).detach() if autograd else b


def run_sequence(
    spec: NeuronSpec,
    x_seq: Tensor,
    state: Optional[State],
    P: Params,
    *,
    bits: Optional[Tensor] = None,
    record=False,
    autograd: bool = False,
    prepared: bool = False,
    want_bits: bool = False,
    record_into: Optional[Dict[str, Tensor]] = None,
) -> Tuple[Tensor, State, Dict[str, Tensor], Optional[Tensor]]:
    """Run the spec's step over ``x_seq`` (T, ...).

    ``record`` is True (all records) or a collection of record names. ``record_into``: records
    written step by step into these (T, ...) tensors instead (no list of steps and stack: one
    sequence of each record alive, not two, at the end of the forward).
    Returns (spikes (T, ...), final state, stacked records if ``record``, stacked decisions
    (T, nbits, ...) as bool if ``want_bits``). ``bits`` pins the decisions (reconstruction).
    """
    fam = family_of(spec)
    Pp = P if prepared else fam.prepare(spec, P)
    T = x_seq.shape[0]
    if state is None:
        state = fam.init_state(spec, x_seq[0] if T else x_seq.new_empty(x_seq.shape[1:]), Pp)
    spikes = torch.empty_like(x_seq) if not autograd else None
    spike_list = []
    recs: Dict[str, list] = {}
    bit_list = []
    for t in range(T):
        bt = None if bits is None else tuple(bits[t, i] for i in range(bits.shape[1]))
        s, state, rec, b = fam.step(spec, x_seq[t], state, Pp, bits=bt, autograd=autograd)
        if autograd:
            spike_list.append(s)
        else:
            spikes[t] = s
        if record_into is not None:
            for k, out in record_into.items():
                out[t] = rec[k]
        if record:
            for k, v in rec.items():
                if record is True or k in record:
                    recs.setdefault(k, []).append(v)
        if want_bits:
            bit_list.append(torch.stack(b).bool())
    if autograd:
        spikes = torch.stack(spike_list) if spike_list else x_seq.clone()
    stacked = {k: torch.stack(v) for k, v in recs.items()}
    bits_out = torch.stack(bit_list) if bit_list else None
    return spikes, state, stacked, bits_out


def reduce_to(g: Tensor, like: Tensor) -> Tensor:
    """Sum a gradient computed at broadcast shape down to a parameter's shape."""
    if g.shape == like.shape:
        return g
    return g.sum_to_size(like.shape) if like.dim() else g.sum().reshape(like.shape)


# ---------------------------------------------------------------------------------------------
# a spec as plain data: what a custom op receives (revpass/nodes/ops.py), so that a traced or
# exported program carries its neurons' configuration itself
# ---------------------------------------------------------------------------------------------

#: the user's own surrogates (Python callables, which cannot travel as data), by token
_LOCAL_SURROGATES: Dict[str, Surrogate] = {}
_local_ids = itertools.count(1)


def spec_to_config(spec: NeuronSpec, site: str = "") -> Dict[str, Any]:
    """The spec as JSON-able data (tensors excepted: a node passes them to its op). A built-in
    surrogate travels as its key; a user's own as a token valid in this process only."""
    sg = spec.surrogate
    if sg.key is not None:
        surrogate = {"kind": sg.key[0], "alpha": sg.key[1], "fires_at_zero": sg.fires_at_zero}
    else:
        token = getattr(sg, "_revpass_token", None)
        if token is None or _LOCAL_SURROGATES.get(token) is not sg:
            token = f"{id(_LOCAL_SURROGATES):x}.{next(_local_ids)}"
            _LOCAL_SURROGATES[token] = sg
            sg._revpass_token = token
        surrogate = {"local": token, "name": sg.name, "fires_at_zero": sg.fires_at_zero}
    return {"family": spec.family, "consts": spec.consts, "surrogate": surrogate,
            "origin": spec.origin, "site": site}


def config_json(data: Dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=None)
def spec_from_config(text: str) -> Tuple[NeuronSpec, Dict[str, Any]]:
    """The spec (with no tensors) and the whole configuration back from :func:`config_json`'s
    text. Raises RevpassError, naming the site, for a user's own surrogate that was registered
    in another process."""
    data = json.loads(text)
    sg = data["surrogate"]
    if "kind" in sg:
        if sg["kind"] not in _surrogates.BUILTIN:
            raise RevpassError(f"{data.get('site') or data['origin']}: unknown surrogate {sg['kind']!r}; "
                               "this program was made by another version of revpass")
        surrogate = _surrogates.builtin(sg["kind"], sg["alpha"], sg["fires_at_zero"])
    else:
        surrogate = _LOCAL_SURROGATES.get(sg["local"])
        if surrogate is None:
            raise RevpassError(
                f"{data.get('site') or data['origin']}: its surrogate {sg['name']!r} is a Python function of the "
                "process that made this program, and a function cannot travel inside it. Run the program "
                "where it was made, or convert the model again here (revpass.convert), or give the neuron "
                "one of its framework's built-in surrogates."
            )
    spec = NeuronSpec(family=data["family"], consts=data["consts"], params={}, surrogate=surrogate,
                      origin=data["origin"])
    return spec, data
