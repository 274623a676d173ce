"""The reference a reversible conversion is checked against (:func:`revpass.verify`).

A reversible node computes Y1 = X1 + S^F(X2), Y2 = X2 + S^G(Y1) on its input's channel halves,
and runs the unpaired channel of an odd count through the neuron unchanged
(revpass/nodes/layout.py: G on channels [0, c), F on [c, 2c), the rest on [2c, C)). Checking it
against itself (its own ``backward="autograd"``) says nothing about whether its neuron is the
original's. The reference here is built from the **original model**: every site the candidate
converted reversibly becomes that coupling, with F, G and the unpaired part the original neuron
itself on those channels (each with its own state; per-channel parameters sliced, scalar ones
shared; gradients reach the original's parameters under their own names), run under plain
autograd:

* kind a (a multi-step neuron, one call on (T, B, C, ...)): :class:`Coupling` over the sequence;
* kind b (a single-step neuron called once per step): :class:`Coupling` per step, since Y1_t
  depends only on X2_t and F's state; the state the model threads through the calls is not
  used (each part keeps its own from the first call after a reset);
* kind c (a neuron written as operations, revpass/passes/patterns.py): the original traced, and
  each step's matched operations duplicated for F, G and the unpaired channel.

How a framework's neuron runs on a channel range is its adapter's
(:meth:`revpass.neurons.adapter.Adapter.on_channels`); nothing here knows a framework.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from revpass.errors import RevpassError
from revpass.neurons import adapter_for, invalidate_reset_caches
from revpass.neurons.adapter import Adapter
from revpass.nodes import Node, ReversibleNode
from revpass.passes.graph import position, to_networkx, topo_sort
from revpass.passes.patterns import find_pattern_sites
from revpass.trace import trace
from revpass.utils import set_module, time_steps

Tensor = torch.Tensor

__all__ = ["CouplingError", "Coupling", "SiteLog", "Reference", "build_reference", "ConvertedSite", "converted_sites"]


class CouplingError(RevpassError, RuntimeError):
    """The original neuron could not be run as the reference coupling (on part of its channels)."""


class SiteLog:
    """The input and output of every call of the sites being compared, by site path, in the
    order the sites were first called. ``per_step`` sites are called once per time step: their
    calls are stacked into one sequence (what the converted node sees)."""

    def __init__(self):
        self.calls: Dict[str, List[Tuple[Optional[Tensor], Tensor]]] = {}
        self.per_step: set = set()

    def clear(self) -> None:
        self.calls = {}

    def record(self, path: str, x: Optional[Tensor], y: Tensor) -> None:
        self.calls.setdefault(path, []).append((None if x is None else x.detach(), y.detach()))

    def sequences(self, path: str) -> List[Tuple[Optional[Tensor], Tensor]]:
        """The calls of ``path``, per-step ones stacked into one (T, ...) call."""
        calls = self.calls.get(path, [])
        if path not in self.per_step or not calls:
            return calls
        xs = [x for x, _ in calls]
        x = None if any(v is None for v in xs) else torch.stack(xs)
        return [(x, torch.stack([y for _, y in calls]))]


def first_tensor(out: Any) -> Optional[Tensor]:
    """The first tensor in ``out`` (a neuron's spikes: the tensor, or a tuple's first item)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = first_tensor(o)
            if t is not None:
                return t
    return None


class Coupling(nn.Module):
    """The reference for one reversible site: the original neuron ``neuron`` (kept as the child
    ``neuron``, its parameters under their own names) as the coupling

        Y1 = X1 + F(X2),  Y2 = X2 + G(Y1),  Y3 = R(X3)

    on channel dim ``channel_dim`` of each call's input (2 for a (T, B, C, ...) sequence, 1 for
    one step (B, C, ...)); F, G and R are ``adapter.on_channels`` of the neuron on channels
    [c, 2c), [0, c) and [2c, C). A call returns what the neuron returns, its spikes replaced by
    Y and its state, if it returns one, joined from the parts' (G, F, R: channel order).
    Arguments after the input (a state the model threads through single-step calls) are not
    used: the parts keep their own state from the first call after :meth:`reset`."""

    def __init__(self, neuron: nn.Module, adapter: Adapter, path: str, channel_dim: int, log: SiteLog):
        super().__init__()
        self.neuron = neuron
        self.path, self.channel_dim = path, channel_dim
        object.__setattr__(self, "_adapter", adapter)
        object.__setattr__(self, "_log", log)
        object.__setattr__(self, "_parts", {})  # part name -> module, for _channels channels
        self._channels: Optional[int] = None

    def __getattr__(self, name: str) -> Any:
        """What the model reads of its neuron besides calling it (snnTorch's ``init_leaky()``,
        a ``step_mode``) is the original neuron's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            neuron = self._modules.get("neuron")
            if neuron is None:
                raise
            return getattr(neuron, name)

    def reset(self) -> None:
        """Forget the parts (and their state): the next call starts from the reset state (what
        revpass.state.reset_states, and a reset of the model's own such as SpikingJelly's
        ``reset_net(self)``, do to the neuron)."""
        self._parts.clear()
        self._channels = None

    def _part(self, name: str, lo: int, hi: Optional[int]) -> nn.Module:
        part = self._parts.get(name)
        if part is None:
            part = self._parts[name] = self._adapter.on_channels(self.neuron, lo, hi, self.channel_dim)
        return part

    def _run(self, name: str, x: Tensor, lo: int, hi: Optional[int], C: int) -> Any:
        part = self._part(name, lo, hi)
        try:
            out = part(x.contiguous())
        except Exception as exc:  # noqa: BLE001 - re-raised naming the site, the channels and the remedy
            what = "all of its input" if hi is None else f"channels [{lo}, {hi}) of its {C}-channel input"
            remedy = getattr(part, "remedy", "") or (
                "a neuron converted to a reversible node must run on any subset of its channels, "
                "with per-channel parameters lined up with the input's channel dimension; or convert "
                "this site with mode='exact'")
            raise CouplingError(
                f"{self.path}: the reference runs the original {type(self.neuron).__name__} on {what} "
                f"(the reversible node's {name.upper()} part), and it raised {type(exc).__name__}: {exc}. "
                f"What to do: {remedy}."
            ) from exc
        if first_tensor(out) is None:
            raise CouplingError(f"{self.path}: {type(self.neuron).__name__} returned no tensor on channels "
                                f"[{lo}, {hi}); the reference needs its spikes")
        return out

    def forward(self, x: Tensor, *args, **kwargs) -> Any:
        d = self.channel_dim
        if d == 2 and any(a is not None for a in list(args) + list(kwargs.values())):
            raise CouplingError(f"{self.path}: called with an explicit initial state; the reference "
                                "coupling of a multi-step neuron starts from the reset state")
        if x.dim() <= d:  # no channel dim: the whole neuron (the node runs it exact)
            out = self._run("r", x, 0, None, 0)
            self._log.record(self.path, x, first_tensor(out))
            return out
        C = x.shape[d]
        c = C // 2
        if self._channels != C:  # a new channel count: new parts, from the reset state
            self.reset()
            self._channels = C
        outs, pieces = [], []
        if c:
            x1, x2 = x.narrow(d, 0, c), x.narrow(d, c, c)
            out_f = self._run("f", x2, c, 2 * c, C)
            y1 = x1 + first_tensor(out_f)
            out_g = self._run("g", y1, 0, c, C)
            y2 = x2 + first_tensor(out_g)
            outs += [out_g, out_f]
            pieces += [y1, y2]
        if C - 2 * c:
            out_r = self._run("r", x.narrow(d, 2 * c, C - 2 * c), 2 * c, C, C)
            outs.append(out_r)
            pieces.append(first_tensor(out_r))
        y = torch.cat(pieces, d)
        self._log.record(self.path, x, y)
        return _assemble(outs, y, x.dim() - d, self.path)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, channel_dim={self.channel_dim}"


def _assemble(outs: List[Any], y: Tensor, from_right: int, path: str) -> Any:
    """``outs[0]``'s structure with its first tensor (the spikes) replaced by ``y`` and each other
    tensor (state) the parts' joined along the channel dim (``from_right`` dims from the end)."""
    if len(outs) == 1 and first_tensor(outs[0]) is y:
        return outs[0]
    seen_spikes = [False]

    def walk(items):
        o0 = items[0]
        if isinstance(o0, Tensor):
            if not seen_spikes[0]:
                seen_spikes[0] = True
                return y
            dim = o0.dim() - from_right
            try:
                if dim < 0:
                    raise ValueError(f"a state of shape {tuple(o0.shape)} has no channel dim")
                return torch.cat(items, dim)
            except (RuntimeError, ValueError) as exc:
                raise CouplingError(f"{path}: the parts' states cannot be joined along the channels: {exc}") from exc
        if isinstance(o0, (tuple, list)):
            fields = [walk([o[i] for o in items]) for i in range(len(o0))]
            return type(o0)(*fields) if hasattr(o0, "_fields") else type(o0)(fields)
        return o0

    return walk(outs)


# ----------------------------------------------------------------------------------------------
# kind c: the matched operations, duplicated per part
# ----------------------------------------------------------------------------------------------


def _split(t: Any) -> Tuple[Any, Any, Any]:
    """One step's (B, C, ...) value as its G, F and unpaired parts (channels [0, c), [c, 2c),
    [2c, C)); without a channel dim everything is the unpaired part; a number is every part."""
    if not isinstance(t, Tensor) or t.dim() == 0:
        return t, t, t
    if t.dim() < 2:
        return t[:0], t[:0], t
    C = t.shape[1]
    c = C // 2
    return t.narrow(1, 0, c), t.narrow(1, c, c), t.narrow(1, 2 * c, C - 2 * c)


def _join(y1: Tensor, y2: Tensor, y3: Tensor, like: Tensor) -> Tensor:
    return y3 if like.dim() < 2 else torch.cat([y1, y2, y3], 1)


class _StepProbe(nn.Module):
    """Records one step's input and coupled output of a kind-c site; returns the output."""

    def __init__(self, path: str, log: SiteLog):
        super().__init__()
        self.path = path
        object.__setattr__(self, "_log", log)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        self._log.record(self.path, x, y)
        return y


def _couple_pattern(gm: fx.GraphModule, site, path: str, probe: str) -> None:
    """Replace the matched steps of hand-written neuron ``site`` (a PatternSite of ``gm``) by
    their coupling: each step's operations copied for F (on X2), G (on Y1 = X1 + S^F) and the
    unpaired channel, each copy reading its own previous state."""
    g = gm.graph
    pos = position(g)
    internal = {st.spike for st in site.steps} | {n for st in site.steps for n in st.inner}
    v0 = site.steps[0].V
    prev: Optional[Dict[str, Any]] = None

    def copy_step(st, nodes, x, v):
        env = {st.X: x}
        if isinstance(st.V, fx.Node):
            env[st.V] = v
        for n in nodes:
            env[n] = g.node_copy(n, lambda a: env.get(a, a))
        return env[st.spike], env[st.V_next]

    for st in site.steps:
        nodes = sorted(set(st.inner) | {st.spike}, key=pos)
        with g.inserting_after(st.V_next):  # after every op of the step (all feed V_next)
            xs = g.call_function(_split, (st.X,))
            xg, xf, xr = (g.call_function(operator.getitem, (xs, i)) for i in range(3))
            if prev is None:
                if isinstance(v0, fx.Node):
                    vs = g.call_function(_split, (v0,))
                    prev = {k: g.call_function(operator.getitem, (vs, i)) for i, k in enumerate("gfr")}
                else:
                    prev = {k: v0 for k in "gfr"}
            s_f, v_f = copy_step(st, nodes, xf, prev["f"])
            y1 = g.call_function(operator.add, (xg, s_f))
            s_g, v_g = copy_step(st, nodes, y1, prev["g"])
            y2 = g.call_function(operator.add, (xf, s_g))
            s_r, v_r = copy_step(st, nodes, xr, prev["r"])
            y = g.call_function(_join, (y1, y2, s_r, st.X))
            y = g.call_module(probe, (st.X, y))
        prev = {"g": v_g, "f": v_f, "r": v_r}
        st.spike.replace_all_uses_with(y, delete_user_cb=lambda u: u not in internal)
    for n in sorted(internal, key=pos, reverse=True):
        if any(u not in internal for u in n.users):
            raise CouplingError(f"{path}: '{n.name}' of the hand-written neuron is read outside it")
        g.erase_node(n)
    topo_sort(g)


# ----------------------------------------------------------------------------------------------
# the reference model
# ----------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """The reference model, the original's parameters by name (taken before any site was
    replaced: a coupling holds its neuron under another path), and the log of its sites."""

    model: nn.Module
    params: Dict[str, Tensor]
    log: SiteLog
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def restart(self) -> None:
        """Before a run: every coupling from the reset state, the log empty."""
        self.log.clear()
        for m in self.model.modules():
            if isinstance(m, Coupling):
                m.reset()


@dataclass
class ConvertedSite:
    """One neuron site of a converted model: its path, kind (a, b, c; None when the model has no
    report) and the decision convert took."""

    path: str
    kind: Optional[str]
    decision: str


def converted_sites(candidate: nn.Module) -> List[ConvertedSite]:
    """Every site of converted model ``candidate``: its ``revpass_report``'s rows, or, without a
    report, its ReversibleNode modules (kind unknown). Read them from the model convert returned:
    a copy of it has no report."""
    report = getattr(candidate, "revpass_report", None)
    if report is not None:
        return [ConvertedSite(r.path, r.kind, r.decision) for r in report.rows]
    return [ConvertedSite(p, None, "reversible") for p, m in candidate.named_modules() if isinstance(m, ReversibleNode)]


def build_reference(
    original: nn.Module,
    sites: Sequence[ConvertedSite],
    example_inputs: Sequence[Any],
    concrete_args: Optional[Dict[str, Any]] = None,
) -> Reference:
    """The reference for a converted model whose sites are ``sites`` (:func:`converted_sites`):
    ``original`` (changed in place: pass a copy) with each reversible site replaced by its
    coupling (the module docstring). A site whose reference cannot be built is a problem, named
    with its path and what to do."""
    log = SiteLog()
    problems: List[str] = []
    notes: List[str] = []
    c_sites = [(s.path, s.kind) for s in sites if s.kind == "c" and s.decision == "reversible"]
    model = original
    if c_sites:  # hand-written neurons exist only as operations: the original, traced

        shapes = [tuple(t.shape) if isinstance(t, Tensor) else None for t in example_inputs]
        try:
            model = trace(original, concrete_args=concrete_args, time_steps=time_steps(tuple(example_inputs)),
                          input_shapes=shapes)
        except Exception as exc:  # noqa: BLE001 - reported
            problems.append(f"the original could not be traced for its hand-written neurons "
                            f"({', '.join(p for p, _ in c_sites)}): {exc}")
            return Reference(model, dict(model.named_parameters()), log, problems, notes)
    params = dict(model.named_parameters())
    for site in sites:
        path, kind = site.path, site.kind
        if kind == "c" or site.decision != "reversible":
            continue
        try:
            m = model.get_submodule(path)
        except AttributeError:
            m = None
        if isinstance(m, Node):
            notes.append(f"{path}: the original already holds a revpass node there; compared as it is")
            continue
        ad = adapter_for(m) if m is not None else None
        if ad is None or not ad.is_neuron(m):
            what = "no module" if m is None else f"a {type(m).__name__}, not a neuron revpass knows"
            hint = (" (a hand-written neuron is found only through the converted model's revpass_report)"
                    if kind is None else "")
            problems.append(f"{path}: the original has {what} at this path, so its reversible node has no "
                            f"reference{hint}; pass the model that convert was given")
            continue
        step = ad.step_mode(m) == "s"
        if step:
            log.per_step.add(path)
        set_module(model, path, Coupling(m, ad, path, 1 if step else 2, log))
    if c_sites:
        problems += _couple_patterns(model, [s for s in sites if s.kind == "c"], log)
    if isinstance(model, fx.GraphModule):
        model.graph.lint()
        model.recompile()
    invalidate_reset_caches(model)
    return Reference(model, params, log, problems, notes)


def _couple_patterns(gm: fx.GraphModule, rows: List[ConvertedSite], log: SiteLog) -> List[str]:
    """Couple every hand-written neuron converted reversibly (``rows``: the report's kind-c rows,
    in the order convert found them, which is the order find_pattern_sites finds them again)."""
    found = find_pattern_sites(gm, to_networkx(gm.graph))
    if len(found) != len(rows):
        return [f"the original's hand-written neurons ({len(found)}) are not the converted model's "
                f"({len(rows)} kind-c sites); pass the model that convert was given"]
    problems = []
    for i, (row, site) in enumerate(zip(rows, found)):
        if row.decision != "reversible":
            continue
        if row.path not in (site.path, f"{site.path}_revpass"):
            problems.append(f"{row.path}: the original's hand-written neuron in this position is at "
                            f"'{site.path}'; pass the model that convert was given")
            continue
        probe = f"revpass_reference_probe_{i}"
        gm.add_submodule(probe, _StepProbe(row.path, log))
        log.per_step.add(row.path)
        try:
            _couple_pattern(gm, site, row.path, probe)
        except CouplingError as exc:
            problems.append(str(exc))
    return problems
