"""The driver: ``revpass.convert`` and ``revpass.plan``.

``convert`` runs a fixed list of passes, each from a GraphModule to a result, with
``graph.lint()`` after every one (docs/convert.md):

    trace     the model (a copy, unless inplace) into a GraphModule         revpass/trace.py
    guards    a check of T where a time loop was unrolled over the example  passes/guards.py
    detect    its neuron sites: library, registered and hand-written ones   passes/detect.py, passes/patterns.py
    decide    every site's strategy and reason, before any is rewritten     passes/decide.py
    rewrite   a node at every decided site, single-step calls rolled        passes/rewrite.py, passes/roll.py
    fold      batch norms into the reversible nodes that read them          passes/fold.py
    segments  the layers before each "recompute" site, recomputed           passes/segments.py
    bits      layers that read an exact node's spikes keep them as bits     passes/spikes.py
    annotate  node.meta: measured memory, lifetimes, backward slices        analysis/, planning/peak.py

With ``budget=`` the driver converts the model once per strategy (probes), asks the planner
(planning/budget.py, pure functions over the annotated probes) for a strategy per site, and
converts once more with that plan.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import fx, nn

from revpass import meta
from revpass.analysis.annotate import annotate
from revpass.analysis.measure import site_shapes, trace_differs
from revpass.errors import ExampleInputError, RevpassError, RevpassWarning
from revpass.neurons import invalidate_reset_caches
from revpass.nodes import ExactNode
from revpass.nodes.slicing import CHUNK_MIN_ELEMS_FINE
from revpass.passes.decide import Planned, decide
from revpass.passes.detect import Site, find_sites
from revpass.passes.fold import fold_batch_norms
from revpass.passes.graph import to_networkx
from revpass.passes.guards import guard_time_steps
from revpass.passes.patterns import PatternSite, find_pattern_sites
from revpass.passes.rewrite import rewrite
from revpass.passes.segments import form_segments
from revpass.passes.spikes import keep_spike_inputs_as_bits
from revpass.passes.untraced import PART, settle, untraced_parts, untraced_sites
from revpass.planning.budget import (STRATEGIES, BudgetError, Peak, allowed, choose, join_candidate, site_savings,
                                     workspaces)
from revpass.planning.memory_plan import MemoryPlan, plan_of
from revpass.planning.peak import (PlanEstimate, estimate_peak, refine_where_it_sets_the_peak,
                                   slice_where_it_sets_the_peak)
from revpass.progress import Stages
from revpass.report import ConversionReport, SiteRow
from revpass.trace import TraceError, trace
from revpass.state import reset_states
from revpass.utils import as_tuple, safe_deepcopy, scratch_copy, time_steps

MODES = ("reversible", "exact", "recompute")
Patterns = Optional[Union[str, Iterable[str]]]


def convert(
    model: nn.Module,
    example_inputs: Optional[Union[torch.Tensor, Sequence[Any]]] = None,
    *,
    mode: str = "reversible",
    backward: str = "optimized",
    include: Patterns = None,
    exclude: Patterns = None,
    inplace: bool = False,
    concrete_args: Optional[dict] = None,
    budget: Optional[Union[int, str]] = None,
    progress: Union[bool, Callable[[str], None]] = False,
) -> fx.GraphModule:
    """Convert the spiking neurons of ``model`` into revpass nodes.

    Args:
        model: any SpikingJelly, snnTorch, norse or plain PyTorch SNN (not modified unless
            ``inplace``).
        example_inputs: optional inputs; with them the report gives each site's input shape and
            the graph is annotated with measured memory (revpass.plan).
        mode: ``"reversible"`` (memory-saving nodes; the network's function changes: train it as
            converted), ``"exact"`` (the original function bit for bit, for trained weights) or
            ``"recompute"`` (exact nodes, and the layers between neurons recomputed in backward
            from their spike inputs kept as bits; needs ``example_inputs``).
        backward: ``"optimized"``, ``"recompute"`` or ``"autograd"`` (see ReversibleNode).
        include, exclude: module-path patterns (fnmatch) selecting the sites to convert.
        inplace: convert ``model``'s own modules instead of a copy.
        concrete_args: forward arguments fixed while tracing (torch.fx's ``concrete_args``).
        budget: bytes of activations kept for backward at the end of the forward: the planner
            (revpass/planning/budget.py) chooses for each site between unchanged, exact,
            reversible and recompute to fit it at the least extra compute; ``revpass.Peak(bytes)``:
            a budget on the estimated peak of a training step, met at the least extra compute;
            or ``"min"``: the choice with the lowest estimated peak. Needs ``example_inputs``.
            ``mode`` says what the planner may choose: with ``"reversible"`` every strategy,
            with ``"exact"`` or ``"recompute"`` only those that keep the original function
            (exact and recomputed sites). A budget that cannot be met raises ``BudgetError`` with the
            smallest reachable figure.
        progress: say each of the planner's stages as it starts (with a budget: tracing, a
            conversion per strategy, the chosen plan, each segment join it tries), and the end,
            with the seconds since convert began: True, a line each on stderr; a callable, given
            each line. The planner converts the model several times: on a large model, minutes.

    Returns:
        A ``torch.fx.GraphModule`` that runs, trains and resets like the original, with
        ``.revpass_report`` listing every neuron site found, the decision and the reason.
    """
    if mode not in MODES:
        raise ValueError(f"convert: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if mode == "recompute" and example_inputs is None and budget is None:
        raise ValueError("convert: mode='recompute' needs example_inputs: the segments to recompute are "
                         "chosen from the spikes and bytes measured on them")
    options = _Options(mode=mode, backward=backward, include=include, exclude=exclude, inplace=inplace,
                       concrete_args=concrete_args)
    say = Stages(progress, "revpass.convert")
    if budget is not None:
        gm = _convert_within(model, example_inputs, budget, options, say)
    else:
        gm = _pipeline(model, example_inputs, options)
    say(f"done: {gm.revpass_report.count('unchanged')} of {len(gm.revpass_report.rows)} sites left unchanged")
    _warn_unchanged(gm.revpass_report)
    return gm


def _warn_unchanged(report: ConversionReport) -> None:
    """One warning per convert when neuron sites were left as they are (not already converted)."""
    left = [r for r in report.rows if r.decision == "unchanged" and not r.reason.startswith("already")]
    if report.untraced:
        warnings.warn(f"revpass.convert kept {len(report.untraced)} part(s) of the model whole, untraced "
                      f"({', '.join(p for p, _ in report.untraced[:3])}): inside them only multi-step neurons are "
                      "swapped for revpass nodes, nothing else converted; print(converted.revpass_report) says why",
                      RevpassWarning, stacklevel=3)
    if left:
        names = ", ".join(r.path for r in left[:3]) + (", ..." if len(left) > 3 else "")
        warnings.warn(f"revpass.convert left {len(left)} of {len(report.rows)} neuron sites unchanged ({names}); "
                      "print(converted.revpass_report) says why for each", RevpassWarning, stacklevel=3)


def plan(model: nn.Module, example_inputs: Sequence[Any], *, mode: str = "reversible", **kwargs) -> MemoryPlan:
    """The memory plan of converting ``model`` (a copy is converted and measured; ``model`` is
    not changed). Keyword arguments go to :func:`convert`."""
    if kwargs.get("inplace"):
        raise ValueError("plan never converts in place; call revpass.convert(..., inplace=True) for that")
    gm = convert(model, example_inputs, mode=mode, **kwargs)
    return plan_of(gm, gm.revpass_report.mode)  # the mode used: "budget='min'" with a budget


# ----------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------


@dataclass
class _Options:
    mode: str
    backward: str
    include: Patterns = None
    exclude: Patterns = None
    inplace: bool = False
    concrete_args: Optional[dict] = None
    planned: Optional[Planned] = None  # the budget planner's strategy per path (then mode is unused)
    fold_exact: bool = False  # batch norms fold into exact nodes too (under a budget: method.md section 12)
    collect: bool = True  # free each conversion's copies at once (the planner collects once, at its end)
    peak_budget: Optional[int] = None  # a Peak budget's bytes: segments and nodes in no smaller pieces than fit it
    joined: FrozenSet[str] = frozenset()  # sites whose recomputed segment joins the one reading it (the planner's)
    # (a site just joined, bytes): the planner's trial of that join, refined only where the whole
    # estimate, gradients included, could fall below those bytes (planning/peak.py
    # refine_where_it_sets_the_peak)
    give_up: Optional[Tuple[str, float]] = None


@dataclass
class _Traced:
    """A faithful trace of the model on the example inputs (:func:`_faithful_trace`) and what it
    keeps before conversion (:func:`_measured_before`), measured once: each of the planner's
    conversions converts a copy of it."""

    graph: fx.GraphModule
    shapes: Dict[str, tuple]
    prior: Dict[str, Any]  # revpass.analysis.measure of the graph before conversion
    peak_before: int  # its estimated peak
    # segments' chunk checks by their layers and input values (passes/segments.py): the same in
    # every conversion of this trace that forms the segment
    checks: Dict[tuple, tuple] = field(default_factory=dict)
    # the graphs before their segments form, measured (passes/segments.py): the same for every
    # conversion of one plan (the joins the planner tries)
    measured: Dict[tuple, dict] = field(default_factory=dict)

    @classmethod
    def of(cls, work: nn.Module, inputs: tuple, options: "_Options") -> "_Traced":
        graph, shapes = _faithful_trace(work, inputs, options)
        return cls(graph, shapes, *_measured_before(graph, inputs))


@dataclass
class _Run:
    """What the passes of one conversion share."""

    model: nn.Module  # the user's model (changed only with inplace)
    inputs: Optional[tuple]  # the example inputs, or None
    options: _Options
    # with inputs: what the traced graph keeps before conversion, measured, and its estimated peak
    prior: Optional[Dict[str, Any]] = None
    peak_before: Optional[int] = None
    shapes: Dict[str, tuple] = field(default_factory=dict)  # input shapes by site path / node name
    sites: List[Site] = field(default_factory=list)
    patterns: List[PatternSite] = field(default_factory=list)
    report: Optional[ConversionReport] = None
    checks: Optional[Dict[tuple, tuple]] = None  # the planner's memo of chunk checks (_Traced.checks)
    measured: Optional[Dict[tuple, dict]] = None  # and of graphs measured before segments (_Traced.measured)
    # layers whose input is 0/1 on the example inputs, not spikes by construction: bits, checked
    # at every call, instead of a segment of their own (passes/segments.py; node names)
    checked_bits: Set[str] = field(default_factory=set)


def _detect(gm: fx.GraphModule, run: _Run) -> List[Site]:
    run.sites = find_sites(gm) + untraced_sites(gm)  # and the neurons inside parts kept whole
    run.patterns = find_pattern_sites(gm, to_networkx(gm.graph))
    for site in run.sites:
        site.shape = run.shapes.get(site.path)
    return run.sites


def _decide(gm: fx.GraphModule, run: _Run) -> None:
    o = run.options
    planned = o.planned
    if planned is not None:
        # the planner weighs the graph's sites; a multi-step neuron inside a part kept whole has no
        # call in the graph, and is an exact node in every probe (settle): so in its plans too
        inside = {s.path: ("exact", "inside a part kept whole, an exact node as in each of the planner's probes")
                  for s in run.sites if s.details.get(PART) is not None and s.kind == "a"}
        planned = {**inside, **planned}
    decide(gm, run.sites, run.patterns, mode=None if planned is not None else o.mode, planned=planned,
           include=o.include, exclude=o.exclude)
    settle(run.sites)  # neurons inside parts kept whole: swapped, never recomputed


def _rewrite(gm: fx.GraphModule, run: _Run) -> ConversionReport:
    rewrite(gm, run.sites, run.patterns, run.options.backward,
            user_model=run.model if run.options.inplace else None)
    run.report = gm.revpass_report = _report(run.sites, run.patterns, run.shapes, run.options)
    run.report.untraced = untraced_parts(gm)
    return run.report


def _fold(gm: fx.GraphModule, run: _Run) -> List[str]:
    if run.options.inplace:  # the user's model calls its batch norms itself: no folding into nodes it shares
        return []
    recomputed = {r.path for r in run.report.rows if r.decision == "recompute"}  # segments fold nothing
    folded = fold_batch_norms(gm, exact=run.options.fold_exact, skip=recomputed)
    rows = {r.path: r for r in run.report.rows}
    for n in gm.graph.nodes:
        if meta.folded(n) is not None and n.target in rows:
            exact = isinstance(gm.get_submodule(n.target), ExactNode)
            rows[n.target].reason += (f"; folds batch norm '{meta.folded(n)}' (its input is not kept"
                                      + ("; its gradients are rebuilt within a rounding, docs/method.md section 12"
                                         if exact else "") + ": revpass/nodes/batchnorm.py)")
    return folded


def _segments(gm: fx.GraphModule, run: _Run) -> list:
    ends = {r.path for r in run.report.rows if r.decision == "recompute"}
    formed = []
    if ends:
        for path in ends:  # their transient adds to the segment's rebuilt layers: memory first
            gm.get_submodule(path).set_slicing(CHUNK_MIN_ELEMS_FINE)
        formed = form_segments(gm, run.inputs, ends, joined=run.options.joined, checks=run.checks,
                               checked_bits=run.checked_bits, measured=run.measured)
    invalidate_reset_caches(gm)  # the module tree changed under the frameworks' caches
    if run.options.inplace:
        invalidate_reset_caches(run.model)
    return formed


def _bits(gm: fx.GraphModule, run: _Run) -> List[str]:
    # after segments: a recomputed segment keeps its own bits
    return keep_spike_inputs_as_bits(gm, checked=[n for n in gm.graph.nodes if n.name in run.checked_bits])


def _annotate(gm: fx.GraphModule, run: _Run) -> None:
    if run.inputs is None:  # nothing measured: no annotations
        return
    annotate(gm, run.inputs, prior=run.prior)  # node.meta (revpass/meta.py): memory, strategy, lifetimes
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    gm.revpass_inputs_without_grad = {name for name, x in zip(placeholders, run.inputs)
                                      if not (isinstance(x, torch.Tensor) and x.requires_grad)}
    slice_where_it_sets_the_peak(gm)  # the nodes' backward transient, bounded where it matters
    # and whatever backward sets the peak then, segments' rebuilds included (under a Peak budget
    # no finer than it takes to fit: smaller pieces cost time)
    refine_where_it_sets_the_peak(gm, budget=run.options.peak_budget, give_up=run.options.give_up)
    gm.revpass_peak_before = run.peak_before  # the unconverted graph's, for revpass.plan
    if run.options.collect:
        gc.collect()  # GraphModules hold reference cycles: free the copy's tensors now


#: the passes after tracing, in order; each takes the GraphModule (and what the run shares)
PASSES = (("detect", _detect), ("decide", _decide), ("rewrite", _rewrite), ("fold", _fold),
          ("segments", _segments), ("bits", _bits), ("annotate", _annotate))


def _pipeline(model: nn.Module, example_inputs, options: _Options, traced: Optional[_Traced] = None
              ) -> fx.GraphModule:
    """trace, then :data:`PASSES` in order, ``graph.lint()`` after each (the module docstring).
    ``traced``: a faithful trace of ``model`` on these inputs, which a copy of is converted
    instead of tracing again (the planner's conversions; not in place)."""
    inputs = as_tuple(example_inputs) if example_inputs is not None else None
    run = _Run(model, inputs, options)
    if traced is not None and inputs is not None and not options.inplace:
        # the trace is the planner's own copy of the model, and only one of its conversions is
        # returned: they share its parameters (no pass writes them), and copy its buffers and
        # states (a run writes those). A large model's parameters take seconds to clone.
        gm = scratch_copy(traced.graph)
        run.shapes, run.prior, run.peak_before = dict(traced.shapes), traced.prior, traced.peak_before
        run.checks, run.measured = traced.checks, traced.measured
        for _, fn in PASSES:
            fn(gm, run)
            gm.graph.lint()
        return gm
    work = model if options.inplace else safe_deepcopy(model)
    if inputs is None:
        gm = trace(work, concrete_args=options.concrete_args, time_steps=time_steps(example_inputs))
        gm.graph.lint()
    else:
        gm, run.shapes = _faithful_trace(work, inputs, options)
        run.prior, run.peak_before = _measured_before(gm, inputs)
    for _, fn in PASSES:
        fn(gm, run)
        gm.graph.lint()
    return gm


def _measured_before(gm: fx.GraphModule, inputs: tuple) -> Tuple[Dict[str, Any], int]:
    """What the traced graph ``gm`` keeps before conversion (revpass.analysis.measure, by node
    name) and its estimated peak, measured on a scratch copy of it (the passes have not run)."""
    before = scratch_copy(gm)
    return annotate(before, inputs), estimate_peak(before)


def _faithful_trace(work: nn.Module, inputs: tuple, options: _Options):
    """Trace ``work`` into a graph that computes what it does on ``inputs`` (``trace_differs``),
    with its time-steps guard, and the shapes of a run of it (``site_shapes``).

    A trace can be wrong where Python looks at a traced value (``isinstance(out, tuple)`` on a
    module's output, an ``if`` on a value), or where a function ran once at trace time. Then the
    model is traced again with example values carried from the start (a module's tuple output is
    then a tuple), and if that is still wrong, the parts whose tracing makes it wrong are found
    and kept whole (:func:`_culprits`): convert never fails a whole model because one block does
    not trace. Only when no part explains it (the model's own forward) is it a TraceError."""
    def traced(leaves, with_values):
        gm = trace(work, concrete_args=options.concrete_args, time_steps=time_steps(inputs),
                   example_inputs=inputs, leaves=leaves, with_values=with_values)
        guard_time_steps(gm, inputs)  # a loop unrolled over the example's T runs at that T only
        gm.graph.lint()
        return gm

    def problem(gm):  # (None, shapes) when the graph is the model on the inputs, else (why, None)
        try:
            shapes = site_shapes(scratch_copy(gm), inputs)
        except ExampleInputError as exc:
            error = str(exc).split(": ", 1)[-1].rsplit(". Pass inputs", 1)[0]
            return f"fails on the example inputs, which the model itself runs: {error}", None
        why = trace_differs(work, gm, inputs)
        return (None, shapes) if why is None else (
            f"does not compute what the model does on the example inputs: {why}", None)

    def faithful(leaves):  # False also where the model does not trace with these parts kept whole
        gm = _or_none(traced, leaves, True)
        return gm is not None and problem(gm)[0] is None

    gm = traced({}, False)
    why, shapes = problem(gm)
    if why is None:
        return gm, shapes
    if why.startswith("fails") and not _runs(work, inputs):
        site_shapes(scratch_copy(gm), inputs)  # the model itself does not run: its own error
    first = why
    with_values = _or_none(traced, {}, True) or gm  # with example values: a leaf's tuple is a tuple
    why, shapes = problem(with_values)
    if why is None:
        return with_values, shapes
    leaves = _culprits(with_values, faithful, first.split(":", 1)[0])
    if leaves:
        gm = traced(leaves, True)
        why, shapes = problem(gm)
        if why is None:
            return gm, shapes
    raise TraceError(
        f"the traced graph of {type(work).__name__} {first}; keeping no part of it whole helps. Python "
        "code that looks at a traced value (isinstance(out, tuple) on a module's output, an if on a value) "
        "took one branch while tracing, or a function ran once at trace time (or read a traced value as a "
        "number); keep the module that does it whole with revpass.trace.register_leaf(ItsClass), or make "
        "the branch independent of the value")


def _or_none(fn, *args):
    """``fn(*args)``, or None where it raises a RevpassError."""
    try:
        return fn(*args)
    except RevpassError:
        return None


def _culprits(gm: fx.GraphModule, faithful, why: str) -> Dict[str, str]:
    """The fewest parts of the traced model, innermost where possible, that must be kept whole
    for its trace to be ``faithful(leaves)``; {} if none does. Top down: all traced-through
    children of a part kept whole, then each one traced again unless that breaks it (so that only
    the guilty stay whole), then the guilty ones' children in their place. One trace per try:
    this only runs for a model whose plain trace is wrong."""
    entered = list(dict.fromkeys(path for n in gm.graph.nodes
                                 for path, _ in (n.meta.get("nn_module_stack") or {}).values() if path))
    children: Dict[str, List[str]] = {"": []}  # every module the trace went into, by its caller's path
    for path in entered:
        # the nearest enclosing module that was called: a ModuleList's items belong to its owner
        prefixes = [path.rsplit(".", k)[0] for k in range(1, path.count(".") + 1)]
        parent = next((q for q in prefixes if q in entered), "")
        children.setdefault(parent, []).append(path)
        children.setdefault(path, [])
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for paths in children.values():  # a module called as one node is kept whole already
        paths[:] = [p for p in paths if p not in called]
    reason = f"kept whole: the graph traced through it {why}"

    def narrowed(kept: List[str], fixed: Dict[str, str]) -> Optional[List[str]]:
        if not faithful({**fixed, **{p: reason for p in kept}}):
            return None
        for p in list(kept):
            rest = [q for q in kept if q != p]
            if faithful({**fixed, **{q: reason for q in rest}}):
                kept = rest
        return kept

    guilty = narrowed(children.get("", []), {})
    if guilty is None:
        return {}
    leaves = {p: reason for p in guilty}
    todo = list(guilty)
    while todo:
        part = todo.pop()
        inner = children.get(part, [])
        if not inner:
            continue
        without = {k: v for k, v in leaves.items() if k != part}
        found = narrowed(inner, without)
        if found is not None:  # its children explain it: keep them whole instead of the part
            leaves = {**without, **{p: reason for p in found}}
            todo.extend(found)
    return leaves


def _runs(model: nn.Module, inputs: tuple) -> bool:
    """Whether a copy of ``model`` runs on ``inputs`` (no random draw, no state left)."""
    copy = safe_deepcopy(model)
    reset_states(copy)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            copy(*inputs)
        return True
    except Exception:  # noqa: BLE001 - any failure: the model does not take these inputs
        return False


def _meet(budget: int, total_before: int, savings, strategies, with_plan, inplace: bool):
    """(choice, predicted bytes, converted model) keeping at most ``budget`` bytes. Savings do not
    quite add up (a site's readers keep its spikes as bits, and its block's batch norm folds
    with the residual, only next to exact sites), so each plan is measured, and the next aims
    lower by what the last kept beyond its prediction; the smallest reachable figure, if it comes
    to that, is measured too (every site at the strategy that keeps least)."""
    target = budget
    for _ in range(4):
        try:
            choice, predicted = choose(total_before, savings, target, strategies)
        except (BudgetError, ValueError):  # below the predicted floor
            break
        gm = with_plan(choice, inplace=inplace)
        measured = plan_of(gm, "planned").kept_after
        if measured <= budget:
            return choice, predicted, gm
        target -= measured - predicted
    choice, predicted = choose(total_before, savings, "min", strategies)
    gm = with_plan(choice, inplace=inplace)
    floor = plan_of(gm, "planned").kept_after
    if floor <= budget:
        return choice, predicted, gm
    raise BudgetError(
        f"a budget of {budget} bytes cannot be met: the smallest reachable figure is {floor} bytes "
        f"({floor / 2**20:.2f} MiB) kept for backward, with every site at the strategy that keeps "
        f"least; before conversion the model keeps {total_before} bytes")


def _probe_is_plan(probe: fx.GraphModule, planned: Planned) -> bool:
    """Whether a probe (one strategy at every site) converted every site as ``planned`` does."""
    return not getattr(probe, "revpass_planned", False) and all(
        (r.decision if r.decision != "unchanged" else None) == planned.get(r.path, (None, ""))[0]
        for r in probe.revpass_report.rows)


def _as_planned(probe: fx.GraphModule, planned: Planned) -> fx.GraphModule:
    """The probe as the planned conversion (the same sites, strategies and graph), its report
    saying the planner's reasons as the planned conversion's would; taken once."""
    probe.revpass_planned = True
    report = probe.revpass_report
    report.mode = "planned"
    for r in report.rows:
        if r.path not in planned:
            continue
        if r.decision == "unchanged":
            r.reason = planned[r.path][1]
        else:
            r.reason += f"; planner: {planned[r.path][1]}"
    return probe


def _report(sites: List[Site], patterns: List[PatternSite], shapes: Dict, options: _Options) -> ConversionReport:
    mode = options.mode if options.planned is None else "planned"
    report = ConversionReport(mode=mode, backward=options.backward)
    for site in sites:
        row = SiteRow(site.path, site.framework, site.kind, len(site.calls), site.shape, site.decision, site.reason)
        if site.decision == "reversible" and site.shape and len(site.shape) >= 3 and site.shape[2] % 2:
            row.reason += f"; {site.shape[2]} channels: the unpaired one runs through the exact node"
        report.rows.append(row)
    for ps in patterns:
        shape = shapes.get(ps.steps[0].X.name)
        report.rows.append(SiteRow(ps.node_path or ps.path, ps.spec.origin if ps.spec else "pattern", "c",
                                   len(ps.steps), (shape[0] and (len(ps.steps),) + tuple(shape)) if shape else None,
                                   ps.decision, ps.reason))
    return report


# ----------------------------------------------------------------------------------------------
# budget=: the planner's probes and choice
# ----------------------------------------------------------------------------------------------


def _convert_within(model: nn.Module, example_inputs, budget: Union[int, str], options: _Options,
                    say: Callable[[str], None] = lambda stage: None) -> fx.GraphModule:
    """convert(..., budget=): measure a conversion per strategy, choose (planning/budget.py),
    convert with the choice, and check the measured figure; ``say`` is told each stage."""
    if example_inputs is None:
        raise ValueError("convert(..., budget=...) needs example_inputs: the planner measures the model")
    if budget != "min" and not isinstance(budget, Peak) and (
            not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
        raise ValueError(f"budget must be a number of bytes, revpass.Peak(bytes) or 'min', got {budget!r}")
    # under a budget, exact sites fold their batch norms: the same forward, gradients within a
    # rounding (docs/method.md section 12), one float per element less
    options = replace(options, fold_exact=True, collect=False)
    probe = replace(options, inplace=False)
    strategies = allowed(options.mode)  # mode="exact" keeps the original function: no reversible site
    # one faithful trace for every conversion the planner makes (each converts a copy of it)
    say(f"budget={budget!r}: tracing and measuring the model")
    traced = _Traced.of(safe_deepcopy(model), as_tuple(example_inputs), probe)
    probes = {}
    for i, s in enumerate(strategies, 1):
        say(f"probe {i}/{len(strategies)}: {s} at every site (converted and measured)")
        probes[s] = _pipeline(model, example_inputs, replace(probe, mode=s), traced)
    total_before = plan_of(probes["exact"], "exact").kept_before
    savings = {s: site_savings(g) for s, g in probes.items()}
    workspace = workspaces(probes["recompute"])
    uniform = {s: estimate_peak(g) for s, g in probes.items()}
    uniform[None] = probes["exact"].revpass_peak_before  # leaving every site as it is

    # under a Peak budget the chosen plan's rebuilds are refined only as far as it takes to fit
    # (the probes as far as they lower the peak: the lowest plan is what the budget is checked against)
    final = replace(options, peak_budget=budget.bytes) if isinstance(budget, Peak) else options

    def with_plan(planned, inplace=False, joined=frozenset(), why="the chosen plan", give_up=None):
        if not inplace and final is options and not joined:  # a probe is that conversion already when
            for g in probes.values():                         # the plan is one strategy everywhere
                if _probe_is_plan(g, planned):
                    return _as_planned(g, planned)
        say(f"converting {why}" + (" in place" if inplace else ""))
        return _pipeline(model, example_inputs, replace(final, planned=planned, inplace=inplace, joined=joined,
                                                        give_up=give_up), traced)

    rank = {None: -1, **{k: i for i, k in enumerate(STRATEGIES)}}  # extra compute, least first

    def uniform_plan(s, why):  # strategy s at every site the planner considers
        return {p: (s, why) if c is not None else (None, w) for p, (c, w) in min_choice.items()}

    # any choice's estimated peak, from the probes, without converting (planning/peak.py)
    estimate = PlanEstimate(probes, base="recompute")
    order = [r.path for r in probes["exact"].revpass_report.rows]  # the sites in forward order

    def strategies_of(choice):  # {path: strategy} of a choice {path: (strategy, reason)}
        return {p: s for p, (s, _) in choice.items()}

    def peak_of(choice):
        return estimate(strategies_of(choice))

    def lowest():  # budget="min": (choice, its estimated peak)
        choice = min_choice
        peak = peak_of(choice)
        tries = sorted((p for p, (s, _) in choice.items() if s == "recompute"), key=lambda p: -workspace.get(p, 0))
        for p in tries if "reversible" in strategies else ():
            trial = dict(choice)
            trial[p] = ("reversible", "'min': reversible instead of recompute lowers the estimated peak "
                        + (f"(the segment's backward would rebuild {workspace[p]} bytes)" if p in workspace else
                           "(its recomputed segment does not form: it would be an exact node)"))
            cand_peak = peak_of(trial)
            if cand_peak >= peak:  # the largest rebuild did not set the peak: the smaller ones will not
                break
            choice, peak = trial, cand_peak
        s = min(uniform, key=lambda k: (uniform[k], rank[k]))
        mix = max((rank[c] for c, _ in choice.values()), default=-1)  # -1: no site the planner can convert
        # one strategy everywhere does better (keeping more, rebuilding less), or as well (within
        # 1%, the estimate's resolution at best) at less extra compute
        if uniform[s] < peak or (uniform[s] <= peak * 1.01 and rank[s] < mix):
            choice = uniform_plan(s, f"'min': {s} at every site has the lowest estimated peak" if s is not None else
                                  "'min': no conversion lowers the estimated peak (the nodes' sequence-sized "
                                  "gradients outweigh what they save)")
            peak = uniform[s]
        return choice, peak

    def relax(choice, bound, why, to=strategies):
        """``choice`` with sites moved to strategies of less extra compute (among ``to``), the
        deepest first (early layers hold the largest activations, so their rebuilds set the
        peak), each move kept while the estimated peak stays within ``bound``."""
        for p in reversed(order):
            s = choice.get(p, (None, ""))[0]
            if s is None:
                continue
            for cheaper in (c for c in to if rank[c] < rank[s]):
                trial = {**choice, p: (cheaper, f"{cheaper} instead of {s}: {why}")}
                if peak_of(trial) <= bound:
                    choice = trial
                    break
        return choice

    def least_compute(low, bound, why, to=strategies):
        """(choice, converted model): the lowest plan ``low`` relaxed within ``bound`` (to
        strategies among ``to``); ``low`` itself where its conversion does better than the relaxed
        one's (the probes' figures are the regions' own: a conversion chunks and slices for the
        whole plan)."""
        choice = relax(low, bound, why, to)
        gm = with_plan(choice)
        peak = estimate_peak(gm)
        if choice != low and peak > bound:
            gm_low = with_plan(low)
            if estimate_peak(gm_low) < peak:
                choice, gm = low, gm_low
        return choice, gm

    def joined_where_it_lowers_the_peak(gm, choice):
        """(``gm`` converted with ``choice``, the sites joined): its recomputed segments joined while
        that lowers the estimated peak by more than the estimate's resolution (1%)
        (revpass.planning.budget.join_candidate): a conversion per try, only where one segment's
        output feeds only the segment whose backward sets the peak. A try whose joined segment,
        at its finest chunks and with nothing else rebuilding anything, cannot bring the whole
        estimate (parameters' gradients included) below the plan's is not refined further: the
        whole estimate falls monotonically with the workspaces, the figure does not (the peak
        moves to where other gradients exist)."""
        joined = frozenset()
        whole, peak = estimate_peak(gm, with_grads=True)  # parameters' gradients included, and the figure
        while (site := join_candidate(gm)) is not None and site not in joined:
            trial = with_plan(choice, joined=joined | {site}, why=f"with {site}'s segment joined to the one reading it "
                                                                 "(kept if that lowers the estimated peak)",
                              give_up=(site, whole))
            reachable = getattr(trial, "revpass_reachable", None)
            if reachable is not None:
                say(f"{site}'s segment joined: the whole estimated peak (parameters' gradients included) at least "
                    f"{reachable / 2**20:.2f} MiB against {whole / 2**20:.2f} MiB: not kept (it cannot lower it)")
                break
            trial_whole, lower = estimate_peak(trial, with_grads=True)
            lowers = lower < 0.99 * peak
            say(f"{site}'s segment joined: estimated peak {lower / 2**20:.2f} MiB against {peak / 2**20:.2f} MiB: "
                + ("kept" if lowers else "not kept (not lower by more than 1%)"))
            if not lowers:
                break
            gm, joined, whole, peak = trial, joined | {site}, trial_whole, lower
        return gm, joined

    def kept_of(choice):  # the bytes a choice keeps for backward, from the probes
        if all(c is None for c, _ in choice.values()):
            return total_before
        return estimate.kept(strategies_of(choice))

    min_choice, predicted = choose(total_before, savings, "min", strategies)
    if isinstance(budget, Peak):
        # the least extra compute whose estimated peak fits: the model as it is, or exact nodes
        # everywhere (no extra compute), else the lowest plan relaxed as far as the budget allows
        fits = [s for s in (None, "exact") if uniform[s] <= budget.bytes]
        joined = frozenset()
        if fits:
            s = fits[0]
            choice = uniform_plan(s, f"the estimated peak {uniform[s]} bytes fits {budget!r} with {s} at every site "
                                     "(no extra compute)" if s is not None else
                                  f"the estimated peak {uniform[s]} bytes fits {budget!r} without converting")
            gm = with_plan(choice)
        else:
            low, peak = lowest()
            gm = None
            if peak <= budget.bytes:
                choice, gm = least_compute(low, budget.bytes,
                                           f"the estimated peak still fits {budget!r} (less extra compute)")
                if estimate_peak(gm) > budget.bytes:  # the probes' figures fit, the conversion's does not
                    gm = None
            if gm is None:  # the lowest plan with segments joined, as budget="min" converts it
                gm, joined = joined_where_it_lowers_the_peak(with_plan(low), low)
                peak = estimate_peak(gm)
                if peak > budget.bytes:
                    raise BudgetError(
                        f"{budget!r} cannot be met: the smallest reachable estimated peak is {peak} bytes "
                        f"({peak / 2**20:.2f} MiB; budget='min'); before conversion the estimate is {uniform[None]} "
                        "bytes")
                choice = low
        predicted = kept_of(choice)
        if options.inplace:
            gm = with_plan(choice, inplace=True, joined=joined)
    elif budget != "min":
        joined = frozenset()
        choice, predicted, gm = _meet(budget, total_before, savings, strategies, with_plan, options.inplace)
    else:
        low, peak = lowest()  # relaxed as far as the estimate cannot tell the peak apart (1%)
        # to exact nodes only: a reversible node where a site's rebuild is within the estimate's
        # resolution of the lowest could hold more than it (spiking_vgg11_bn at T = 8: 5% more
        # measured than mode="exact"'s plan), and reversible allowed must go at least as low
        choice, gm = least_compute(low, peak * 1.01, "'min': the estimated peak stays within 1% of the lowest "
                                                     "(less extra compute)", to=("exact",))
        gm, joined = joined_where_it_lowers_the_peak(gm, choice)
        predicted = kept_of(choice)
        if options.inplace:
            gm = with_plan(choice, inplace=True, joined=joined)
    probes.clear()  # the probes not taken: freed below
    gc.collect()  # the probes and plans not taken hold reference cycles: free their tensors now
    gm.revpass_report.mode = f"budget={budget!r}" if options.mode == "reversible" else \
        f"{options.mode}, budget={budget!r}"  # the function kept: exact and recomputed sites only
    measured, estimated = plan_of(gm, "planned").kept_after, estimate_peak(gm)
    say(f"chosen: the estimated peak of a training step {estimated / 2**20:.2f} MiB (before conversion "
        f"{uniform[None] / 2**20:.2f} MiB)")
    gm.revpass_budget = {"budget": budget, "predicted_bytes": predicted, "measured_bytes": measured,
                         "bytes_before": total_before, "estimated_peak": estimated,
                         "joined": sorted(joined)}  # sites whose segment joined the one reading them
    if isinstance(budget, int) and measured > budget:
        raise BudgetError(
            f"the planned conversion keeps {measured} bytes, over the budget of {budget} (predicted "
            f"{predicted}); the smallest reachable figure is given by budget='min'"
        )
    return gm
