"""Kind c: hand-written neurons traced into primitive ops, recognised by a table of patterns.

A neuron step is three sub-expressions around a spike function (an autograd.Function kept as one
node by the tracer):

    H = charge(V, X)             one of CHARGE: SpikingJelly-style LIF (with or without decay of the
                                 input, any v_reset), its parametric form PLIF (the decay sigmoid(w)
                                 of a tensor w the model holds, a learnable parameter), IF, or
                                 snnTorch-style H = beta V + X
    S = spike(H - v_threshold)   the user's autograd.Function: its own forward and backward
    V' = reset(H, S)             one of RESET: hard (to v_reset), zero, soft (subtract v_threshold)

The matcher binds V, X, H, S, the constants and the tensors the model holds (read with get_attr:
a PLIF's w is bound as the model's own parameter, which the node then shares, so that it trains);
steps whose V is the previous step's V' form a chain that starts from a zero state; a chain whose
inputs do not depend on its own spikes and whose intermediate values are read by nothing else
becomes one sequence node (stack, node, unbind). Each table entry says which revpass family (and
constants) computes the same values.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import networkx as nx
import torch
from torch import fx

from revpass.neurons import lif_spec
from revpass.neurons.spec import NeuronSpec
from revpass.neurons.surrogate import Surrogate, derivative_from_function
from revpass.passes.graph import insert_sequence_node, position, topo_sort
from revpass.utils import set_module

add, sub, mul, div = operator.add, operator.sub, operator.mul, operator.truediv
_COMMUTATIVE = {add, mul}

# (name, pattern, bindings -> lif_spec arguments). Leaves: "V", "X", "H", "S" bind graph values;
# ("c", name) binds a number; ("sigmoid", name) binds sigmoid(w) of a tensor w the model holds (a
# Decay); a bare number must match exactly.
CHARGE: List[Tuple[str, Any, Callable[[Dict[str, float]], Dict[str, Any]]]] = [
    ("lif", (add, "V", (div, (sub, "X", (sub, "V", ("c", "r"))), ("c", "tau"))),
     lambda c: dict(tau=c["tau"], decay_input=True, v_reset_charge=c["r"])),
    ("lif", (add, "V", (div, (sub, "X", "V"), ("c", "tau"))),
     lambda c: dict(tau=c["tau"], decay_input=True, v_reset_charge=0.0)),
    ("lif-no-decay-input", (add, (sub, "V", (div, (sub, "V", ("c", "r")), ("c", "tau"))), "X"),
     lambda c: dict(tau=c["tau"], decay_input=False, v_reset_charge=c["r"])),
    ("lif-no-decay-input", (add, (sub, "V", (div, "V", ("c", "tau"))), "X"),
     lambda c: dict(tau=c["tau"], decay_input=False, v_reset_charge=0.0)),
    # the parametric LIF: SpikingJelly's ParametricLIFNode, 1 / tau = sigmoid(w)
    ("plif", (add, "V", (mul, (sub, "X", (sub, "V", ("c", "r"))), ("sigmoid", "w"))),
     lambda c: dict(w=c["w"], decay_input=True, v_reset_charge=c["r"])),
    ("plif", (add, "V", (mul, (sub, "X", "V"), ("sigmoid", "w"))),
     lambda c: dict(w=c["w"], decay_input=True, v_reset_charge=0.0)),
    ("plif-no-decay-input", (add, (sub, "V", (mul, (sub, "V", ("c", "r")), ("sigmoid", "w"))), "X"),
     lambda c: dict(w=c["w"], decay_input=False, v_reset_charge=c["r"])),
    ("plif-no-decay-input", (add, (sub, "V", (mul, "V", ("sigmoid", "w"))), "X"),
     lambda c: dict(w=c["w"], decay_input=False, v_reset_charge=0.0)),
    ("beta-lif", (add, (mul, ("c", "beta"), "V"), "X"), lambda c: dict(beta=c["beta"], v_reset_charge=None)),
    # the most general form last: it would also match the ones above
    ("if", (add, "V", "X"), lambda c: dict(tau=None, v_reset_charge=None)),
]

RESET: List[Tuple[str, Any, Callable[[Dict[str, float]], Dict[str, Any]]]] = [
    ("hard", (add, (mul, "S", ("c", "r")), (mul, (sub, 1.0, "S"), "H")), lambda c: dict(v_reset=c["r"])),
    ("zero", (mul, "H", (sub, 1.0, "S")), lambda c: dict(v_reset=0.0)),
    ("zero", (sub, "H", (mul, "S", "H")), lambda c: dict(v_reset=0.0)),
    ("soft", (sub, "H", (mul, "S", ("c", "thr"))), lambda c: dict(v_reset=None, soft_thr=c["thr"])),
]


def _const(a) -> Optional[float]:
    return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else None


@dataclass(frozen=True)
class Decay:
    """A decay sigmoid(w) read from a tensor w the model holds: ``node`` computes it from
    ``param``, the get_attr of w. Neither is one of the step's own ops: the decay may be computed
    once before the loop and read by every step (or by other code), so the rewrite erases them
    only once nothing reads them."""

    node: fx.Node
    param: fx.Node

    @property
    def tensor(self) -> torch.Tensor:
        return _held(self.param)


def _held(node) -> Optional[torch.Tensor]:
    """The tensor that get_attr ``node`` reads from its graph's module, or None."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    obj = node.graph.owning_module
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def _decay(node) -> Optional[Decay]:
    """``node`` as sigmoid(w) of a tensor w the model holds (``torch.sigmoid(w)`` or
    ``w.sigmoid()``), or None."""
    if not (isinstance(node, fx.Node) and len(node.args) == 1 and not node.kwargs
            and ((node.op == "call_function" and node.target is torch.sigmoid)
                 or (node.op == "call_method" and node.target == "sigmoid"))):
        return None
    return Decay(node, node.args[0]) if _held(node.args[0]) is not None else None


def match(pat, node, b: Dict[str, Any], inner: List[fx.Node]) -> bool:
    """Match ``pat`` at ``node``, extending bindings ``b``; ``inner`` collects the matched op nodes."""
    if isinstance(pat, str):
        if pat in b:
            return b[pat] is node
        if not isinstance(node, fx.Node):
            return False
        b[pat] = node
        return True
    if isinstance(pat, (int, float)):
        return _const(node) == float(pat)
    if pat[0] == "c":
        v = _const(node)
        if v is None:
            return False
        if pat[1] in b and b[pat[1]] != v:
            return False
        b[pat[1]] = v
        return True
    if pat[0] == "sigmoid":
        d = _decay(node)
        if d is None or (pat[1] in b and b[pat[1]].param.target != d.param.target):
            return False
        b[pat[1]] = d
        return True
    op, pa, pb = pat
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is op
            and len(node.args) == 2 and not node.kwargs):
        return False
    orders = [(node.args[0], node.args[1])]
    if op in _COMMUTATIVE:
        orders.append((node.args[1], node.args[0]))
    for a0, a1 in orders:
        b2, i2 = dict(b), list(inner)
        if match(pa, a0, b2, i2) and match(pb, a1, b2, i2):
            b.clear()
            b.update(b2)
            inner[:] = i2 + [node]
            return True
    return False


@dataclass
class Step:
    spike: fx.Node
    H: fx.Node
    V: Any
    X: fx.Node
    V_next: fx.Node
    charge: str
    reset: str
    consts: Dict[str, float]
    inner: List[fx.Node] = field(default_factory=list)  # every op of the step but the spike's input X
    params: Dict[str, Decay] = field(default_factory=dict)  # the tensors it reads, by binding name

    def key(self) -> Tuple:
        """What two steps of one neuron share: equations, constants, tensors, spike function."""
        return (self.charge, self.reset, tuple(sorted(self.consts.items())),
                tuple(sorted((k, d.param.target) for k, d in self.params.items())), self.spike.target)


def _is_zero_state(v) -> bool:
    if _const(v) == 0.0:
        return True
    if not isinstance(v, fx.Node) or v.kwargs:
        return False
    return ((v.op == "call_function" and v.target in (torch.zeros_like, torch.zeros))
            or (v.op == "call_method" and v.target in ("new_zeros", "zero_")))


def find_steps(gm: fx.GraphModule) -> List[Step]:
    steps = []
    for s in gm.graph.nodes:
        if not (s.op == "call_function" and hasattr(s.target, "revpass_function") and len(s.args) == 1):
            continue
        shift = s.args[0]
        b: Dict[str, Any] = {}
        inner: List[fx.Node] = []
        if not match((sub, "H", ("c", "thr")), shift, b, inner):
            continue
        H, thr = b["H"], b["thr"]
        for cname, cpat, _ in CHARGE:
            cb: Dict[str, Any] = {}
            ci: List[fx.Node] = []
            if not match(cpat, H, cb, ci):
                continue
            found = None
            for cand in _near(s):
                for rname, rpat, _ in RESET:
                    rb: Dict[str, Any] = {"S": s, "H": H}
                    ri: List[fx.Node] = []
                    if match(rpat, cand, rb, ri) and (rname != "soft" or rb["thr"] == thr):
                        found = (rname, rb, ri, cand)
                        break
                if found:
                    break
            if not found:
                continue
            rname, rb, ri, vnext = found
            consts = {k: v for k, v in {**cb, **rb}.items() if not isinstance(v, (fx.Node, Decay))}
            consts["thr"] = thr
            steps.append(Step(s, H, cb["V"], cb["X"], vnext, cname, rname, consts, inner=[shift] + ci + ri,
                              params={k: v for k, v in cb.items() if isinstance(v, Decay)}))
            break
    return steps


def _near(s: fx.Node) -> List[fx.Node]:
    """Candidate reset roots: users of the spike and their users."""
    out = []
    for u in s.users:
        out.append(u)
        out.extend(u.users)
    return out


@dataclass
class PatternSite:
    steps: List[Step]
    spec: Optional[NeuronSpec]
    path: str
    reason: str = ""
    decision: str = "unchanged"  # set by revpass.passes.decide
    node_path: str = ""  # where its node went (revpass.passes.rewrite)


def _spec_for(first: Step, fn, path: str) -> NeuronSpec:
    """The spec of the neuron whose first step is ``first`` (``fn`` its spike function, ``path``
    its site's path)."""
    c = first.consts
    fires_at_zero = bool(fn(torch.zeros(1)).item() == 1)
    surrogate = Surrogate(
        f"{fn.revpass_function.__name__} (own derivative)", derivative_from_function(fn), fires_at_zero
    )
    charge = dict(CHARGE_BUILD[first.charge]({**c, **first.params}))
    reset = dict(RESET_BUILD[first.reset](c))
    r_charge = charge.pop("v_reset_charge", None)
    beta = charge.pop("beta", None)
    w = charge.pop("w", None)
    v_reset = reset.get("v_reset")
    if r_charge is not None and r_charge != (v_reset if v_reset is not None else 0.0):
        raise ValueError("the charge's v_reset and the reset's differ")
    spec = lif_spec(
        tau=charge.get("tau"),
        decay_input=charge.get("decay_input", True),
        v_threshold=c["thr"],
        v_reset=v_reset,
        surrogate=surrogate,
        origin=f"pattern:{first.charge}/{first.reset}",
    )
    if beta is not None:
        spec.consts.update(kind="beta", beta=beta)
    if w is not None:  # the model's own tensor, not a copy: the node shares it, so it trains
        spec.consts.update(kind="plif", tau=None)
        spec.params["w"] = w.tensor
        owner, _, name = w.param.target.rpartition(".")
        if owner == path:  # the neuron module's own: a node in its place keeps its state_dict key
            spec.attr_names["w"] = name
    return spec


CHARGE_BUILD = {name: build for name, _, build in CHARGE}
RESET_BUILD = {name: build for name, _, build in RESET}


def find_pattern_sites(gm: fx.GraphModule, g: nx.DiGraph) -> List[PatternSite]:
    """Chains of matched steps, each a candidate sequence node, with the reason if it is not one."""
    steps = find_steps(gm)
    by_v = {id(st.V_next): st for st in steps}
    sites = []
    followers = {}
    for st in steps:
        prev = by_v.get(id(st.V))
        if prev is not None:
            followers[id(prev.spike)] = st
    starts = [st for st in steps if by_v.get(id(st.V)) is None]
    for i, first in enumerate(starts):
        chain = [first]
        while id(chain[-1].spike) in followers:
            chain.append(followers[id(chain[-1].spike)])
        stack = first.spike.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else f"revpass_neuron_{i}"
        site = PatternSite(chain, None, path)
        sites.append(site)
        if not _is_zero_state(first.V):
            site.reason = "the first step does not start from a zero state"
            continue
        if any(st.key() != first.key() for st in chain):
            site.reason = "the steps do not share one neuron's equations and constants"
            continue
        spikes = {st.spike for st in chain}
        internal = set(spikes) | {n for st in chain for n in st.inner}
        for t, st in enumerate(chain):
            before = nx.ancestors(g, st.X) | {st.X}
            if before & spikes:
                # an input term that reads the membrane: a charge of no known form, read as the
                # general one (IF's H = V + X), not a recurrent input
                site.reason = (f"the charge of step {t} is of no form the patterns know (LIF, PLIF with the "
                               f"decay sigmoid(w) of a tensor the model holds, IF, beta): read as "
                               f"{st.charge}, its input '{st.X.name}' reads the membrane itself"
                               if st.V in before else f"the input of step {t} depends on this neuron's own spikes")
                break
            outside = [u for n in st.inner for u in n.users
                       if u not in internal and not (t + 1 < len(chain) and n is st.V_next)]
            if outside:
                site.reason = f"an intermediate value of step {t} (membrane or state) is read by '{outside[0].name}'"
                break
        if site.reason:
            continue
        if first.reset == "hard" and first.consts.get("r", 0.0) != 0.0:
            site.reason = "a hard reset to a non-zero v_reset starting from a zero state"
            continue
        try:
            site.spec = _spec_for(first, first.spike.target, path)
        except Exception as exc:  # noqa: BLE001 - reported, the site stays as it is
            site.reason = f"no revpass family computes this neuron: {exc}"
    return sites


def rewrite_pattern_site(gm: fx.GraphModule, site: PatternSite, node_module) -> str:
    """Replace the chain's ops by stack -> node -> unbind; returns the node's module path."""

    path = site.path
    try:
        old = gm.get_submodule(path)
    except AttributeError:
        old = None
    # the module's own tensors keep their state_dict keys: the node takes its place if it holds
    # every one of them under the same name (a PLIF module's w), else it sits beside it
    keep_old = old is not None and any(getattr(node_module, name, None) is not t
                                       for name, t in [*old.named_parameters(), *old.named_buffers()])
    if keep_old:
        path = f"{path}_revpass"
    set_module(gm, path, node_module)
    # a parameter read from another module (an inline PLIF's w on the model): that module's key
    owned = {id(t) for name, t in [*gm.named_parameters(remove_duplicate=False),
                                   *gm.named_buffers(remove_duplicate=False)] if not name.startswith(path + ".")}
    node_module.borrow(a for a, t in [*node_module.named_parameters(recurse=False),
                                      *node_module.named_buffers(recurse=False)]
                       if id(t) in owned and a not in node_module.spec.attr_names.values())
    g = gm.graph
    internal = {st.spike for st in site.steps} | {n for st in site.steps for n in st.inner}
    items = insert_sequence_node(g, path, [st.X for st in site.steps],
                                 [n.name for st in site.steps for n in [st.spike, *st.inner]])
    for st, item in zip(site.steps, items):
        st.spike.replace_all_uses_with(item, delete_user_cb=lambda u: u not in internal)
    pos = position(g)
    for n in sorted(internal, key=pos, reverse=True):
        assert all(u in internal for u in n.users), f"{path}: {n.name} is still read outside the neuron"
        g.erase_node(n)
    v0 = site.steps[0].V
    if isinstance(v0, fx.Node) and not v0.users:
        g.erase_node(v0)
    decays = [d for st in site.steps for d in st.params.values()]
    for n in dict.fromkeys([d.node for d in decays] + [d.param for d in decays]):  # sigmoids, then get_attrs
        if not n.users:
            g.erase_node(n)
    topo_sort(g)
    return path
