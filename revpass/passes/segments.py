"""Recomputed segments: which layers to recompute in backward, found from the graph.

A neuron site with strategy ``"recompute"`` becomes an exact node at the end of a segment: the
node and the layers that feed it, back to the previous neurons' spikes, the graph's inputs, or a
value something outside the segment also reads. Inside a segment nothing is kept for backward;
the segment keeps its inputs, spikes as packed bits (:class:`revpass.nodes.segment.RecomputeSegment`).

How a segment is grown from its neuron node E: take E's producers, and theirs, stopping at
placeholders, parameters, neurons (revpass nodes or library neurons), state resets and other
segments; then drop, until none is left, any node that something outside the segment reads (its
value must exist outside, so it becomes an input). What remains is a connected piece of the
graph with one output, E's, and no side entrances. A segment grows through the exact nodes of
``joined`` sites (the planner's): their layers and its are then one segment, rebuilt together.

A layer left outside every segment that keeps bytes for backward and reads only spikes (a max
pool between two neurons, a linear layer after the last neuron) gets a segment of its own when
that keeps less than it did: its kept input becomes bits. A convolution, linear layer or max
pool reading values of 0s and 1s that are not spikes by construction keeps those bits checked at
every call instead (``checked_bits``; docs/method.md section 11), without running again. What it
kept is counted with storages it shares with other nodes (the steps of an unbound sequence share
one), since only when every reader of a storage lets go of it is it freed.

Which values are spikes is measured on the example inputs (every element 0 or 1); the segment
checks again at run time and keeps anything else as it is.
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import fx

from revpass import meta
from revpass.state import reset_states
from revpass.utils import as_tuple
from revpass.analysis.measure import measure
from revpass.analysis.workspace import node_key, segment_key, trained_bytes
from revpass.neurons import is_neuron
from revpass.nodes import Node
from revpass.nodes.segment import RecomputeSegment
from revpass.passes.graph import module_calls
from revpass.passes.spikes import keep_spike_inputs_as_bits, on_spikes, spike_values
from revpass.state import StateReset

_BOUNDARY_OPS = ("placeholder", "get_attr", "output")
PREFIX = "revpass_segment_"


def _opaque(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Nodes a segment never takes in: inputs, neurons, state resets, other segments."""
    if n.op in _BOUNDARY_OPS:
        return True
    if n.op != "call_module":
        return False
    if n.target in getattr(gm, "revpass_untraced", {}):  # kept whole: what runs inside is not known
        return True
    m = gm.get_submodule(n.target)
    return isinstance(m, (Node, StateReset, RecomputeSegment)) or is_neuron(m)


def grow(gm: fx.GraphModule, end: fx.Node, taken: Set[fx.Node], tensors: Set[str], through: Set[fx.Node] = frozenset()
         ) -> Optional[List[fx.Node]]:
    """The segment ending at ``end`` (see the module docstring), in graph order, or None when
    ``end`` itself reads a value that is not a tensor (a tuple of states). ``tensors``: the names
    of the nodes whose value is a tensor; a segment's inputs must be tensors (or hold none), so
    that gradients reach them. ``through``: exact nodes it grows through (joined segments' ends)."""
    if any(a.name not in tensors for a in end.all_input_nodes):
        return None
    members = {end}
    stack = list(end.all_input_nodes)
    while stack:
        u = stack.pop()
        if u in members or u in taken or (_opaque(gm, u) and u not in through):
            continue
        members.add(u)
        stack.extend(u.all_input_nodes)
    changed = True
    while changed:
        changed = False
        for u in list(members):
            if u is not end and (any(v not in members for v in u.users)
                                 or any(a not in members and a.name not in tensors for a in u.all_input_nodes)):
                members.discard(u)
                changed = True
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(members, key=order.__getitem__)


def extend(gm: fx.GraphModule, members: List[fx.Node], taken: Set[fx.Node], mem) -> List[fx.Node]:
    """``members`` and the layers after its end that only shrink it: while the end's one reader
    reads nothing else, has no parameters and gives fewer elements (a pooling of the spikes), it
    joins, so that the segment returns (and its backward receives the gradient of) the smaller
    value. The next segment grows back to it and keeps it as bits."""
    end = members[-1]
    while len(end.users) == 1:
        u = next(iter(end.users))
        size = [mem.get(x.name) for x in (end, u)]
        if (u in taken or _opaque(gm, u) or u.all_input_nodes != [end] or any(m is None or not m.shape for m in size)
                or math.prod(size[1].shape) >= math.prod(size[0].shape)):
            break
        if u.op == "call_module" and any(True for _ in gm.get_submodule(u.target).parameters()):
            break
        members, end = members + [u], u
    return members


def _inputs(members: Sequence[fx.Node]) -> List[fx.Node]:
    inside, out = set(members), []
    for n in members:
        for a in n.all_input_nodes:
            if a not in inside and a not in out:
                out.append(a)
    return out


def _packed(numel: int) -> int:
    return (numel + 7) // 8


def form_segments(
    gm: fx.GraphModule,
    example_inputs: Sequence,
    ends: Set[str],
    *,
    singles: bool = True,
    joined: Set[str] = frozenset(),
    checks: Optional[Dict[tuple, tuple]] = None,
    checked_bits: Optional[Set[str]] = None,
    measured: Optional[Dict[tuple, dict]] = None,
) -> List[Tuple[str, List[str]]]:
    """Replace the segments ending at the call_module nodes whose target is in ``ends`` (exact
    nodes) by :class:`RecomputeSegment` calls; with ``singles``, also wrap the layers that read
    only spikes and keep more than their inputs as bits. The segment of an end in ``joined`` is
    part of the segment that reads its output, where that is the only reader (else it has its
    own): one rebuild of both layers, whose gradient between them exists a chunk at a time.
    ``checks``: a memo of chunk checks (:func:`_try_chunks`) shared by conversions of one trace
    with the same parameters (the planner's). ``checked_bits``: a set that, given, takes instead
    of a segment the calls of a convolution, linear layer or max pool whose input is 0 or 1 on
    the example inputs without being spikes by construction (the node names; the bits pass keeps
    their inputs as bits, checked at every call: the same bytes, without running them again).
    ``measured``: a memo of the graph's measurement (:func:`_graph_key`) shared as ``checks`` is
    (the planner's conversions of one plan, each joining other segments, measure the same graph).
    Returns [(segment name, sites)]."""
    key = None if measured is None else _graph_key(gm)
    mem = measured.get(key) if key is not None else None
    if mem is None:
        mem = measure(gm, example_inputs, detail=False)  # shapes, spikes and kept bytes
        if key is not None:
            measured[key] = mem
    binary = {name: m.binary for name, m in mem.items()}
    tensors = {name for name, m in mem.items() if m.shape is not None}
    taken: Set[fx.Node] = set()
    groups: List[Tuple[List[fx.Node], List[str]]] = []
    ends_run = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in ends and n.name in mem]
    candidates = [n for n in ends_run if mem[n.name].shape is not None]
    report = getattr(gm, "revpass_report", None)
    # a neuron returning (spikes, state), as norse's do: a segment ends at one tensor
    unformed = dict.fromkeys(n.target for n in ends_run if mem[n.name].shape is None)
    for target in unformed if report is not None else ():
        report.by_path(target).reason += ("; not recomputed: a recomputed segment ends at one tensor, and its "
                                          "output is not one (a neuron that returns its state too); it runs as an "
                                          "exact node")
    through = {n for n in candidates if n.target in joined}
    # the joined ends first wait for the segment that reads them; any not taken then has its own
    for n in [n for n in candidates if n not in through] + [n for n in candidates if n in through]:
        if n in taken:
            continue
        members = grow(gm, n, taken, tensors, through - {n})
        if members is not None:
            members = extend(gm, members, taken, mem)
        if members is None:
            if report is not None:
                report.by_path(n.target).reason += "; not recomputed: it reads a value that is not a tensor"
            continue
        taken.update(members)
        groups.append((members, [u.target for u in members if u in through or u is n]))
    spikes = spike_values(gm)  # kept up to date as segments replace their ends (_replace)
    calls = module_calls(gm)

    def bits_instead(n: fx.Node) -> bool:  # every call of its layer reads one value of 0s and 1s
        return (checked_bits is not None and n.op == "call_module" and on_spikes(gm.get_submodule(n.target))
                and all(len(c.args) == 1 and not c.kwargs and isinstance(c.args[0], fx.Node) and c not in taken
                        and (c.args[0] in spikes or binary.get(c.args[0].name)) for c in calls[n.target]))

    if singles:
        for n in list(gm.graph.nodes):
            m = mem.get(n.name)
            if n in taken or _opaque(gm, n) or m is None or not m.own_bytes or m.shape is None:
                continue
            if (n.op == "call_module" and on_spikes(gm.get_submodule(n.target)) and n.args
                    and all(a in spikes for a in n.all_input_nodes)):
                continue  # keeps its input as bits in its own backward, without running again (passes/spikes.py)
            ins = n.all_input_nodes
            if not ins or not all(a.name in tensors and binary.get(a.name) for a in ins):
                continue
            packed = sum(_packed(math.prod(mem[a.name].shape)) for a in ins)
            if packed < m.own_bytes and bits_instead(n):
                checked_bits.add(n.name)  # the same bits in its own backward, without running again
            elif packed < m.own_bytes:
                taken.add(n)
                groups.append(([n], []))
    out = []
    per_sample = {}
    for k, (members, sites) in enumerate(groups):
        name = _replace(gm, members, sites, k, mem, spikes)
        out.append((name, sites))
        for site in sites if report is not None else ():
            row = report.by_path(site)
            row.reason += (f"; exact node ending {name}, recomputed in backward" if site == sites[-1] else
                           f"; exact node inside {name}, recomputed in backward (its segment joined to the one "
                           "that reads it: the gradient between them exists a chunk at a time)")
        if sites:  # the largest value's elements per sample of a (T, B, ...) sequence
            shapes = [mem[n.name].shape for n in members if mem.get(n.name) and mem[n.name].shape]
            per_sample[name] = max((math.prod(s) // s[1] for s in shapes if len(s) >= 2 and s[1]), default=0)
    gm.graph.lint()
    gm.recompile()
    if per_sample and example_inputs is not None:
        _try_chunks(gm, example_inputs, per_sample, {name: sites for name, sites in out}, checks)
    return out


def _graph_key(gm: fx.GraphModule) -> tuple:
    """What measuring ``gm`` on the planner's example inputs depends on, for conversions of one
    trace (they share its parameters): its code, and each module it calls, by its type, its
    configuration and its parameters (a revpass node by revpass.analysis.workspace's key)."""
    parts = [gm.code]
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            parts.append((n.target, node_key(m, (), "") if isinstance(m, Node) else
                          (type(m).__qualname__, m.extra_repr(), m.training),
                          tuple(id(p) for p in m.parameters())))
    return tuple(parts)


class _Checked(Exception):
    """Every segment's chunks are checked: the probe's run stops there."""


def _try_chunks(gm: fx.GraphModule, example_inputs: Sequence, per_sample: Dict[str, int],
                sites: Dict[str, List[str]], checks: Optional[Dict[tuple, tuple]] = None) -> None:
    """Let each segment rebuild a chunk of the batch at a time where, on the example inputs, the
    chunks reproduce its forward (RecomputeSegment.try_chunks); the report says which do. With
    ``checks``, a check is looked up there by the segment's layers (their structure: the
    parameters are the same objects in every conversion that shares the memo) and the exact
    bytes of its inputs, and remembered there. The example inputs run through the model as far
    as its last segment; a segment whose parameters outweigh its activations (:func:`_outweighed`)
    is not checked."""
    report = getattr(gm, "revpass_report", None)
    left = set(per_sample)  # the run stops after the last of them: what follows is not needed

    class Probe(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            out = super().call_module(target, args, kwargs)
            if target in left:
                left.discard(target)
                seg = gm.get_submodule(target)
                why = _outweighed(seg, args, per_sample[target])
                if why is None:
                    key = None if checks is None else _check_key(seg, args)
                    why = seg.try_chunks(args, per_sample[target], checks.get(key) if key is not None else None)
                    if key is not None:
                        checks[key] = (why, seg.in_time)
                for site in sites[target] if report is not None else ():
                    report.by_path(site).reason += ("; can be rebuilt a chunk of the batch at a time (docs/method.md "
                                                    "section 13)" if why is None else f"; rebuilt whole: {why}")
                if not left:
                    raise _Checked
            return out

    buffers = [(b, b.clone()) for b in gm.buffers()]
    reset_states(gm)
    try:
        cuda = sorted({p.device.index or 0 for p in gm.parameters() if p.is_cuda})
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            Probe(gm).run(*as_tuple(example_inputs))
    except _Checked:
        pass
    finally:
        reset_states(gm)
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)


#: a whole rebuild's workspace, measured on the zoo's networks, is at most about twice its layers'
#: count times its largest value (the activations and their gradients); chunks are not checked
#: where the parameters' gradients are more than twice that again
OUTWEIGHED = 4


def _outweighed(seg: RecomputeSegment, args, sample_elems: int) -> Optional[str]:
    """Why chunks cannot lower ``seg``'s rebuild, or None where they may. A chunked rebuild holds
    a chunk's parameter gradients beside their sum so far: it never needs less than those bytes
    (revpass.planning.peak.refine_where_it_sets_the_peak does not chunk such a segment). Where
    they are more than :data:`OUTWEIGHED` times its layers' count times its largest value over
    the batch, no chunking can lower it, and the chunks are not checked (a check runs the
    segment a sample at a time: for a VGG classifier's 400 MB weight, a second of CPU)."""
    x = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
    if x is None:
        return None
    grads = trained_bytes(seg)
    layers = sum(1 for n in seg.body.graph.nodes if n.op in ("call_module", "call_function", "call_method"))
    largest = sample_elems * x.shape[1] * x.element_size()
    if grads <= OUTWEIGHED * layers * largest:
        return None
    return (f"its parameters' gradients ({grads / 2**20:.2f} MiB) outweigh its activations ({largest / 2**20:.2f} "
            "MiB the largest), and a rebuild in chunks holds a chunk's parameter gradients beside their sum")


def _check_key(seg: RecomputeSegment, args) -> Optional[tuple]:
    """What a segment's chunk check depends on besides its parameters: its layers
    (revpass.analysis.workspace's key of them) and its inputs, each tensor by a digest of its
    bytes (None where an input is not a tensor or a plain value)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(not isinstance(a, (torch.Tensor, int, float, bool, type(None))) for a in args) or not tensors:
        return None
    digests = []
    for a in args:
        if isinstance(a, torch.Tensor):
            data = a.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            digests.append((tuple(a.shape), str(a.dtype), str(a.device), hashlib.blake2b(data).hexdigest()))
        else:
            digests.append(repr(a))
    device = tensors[0].device
    return segment_key(seg, [(tuple(t.shape), t.dtype, False) for t in tensors], device), tuple(digests)


def _replace(gm: fx.GraphModule, members: List[fx.Node], sites: List[str], k: int, mem, spikes: Set[fx.Node]) -> str:
    """Put a RecomputeSegment of ``members`` in their place; ``spikes`` (the graph's spike values)
    gains the segment's call where its end was one."""
    g = gm.graph
    end = members[-1]
    ins = _inputs(members)
    sub = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for a in ins:
        env[a] = sub.placeholder(a.name)
    for n in members:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[end])
    body = fx.GraphModule(gm, sub, class_name="RevpassSegmentBody")
    # its layers on spikes keep them as bits in the rebuild too (in the body's own module tree: the
    # model's modules are not replaced), the segment's inputs that are spikes by construction included
    keep_spike_inputs_as_bits(body, {env[a] for a in ins if a in spikes})
    name = f"{PREFIX}{k}"
    while hasattr(gm, name):
        name += "_"
    seg = RecomputeSegment(body, name=name, sites=tuple(sites))
    setattr(gm, name, seg)
    with g.inserting_before(end):
        call = g.call_module(name, tuple(ins))
    meta.set_replaces(call, [r for n in members for r in meta.replaces(n)])
    carried = [n for n in members if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Node)
               and gm.get_submodule(n.target).carry_state]
    if all(mem.get(n.name) and mem[n.name].shape for n in carried):
        seg.state_bytes = sum(math.prod(mem[n.name].shape[1:]) * getattr(torch, mem[n.name].dtype).itemsize
                              for n in carried)
    modules = [str(n.target) for n in members if n.op == "call_module"]
    what = " -> ".join(modules) if modules else ", ".join(str(getattr(n.target, "__name__", n.target))
                                                          for n in members)
    meta.set_strategy(
        call,
        "recompute",
        f"recomputed in backward ({what}); keeps its inputs, spikes as bits"
        + (f"; ends at {', '.join(sites)} (exact node)" if sites else ""),
    )
    end.replace_all_uses_with(call)
    if end in spikes:
        spikes.add(call)
    for n in reversed(members):
        g.erase_node(n)
    return name

