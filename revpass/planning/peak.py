"""The estimated peak of a training step, from an annotated graph, and the backward slices
that keep it low (docs/memory.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import fx

from revpass import meta
from revpass.analysis.workspace import node_workspace, trained_bytes
from revpass.neurons import is_neuron
from revpass.nodes import Node
from revpass.nodes.segment import RecomputeSegment
from revpass.nodes.spike_input import LayerOnSpikes
from revpass.nodes.chunks import CHUNK_ELEMS, CHUNKS_MAX
from revpass.nodes.slicing import CHUNK_MIN_ELEMS_FINE, chunks

#: how many finer settings :func:`refine_where_it_sets_the_peak` measures past one that does not
#: lower a backward's workspace before it leaves that backward as it is
LOOK_AHEAD = 2

def _bytes(info) -> int:
    shape = info.get("shape") if info else None
    if not shape:
        return 0
    return math.prod(shape) * getattr(torch, info["dtype"]).itemsize


def estimate_peak(gm, where: Optional[list] = None, with_grads: bool = False) -> Union[int, Tuple[int, int]]:
    """Estimated peak of one training step's memory beyond parameters, gradients, buffers and
    optimizer state (activations plus temporaries), from an annotated GraphModule, without running
    a backward. The model of a training step:

    * the inputs are held throughout; in the forward, a module call holds what the nodes before
      it keep, the values it reads, and at its own peak ``forward_bytes`` more (measured: a
      recomputed segment runs its layers whole there); at the end of the forward, every node's
      kept bytes are held, and each stateful neuron keeps its final state (one step of its output);
    * the backward visits the nodes in reverse; at a node it holds the gradients of its output
      and inputs (and, for a recomputed segment, its rebuilt layers: ``workspace_bytes``), and
      the gradients of values with several readers accumulate until their producer is reached;
      after it, the node's kept bytes are freed and its module's parameter gradients exist;
    * the peak is where parameters' gradients plus held activations and temporaries are largest
      (deep layers hold most parameters, early ones most activations); the figure is the
      activations and temporaries there, which is what MemTracker's peak less parameters,
      gradients, buffers and optimizer state measures.

    ``where``: a list the node at the peak is appended to (None: in the forward or at its end).
    ``with_grads``: (the figure with the parameters' gradients that exist there, the figure): the
    first is the step's whole peak less parameters, buffers and optimizer state, what a change
    must lower to lower the peak (the figure without them can rise when the peak moves to where
    fewer exist).
    """
    return _sweep(_items(gm), where, with_grads)


@dataclass(frozen=True)
class _Item:
    """One node of a training step as the estimate sees it (:func:`estimate_peak`)."""

    node: fx.Node
    key: str  # the value it makes, by its name in the unconverted graph (the same in every conversion)
    kept: int  # bytes kept for backward
    out: int  # bytes of its output
    reads: Tuple[Tuple[str, int, bool], ...]  # the activations it reads: (key, bytes, read by several)
    call: bool  # a module call
    workspace: int
    grads: Tuple[Tuple[Any, int], ...]  # (identity, bytes) of the parameters' gradients its backward makes
    held: int  # bytes held from the forward to the end: an input, a neuron's final state
    forward: int  # the most its forward holds at once beyond what existed before it


def _items(gm) -> List[_Item]:
    """The annotated graph's nodes in forward order, as the estimate's items."""
    nodes = sorted((n for n in gm.graph.nodes if (meta.info(n) or {}).get("forward_step") is not None),
                   key=lambda n: meta.info(n)["forward_step"])
    no_grad = getattr(gm, "revpass_inputs_without_grad", ())  # example inputs: no gradient made for them
    stateful, out = set(), []
    for n in nodes:
        info = meta.info(n)
        held = 0
        if n.op == "placeholder":  # the step's inputs exist throughout (MemTracker counts them too)
            held = _bytes(info)
        grads = []
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            grads = [((id(gm), n.target), trained_bytes(m))]
            if n.target not in stateful:
                if isinstance(m, RecomputeSegment):  # its neurons carry their states: one step of each output
                    carries = m.state_bytes is None and any(isinstance(x, Node) and x.carry_state
                                                            for x in m.body.modules())
                    if m.state_bytes is not None:
                        stateful.add(n.target)
                        held = m.state_bytes
                else:
                    carries = m.carry_state if isinstance(m, Node) else is_neuron(m)
                if carries and info["shape"]:
                    stateful.add(n.target)
                    held = _bytes(info) // info["shape"][0]  # one step of its output
        # a parameter read with get_attr is no activation: its gradient counts with the parameters'
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                owner, _, attr = a.target.rpartition(".")
                t = getattr(gm.get_submodule(owner), attr)
                if isinstance(t, torch.nn.Parameter) and t.requires_grad:
                    grads.append(((id(gm), a.target), t.numel() * t.element_size()))
        reads = tuple((_key(a), _bytes(meta.info(a)), len(a.users) > 1) for a in n.all_input_nodes
                      if a.op != "get_attr" and (meta.info(a) or {}).get("shape") and a.name not in no_grad)
        out.append(_Item(n, _key(n), info["kept_bytes"], _bytes(info), reads, n.op == "call_module",
                         info.get("workspace_bytes") or 0, tuple(grads), held, info.get("forward_bytes") or 0))
    return out


def _key(n: fx.Node) -> str:
    return meta.replaces(n)[-1]  # a segment's or a folded node's value is its last node's


def _sweep(items: List[_Item], where: Optional[list], with_grads: bool):
    # the forward: at each module call, what earlier nodes keep and hold, the values it reads, and
    # what its own forward holds at its peak (no parameter gradients exist yet)
    best, held = 0, 0
    for it in items:
        if it.forward:
            best = max(best, held + sum(b for _, b, _ in it.reads) + it.forward)
        held += it.kept + it.held
    best = best_total = max(best, held)  # then at the end of the forward
    at = None
    grads = 0
    seen = set()
    pending: Dict[str, int] = {}  # gradients of multi-reader values, accumulating until their producer runs
    for it in reversed(items):
        pending.pop(it.key, None)
        temp = 0
        if it.kept or it.call:
            temp = it.out + sum(b for _, b, _ in it.reads)
        temp += it.workspace  # a recomputed segment's layers, rebuilt for its backward
        temp += sum(pending.values())
        for key, b, several in it.reads:
            if several:
                pending[key] = b
        for ident, b in it.grads:
            if ident not in seen:
                seen.add(ident)
                grads += b
        if grads + held + temp > best_total:
            best_total, best, at = grads + held + temp, held + temp, it.node
        held -= it.kept
    if where is not None:
        where.append(at)
    return (best_total, best) if with_grads else best


class PlanEstimate:
    """The estimated peak (:func:`estimate_peak`) of any choice of strategies per site, from
    conversions with one strategy at every site (the planner's probes, annotated), without
    converting again: the nodes of the ``base`` probe (recompute: its segments are the coarsest
    regions), where a segment ends at sites chosen otherwise the nodes of that strategy's probe
    that stand for the same nodes of the unconverted graph (``meta.replaces``). Values are matched
    across probes by those names. What a real conversion of the choice would change at the
    regions' borders (a max pool joining a segment or not) is not modelled: the planner checks
    the chosen conversion's own estimate."""

    def __init__(self, probes: Dict[str, fx.GraphModule], base: str = "recompute"):
        self.base = base
        self._regions: List[Tuple[_Item, Tuple[str, ...], Dict[str, List[_Item]]]] = []
        items = {s: _items(g) for s, g in probes.items()}
        gm = probes[base]
        for it in items[base]:
            m = gm.get_submodule(it.node.target) if it.call else None
            if isinstance(m, RecomputeSegment):
                region = set(meta.replaces(it.node))
                self._regions.append((it, m.sites, {s: [x for x in xs if x.key in region]
                                                    for s, xs in items.items() if s != base}))
            elif isinstance(m, LayerOnSpikes) and m.checked:  # instead of a segment of its own (the same rule)
                self._regions.append((it, (), {s: [x for x in xs if x.key == it.key]
                                               for s, xs in items.items() if s != base}))
            else:
                self._regions.append((it, None, {}))

    def items(self, choice: Dict[str, Optional[str]]) -> List[_Item]:
        out: List[_Item] = []
        any_base = self.base in choice.values()
        for it, sites, others in self._regions:
            if sites is None:  # no segment here
                out.append(it)
                continue
            # a layer on spikes recomputed alone (no site), or keeping its checked bits instead, is
            # one only when some site is recomputed
            chosen = {choice.get(s, self.base) for s in sites} if sites else {self.base if any_base else "exact"}
            if self.base in chosen:
                out.append(it)
                continue
            s = chosen.pop() if len(chosen) == 1 else None
            out.extend(others.get(s) or others.get("exact") or [it])  # unchanged: as the exact node
        return out

    def __call__(self, choice: Dict[str, Optional[str]], with_grads: bool = False):
        return _sweep(self.items(choice), None, with_grads)

    def kept(self, choice: Dict[str, Optional[str]]) -> int:
        """Bytes the choice keeps for backward at the end of the forward."""
        return sum(it.kept for it in self.items(choice))


def slice_where_it_sets_the_peak(gm, tolerance: float = 0.05) -> Dict[str, int]:
    """Give backward slices (revpass.nodes.slicing) to the nodes of an annotated converted model
    whose transient would set the peak of a training step, and only as many as it takes.

    Slices bound a node's backward transient (the PyTorch path's records and factors) to a
    fraction of it, at the price of more, smaller kernel launches: a converted model runs fastest
    unsliced, and lowest with every node in CHUNK_MAX slices. This keeps the estimated peak
    (:func:`estimate_peak`) within ``tolerance`` of the latter's with the fewest slices:
    starting unsliced, it doubles the slices of the node whose doubling lowers the estimate most
    (where none does alone, of the one whose workspace falls most), until the estimate is within
    bounds. A node's workspace in k slices is interpolated between
    its measured whole and finest workspaces (the records scale with the slice, the rest does
    not), and measured again once chosen. Returns {node path: slices} for the nodes it sliced."""
    groups: Dict[str, list] = {}
    for n in gm.graph.nodes:
        info = meta.info(n) or {}
        if n.op == "call_module" and info.get("workspace_bytes") and info.get("shape"):
            m = gm.get_submodule(n.target)
            if isinstance(m, Node) and m.slice_min_elems is None:
                groups.setdefault(n.target, []).append(n)

    def measure(m, ns):
        return [node_workspace(m, meta.info(n)["shape"], getattr(torch, meta.info(n)["dtype"])) for n in ns]

    whole, finest, most = {}, {}, {}
    for target, ns in groups.items():
        m = gm.get_submodule(target)
        plan = chunks(meta.info(ns[0])["shape"], m.params(), CHUNK_MIN_ELEMS_FINE)
        if plan is None:
            continue
        most[target] = len(plan[1])
        whole[target] = [meta.info(n)["workspace_bytes"] for n in ns]
        m.set_slicing(CHUNK_MIN_ELEMS_FINE)
        finest[target] = measure(m, ns)
        m.set_slicing(None)

    def set_ws(target, k):
        for i, n in enumerate(groups[target]):
            w, f, K = whole[target][i], finest[target][i], most[target]
            var = max(0.0, (w - f) * K / (K - 1))  # ws(k) = fixed + var / k through both measurements
            meta.info(n)["workspace_bytes"] = int(w - var + var / k)

    for target in most:
        set_ws(target, most[target])
    bound = estimate_peak(gm) * (1 + tolerance)
    k = {target: 1 for target in most}
    for target in most:
        set_ws(target, 1)
    peak = estimate_peak(gm)
    while peak > bound:
        best = None  # (estimate, -workspace saved, target): the lowest estimate, then the most saved
        for target in most:
            if k[target] >= most[target]:
                continue
            before = sum(meta.info(n)["workspace_bytes"] for n in groups[target])
            set_ws(target, min(2 * k[target], most[target]))
            trial = (estimate_peak(gm), sum(meta.info(n)["workspace_bytes"] for n in groups[target]) - before,
                     target)
            set_ws(target, k[target])
            best = trial if best is None or trial[:2] < best[:2] else best
        if best is None:
            break
        peak, _, target = best
        k[target] = min(2 * k[target], most[target])
        set_ws(target, k[target])
    sliced = {}
    for target, n_slices in k.items():
        if n_slices == 1:
            continue
        m = gm.get_submodule(target)
        per_step = math.prod(meta.info(groups[target][0])["shape"][1:])
        m.set_slicing(-(-per_step // n_slices) if n_slices < most[target] else CHUNK_MIN_ELEMS_FINE)
        for n, w in zip(groups[target], measure(m, groups[target])):
            meta.update(n, workspace_bytes=w)
        sliced[target] = n_slices
    return sliced


def refine_where_it_sets_the_peak(gm, tolerance: float = 0.05, budget: Optional[int] = None,
                                  give_up: Optional[Tuple[str, float]] = None) -> Dict[str, Tuple[int, ...]]:
    """Rebuild in smaller pieces whatever backward sets the estimated peak, and only as finely as
    it takes: a recomputed segment's rebuild in chunks of the batch (revpass/nodes/chunks.py), a
    node's backward in slices (revpass.nodes.slicing), for those that can.

    Chunks bound a segment's rebuild to a part of the batch, at the price of running its layers
    twice more on fewer samples (two passes) and more, smaller kernels; a chunk smaller than a
    sample is a part of its time steps, and costs a third run of the steps before it (the
    neurons' states at its start). Slices bound a node's backward transient the same way, at the
    price of more launches. Starting from the conversion as it is (segments unchunked, nodes as
    :func:`slice_where_it_sets_the_peak` left them), this refines what sets the estimated peak:
    a segment's chunk halves (its samples, down to one, then that sample's steps), a node's
    slices double, its workspace measured at the new size, as long as the peak is at one that
    can and its workspace falls at that size or one of the next LOOK_AHEAD; then it takes the
    first point on that path within ``tolerance`` (of the figure) of its lowest estimate (the
    whole estimate, parameters' gradients included: the activations alone can rise when the peak
    moves deeper). With a ``budget`` (bytes of the estimated peak, :func:`estimate_peak`: a
    revpass.Peak budget), it stops at the first point that fits it, fewer pieces costing less
    time; where none does, the rule above. With ``give_up`` (a site, bytes: the planner's trial
    of a joined segment, and the whole estimate of the plan without that join), it first bounds
    the whole estimate any refinement could reach (:func:`_lowest_reachable`) and, where that is not below,
    refines nothing and sets ``gm.revpass_reachable`` to the bound. Deeper layers hold few
    activations, so the peak moves among a few early layers, and each refinement is measured
    once. A segment runs in at most revpass.nodes.chunks.CHUNKS_MAX chunks of at least
    CHUNK_ELEMS elements of its largest value (2^12 on the CPU, 2^22 on a GPU: more, smaller
    ones cost launches and passes more than they save). The workspace need not fall: a chunk's
    parameter gradients exist beside their sum so far, so a deep layer, whose weights outweigh
    its activations, needs more in chunks than whole. Returns {segment: (samples, steps) per
    chunk, node: (slices,)} for what it refined."""
    from revpass.analysis.workspace import kept_in_chunks, workspace
    from revpass.passes.spikes import spike_values

    spikes = None
    calls: Dict[str, list] = {}  # target -> its calls
    whole: Dict[str, Tuple[int, ...]] = {}  # target -> its coarsest setting: (B, T) or (slices,)
    ws: Dict[str, Dict[Tuple[int, ...], List[int]]] = {}  # target -> setting -> its calls' workspaces
    most: Dict[str, int] = {}  # a node's slices at the finest
    # a segment's kept bytes as annotated (unchunked), and what its forward keeps more in chunks
    # (the neurons' spikes as bits, the batch norms' statistics)
    kept: Dict[str, int] = {}
    in_chunks: Dict[str, int] = {}
    for n in gm.graph.nodes:
        info = meta.info(n) or {}
        if not (n.op == "call_module" and info.get("shape") and len(info["shape"]) >= 2
                and info.get("workspace_bytes") is not None):
            continue
        m = gm.get_submodule(n.target)
        if n.target in calls:
            calls[n.target].append(n)
        elif (isinstance(m, RecomputeSegment) and m.chunking is not None
              and (info["shape"][1] >= 2 or m.in_time and info["shape"][0] >= 2)
              and all(isinstance(a, fx.Node) and (meta.info(a) or {}).get("shape") for a in n.args)):
            calls[n.target], whole[n.target] = [n], (info["shape"][1], info["shape"][0])
            m.chunk_elems = m.chunk_elems_of(*whole[n.target])  # unchunked, as annotated
            kept[n.target] = info["kept_bytes"]
        elif isinstance(m, Node) and info.get("workspace_bytes"):
            plan = chunks(info["shape"], m.params(), CHUNK_MIN_ELEMS_FINE)
            if plan is None or len(plan[1]) < 2:
                continue
            most[n.target] = len(plan[1])
            k = most[n.target] if m.slice_min_elems == CHUNK_MIN_ELEMS_FINE else (
                1 if m.slice_min_elems is None else -(-math.prod(info["shape"][1:]) // m.slice_min_elems))
            calls[n.target], whole[n.target] = [n], (min(k, most[n.target]),)
    for target, ns in calls.items():
        ws[target] = {whole[target]: [meta.info(n)["workspace_bytes"] for n in ns]}

    def set_to(target: str, setting: Tuple[int, ...]) -> None:
        """``target`` in chunks or slices of ``setting``, its workspace measured on first use."""
        nonlocal spikes
        m, ns = gm.get_submodule(target), calls[target]
        if isinstance(m, RecomputeSegment):
            m.chunk_elems = m.chunk_elems_of(*setting)
        else:
            k, per_step = setting[0], math.prod(meta.info(ns[0])["shape"][1:])
            m.set_slicing(None if k == 1 else CHUNK_MIN_ELEMS_FINE if k >= most[target] else -(-per_step // k))
        if isinstance(m, RecomputeSegment) and (setting not in ws[target] or target not in in_chunks):
            spikes = spike_values(gm) if spikes is None else spikes
            ins = [(meta.info(a)["shape"], getattr(torch, meta.info(a)["dtype"]), a in spikes) for a in ns[0].args]
            if setting not in ws[target]:
                ws[target][setting] = [workspace(m, ins)]
            if setting != whole[target] and target not in in_chunks:
                in_chunks[target] = kept_in_chunks(m, ins)
        elif setting not in ws[target]:
            ws[target][setting] = [node_workspace(m, meta.info(n)["shape"], getattr(torch, meta.info(n)["dtype"]))
                                   for n in ns]
        for n, w in zip(ns, ws[target][setting]):
            meta.update(n, workspace_bytes=w)
            if isinstance(m, RecomputeSegment):
                meta.update(n, kept_bytes=kept[target] + (in_chunks[target] if setting != whole[target] else 0))

    def finer(target: str, now: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
        """The setting after ``now`` for ``target``: half a segment's samples, or at one sample
        half the steps (None past CHUNKS_MAX chunks or below CHUNK_ELEMS elements); twice a
        node's slices (None past its finest)."""
        m = gm.get_submodule(target)
        if not isinstance(m, RecomputeSegment):
            k = now[0]
            return (min(2 * k, most[target]),) if k < most[target] else None
        (B, T), (per, steps) = whole[target], now
        nxt = ((per + 1) // 2, steps) if per > 1 else (1, (steps + 1) // 2) if m.in_time and steps > 1 else None
        if nxt is None:
            return None
        dev = next((p.device.type for p in m.body.parameters()), "cpu")
        least = CHUNK_ELEMS.get(dev, CHUNK_ELEMS["cuda"])
        if -(-B // nxt[0]) * -(-T // nxt[1]) > CHUNKS_MAX or nxt[0] * nxt[1] * m.step_elems < least:
            return None
        return nxt

    # a segment rebuilt in two chunks or more holds a chunk's parameter gradients beside their sum
    # so far: its workspace is never below their bytes, and a setting is not measured to find that
    grads_of = {t: trained_bytes(gm.get_submodule(t)) for t in calls
                if isinstance(gm.get_submodule(t), RecomputeSegment)}
    setting = dict(whole)
    at: list = []
    if give_up is not None:
        site, above = give_up
        target = next((t for t in calls if site in getattr(gm.get_submodule(t), "sites", ())), None)
        if target is not None:
            finest = whole[target]
            while (nxt := finer(target, finest)) is not None:
                finest = nxt
            reachable = _lowest_reachable(gm, calls, target, set_to, finest, whole[target])
            if reachable >= above:
                gm.revpass_reachable = reachable
                return {}

    def point():  # (the whole estimated peak, parameters' gradients included; the figure without them)
        return (*estimate_peak(gm, at, with_grads=True), dict(setting))

    path = [point()]  # each refinement's estimates, fewest pieces first

    def fits() -> bool:
        return budget is not None and path[-1][1] <= budget

    while not fits() and at and at[-1] is not None and at[-1].target in setting:
        target = at[-1].target  # what sets the estimated peak: its backward in smaller pieces
        before, nxt = sum(ws[target][setting[target]]), finer(target, setting[target])
        # the next setting need not lower the workspace when a later one does (two chunks of
        # samples can hold more than the whole, each chunk's parameter gradients beside their
        # sum, where one sample's chunks hold less): up to LOOK_AHEAD settings are measured
        for _ in range(LOOK_AHEAD):
            if nxt is None or before <= grads_of.get(target, 0):
                nxt = None  # no setting can do better (the segment's chunks hold their parameters' gradients)
                break
            set_to(target, nxt)
            if sum(ws[target][nxt]) < before:
                break
            nxt = finer(target, nxt)
        else:
            nxt = None
        if nxt is None:  # finer does not help it: it stays as it was, and sets the peak
            set_to(target, setting[target])
            break
        setting[target] = nxt
        path.append(point())
    lowest = min(path, key=lambda p: p[0])
    # the fewest pieces within bounds, in the whole estimate and in the figure (small changes of
    # the whole, which the parameters' gradients dominate, can be large ones of the figure)
    chosen = path[-1][2] if fits() else next(
        p for t, f, p in path if t <= lowest[0] + tolerance * lowest[1] and f <= (1 + tolerance) * lowest[1])
    refined = {}
    report = getattr(gm, "revpass_report", None)
    for target, k in chosen.items():
        set_to(target, k)
        if k == whole[target]:
            continue
        refined[target] = k
        m = gm.get_submodule(target)
        if isinstance(m, RecomputeSegment):
            B, T = whole[target]
            what = (f"{k[0]} of {B} samples" if k[1] == T else
                    f"{k[1]} of {T} steps of {'one sample' if B > 1 else 'the sample'}")
            for site in m.sites if report is not None else ():
                report.by_path(site).reason += f"; its backward rebuilds {what} at a time"
    return refined


def _lowest_reachable(gm, calls: Dict[str, list], target: str, set_to: Callable[[str, Tuple[int, ...]], None],
                      finest: Tuple[int, ...], whole: Tuple[int, ...]) -> int:
    """A lower bound of the whole estimated peak (:func:`estimate_peak` with ``with_grads``: the
    parameters' gradients included) any refinement of ``gm`` could reach: ``target`` rebuilt in
    its finest chunks or whole, whichever is lower, and every other segment and node of ``calls``
    needing no workspace at all. Refining a segment only raises what it keeps (its spikes as
    bits, its batch norms' statistics) and the whole estimate never falls when a workspace rises
    (the figure without the gradients can: the peak moves to where other gradients exist,
    spiking_resnet18 at T = 32), so this holds wherever ``target``'s workspace is least in its
    finest chunks of all chunked settings (its activations' chunk shrinks; its parameters'
    gradients are held at any chunking: revpass.passes.segments._outweighed).
    ``set_to(target, setting)`` sets its chunks and annotates its measured workspace. The
    workspaces are left as they were, ``target`` whole."""
    others = [n for t, ns in calls.items() if t != target for n in ns]
    saved = [(n, meta.info(n)["workspace_bytes"]) for n in others]
    try:
        for n in others:
            meta.update(n, workspace_bytes=0)
        at_whole = estimate_peak(gm, with_grads=True)[0]
        set_to(target, finest)
        return min(at_whole, estimate_peak(gm, with_grads=True)[0])
    finally:
        set_to(target, whole)
        for n, w in saved:
            meta.update(n, workspace_bytes=w)
