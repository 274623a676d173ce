"""revpass.convert: trace, detect, roll, rewrite. revpass.verify: gradient equivalence."""

from __future__ import annotations

import copy
import fnmatch
import gc
import operator
from typing import Any, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn

from revpass.passes.detect import find_sites
from revpass.passes.rewrite import _set_module, fold_restack, rewrite_site
from revpass.passes.roll import graph_to_nx, plan_roll
from revpass.report import ConversionReport, SiteRow
from revpass.trace import reset_states, trace

MODES = ("reversible", "exact", "recompute")


def safe_deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works after a forward: state tensors that are part of an
    autograd graph (SpikingJelly's v, snnTorch's mem) are copied detached. The model is not
    touched."""
    return copy.deepcopy(model, detached_memo(model))


def detached_memo(model: nn.Module) -> dict:
    """A deepcopy memo that maps every non-leaf tensor held in ``model``'s modules (attributes,
    buffers, SpikingJelly's memories, nested in tuples, lists and dicts) to a detached copy."""
    memo = {}
    for m in model.modules():
        pools = [vars(m), m._buffers]
        mem = getattr(m, "_memories", None)  # SpikingJelly's state
        if isinstance(mem, dict):
            pools.append(mem)
        for pool in pools:
            stack = list(pool.values())
            while stack:
                v = stack.pop()
                if isinstance(v, torch.Tensor):
                    if not v.is_leaf:
                        memo[id(v)] = v.detach().clone()
                elif isinstance(v, (tuple, list)):
                    stack.extend(v)
                elif isinstance(v, dict):
                    stack.extend(v.values())
    return memo


def _selected(path: str, include, exclude) -> Tuple[bool, str]:
    def match(pats):
        return any(fnmatch.fnmatchcase(path, p) for p in ([pats] if isinstance(pats, str) else pats))

    if include is not None and not match(include):
        return False, "not in include"
    if exclude is not None and match(exclude):
        return False, "excluded"
    return True, ""


def convert(
    model: nn.Module,
    example_inputs: Optional[Union[torch.Tensor, Sequence[Any]]] = None,
    *,
    mode: str = "reversible",
    backward: str = "optimized",
    include: Optional[Union[str, Iterable[str]]] = None,
    exclude: Optional[Union[str, Iterable[str]]] = None,
    inplace: bool = False,
    concrete_args: Optional[dict] = None,
    budget: Optional[Union[int, str]] = None,
    _modes: Optional[dict] = None,
) -> fx.GraphModule:
    """Convert the spiking neurons of ``model`` into revpass nodes.

    Args:
        model: any SpikingJelly, snnTorch, norse or plain PyTorch SNN (not modified unless
            ``inplace``).
        example_inputs: optional inputs; with them the report gives each site's input shape.
        mode: ``"reversible"`` (memory-saving nodes; the network's function changes: train it as
            converted), ``"exact"`` (the original function bit for bit, for trained weights) or
            ``"recompute"`` (exact nodes, and the layers between neurons recomputed in backward
            from their spike inputs kept as bits; needs ``example_inputs``).
        backward: ``"optimized"``, ``"recompute"`` or ``"autograd"`` (see ReversibleNode).
        include, exclude: module-path patterns (fnmatch) selecting the sites to convert.
        inplace: convert ``model``'s own modules instead of a copy.
        budget: bytes of activations kept for backward at the end of the forward: the planner
            (revpass/planner.py) chooses for each site between unchanged, exact, reversible and
            recompute to fit it at the least extra compute; or ``"min"``: the choice with the
            lowest estimated peak of a training step. Needs ``example_inputs``; ``mode`` is then
            ignored. A budget that cannot be met raises ``BudgetError`` with the smallest
            reachable figure.

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
    if budget is not None:
        from revpass.planner import convert_within

        return convert_within(model, example_inputs, budget, backward=backward, include=include,
                              exclude=exclude, inplace=inplace, concrete_args=concrete_args)
    planned = _modes or {}
    mode_of = (lambda path: mode) if _modes is None else (lambda path: planned.get(path, (None, ""))[0])
    work = model if inplace else safe_deepcopy(model)
    shapes_in = ([tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in _as_tuple(example_inputs)]
                 if example_inputs is not None else None)
    gm = trace(work, concrete_args=concrete_args, time_steps=_time_steps(example_inputs), input_shapes=shapes_in)
    # an untouched copy of the traced graph, for the memory it keeps ("before" conversion), and
    # another, run once, for the shapes (a run leaves state behind: a frameworks' neuron may
    # keep its last state's shape, so that the next run saves other tensors)
    before = safe_deepcopy(gm) if example_inputs is not None else None
    shapes = _site_shapes(safe_deepcopy(gm), example_inputs) if example_inputs is not None else {}
    report = ConversionReport(mode=mode, backward=backward)
    g = graph_to_nx(gm.graph)
    for site in find_sites(gm):
        site.shape = shapes.get(site.path)
        ok, why = _selected(site.path, include, exclude)
        if site.spec is None or site.reason.startswith("already"):
            pass
        elif not ok:
            site.reason = why
        elif mode_of(site.path) is None:
            if site.path in planned:
                site.reason = planned[site.path][1]
            else:  # the planner never considered it: say why it could not be converted
                rollable, why, _ = plan_roll(site, g) if site.kind == "b" else (True, "", None)
                site.reason = "left by the planner" if rollable else why
        elif site.kind == "a":
            site.decision = mode_of(site.path)
            site.reason = "multi-step neuron: one node over (T, ...)"
        elif len(site.calls) == 1 and getattr(site.module, "init_hidden", False):
            site.reason = (
                "snnTorch init_hidden=True called once per forward: its state lives between calls "
                "and snntorch.utils.reset cannot reach a revpass node; put the time loop inside a "
                "module (for step in range(num_steps): net(x)) so that convert rolls it"
            )
        else:
            roll_ok, why, plan = plan_roll(site, g)
            if roll_ok:
                site.decision = mode_of(site.path)
                site.reason = f"{len(site.calls)} single-step calls rolled into one sequence node"
                if getattr(site.module, "init_hidden", False):
                    site.reason += " (starting each forward from the reset state, as after snntorch.utils.reset)"
                site.details["plan"] = plan
            else:
                site.reason = why
        if site.decision == "reversible":
            writer = next((w for w in map(written_in_place, site.calls) if w is not None), None)
            if writer is not None:  # the reversible node keeps its output for backward; exact keeps none
                site.decision = "exact"
                site.reason += (f"; exact, not reversible: its output is modified in place by '{writer.name}' "
                                "(a reversible node keeps its output for backward)")
        if site.decision != "unchanged":
            if site.path in planned:
                site.reason += f"; planner: {planned[site.path][1]}"
            rewrite_site(gm, site, site.decision, backward, site.details.get("plan", {}))
            site.reason += _kernel_note(gm.get_submodule(site.path))
            g = graph_to_nx(gm.graph)
            if inplace:  # the user's model gets the same node at the same path
                _set_module(model, site.path, gm.get_submodule(site.path))
        report.rows.append(
            SiteRow(site.path, site.framework, site.kind, len(site.calls), site.shape, site.decision, site.reason)
        )
        if site.decision != "unchanged" and site.shape is not None and site.shape and len(site.shape) >= 3:
            C = site.shape[2]
            if site.decision == "reversible" and C % 2:
                report.rows[-1].reason += f"; {C} channels: the unpaired one runs through the exact node"
    _convert_patterns(gm, report, shapes, mode_of, planned, backward, include, exclude,
                      model if inplace else None)
    fold_restack(gm.graph)  # stack(unbind(y)) is y: no copy beside the node's output
    for n in list(gm.graph.nodes):  # fresh states of rolled snnTorch calls, now unused
        if n.op == "call_function" and n.target is torch.zeros and not n.users:
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    gm.revpass_report = report
    if not inplace:  # the user's model calls its batch norms itself: no folding into nodes it shares
        from revpass.passes.fold import fold_batch_norms

        fold_batch_norms(gm)
        paths = {r.path for r in report.rows}
        for n in gm.graph.nodes:
            if "revpass_folded" in n.meta and n.target in paths:
                report.by_path(n.target).reason += (f"; folds batch norm '{n.meta['revpass_folded']}' (its "
                                                    "input is not kept: revpass/nodes/batchnorm.py)")
    ends = {r.path for r in report.rows if r.decision == "recompute"}
    if ends:  # exact nodes that end recomputed segments (revpass/passes/segments.py)
        from revpass.nodes.slicing import CHUNK_MIN_ELEMS_FINE
        from revpass.passes.segments import form_segments

        for path in ends:  # their transient adds to the segment's rebuilt layers: memory first
            gm.get_submodule(path).set_slicing(CHUNK_MIN_ELEMS_FINE)

        form_segments(gm, _as_tuple(example_inputs), ends)
    _invalidate_reset_cache(gm)
    if inplace:
        _invalidate_reset_cache(model)
    if example_inputs is not None:  # node.meta["revpass"]: measured memory, strategy, lifetimes
        from revpass.passes.annotate import annotate
        from revpass.plan import estimate_peak, slice_where_it_sets_the_peak

        annotate(gm, _as_tuple(example_inputs), before=before)
        slice_where_it_sets_the_peak(gm)  # the nodes' backward transient, bounded where it matters
        gm.revpass_peak_before = estimate_peak(before)  # the unconverted graph, for revpass.plan
        del before
        gc.collect()  # GraphModules hold reference cycles: free the copy's tensors now
    return gm


_VIEWS = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "permute", "transpose", "expand", "narrow",
          "unbind", "chunk", "split", "select", "view_as", "contiguous", "t"}
_INPLACE_OPS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow, operator.iand,
                operator.ior, operator.setitem}


def written_in_place(n: fx.Node) -> Optional[fx.Node]:
    """The first node that modifies ``n``'s value (or a view of it) in place, if any: a
    ``tensor.op_()`` method, ``x += ...``, ``x[i] = ...``, ``F.relu(x, inplace=True)`` or a module
    with ``inplace=True``."""
    seen, stack = set(), list(n.users)
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        name = u.target if isinstance(u.target, str) else getattr(u.target, "__name__", "")
        if u.op == "call_method" and name.endswith("_") and not name.startswith("_"):
            return u
        if u.op == "call_function" and (u.target in _INPLACE_OPS or u.kwargs.get("inplace") is True):
            return u
        if u.op == "call_module" and getattr(u.graph.owning_module.get_submodule(u.target), "inplace", False):
            return u
        if (u.op == "call_function" and u.target in (operator.getitem, torch.unbind, torch.flatten,
                                                      torch.reshape, torch.squeeze, torch.unsqueeze)) \
                or (u.op == "call_method" and name in _VIEWS):
            stack.extend(u.users)
    return None


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _time_steps(example_inputs) -> Optional[int]:
    """The leading dimension of the first example input: how many steps a loop over a sequence
    tensor (``for x in x_seq``) unrolls into while tracing."""
    first = example_inputs[0] if isinstance(example_inputs, (tuple, list)) and example_inputs else example_inputs
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else None


def _convert_patterns(gm, report, shapes, mode_of, planned, backward, include, exclude, user_model) -> None:
    """Kind c: hand-written neurons traced into primitive ops (revpass/passes/patterns.py)."""
    from revpass.passes.patterns import find_pattern_sites, rewrite_pattern_site
    from revpass.passes.rewrite import NODE_CLASSES

    for ps in find_pattern_sites(gm, graph_to_nx(gm.graph)):
        shape = shapes.get(ps.steps[0].X.name)
        decision, reason, path = "unchanged", ps.reason, ps.path
        ok, why = _selected(ps.path, include, exclude)
        mode = mode_of(ps.path)
        if ps.spec is not None and not ok:
            reason = why
        elif ps.spec is not None and mode is None:
            reason = planned.get(ps.path, (None, "left by the planner"))[1]
        elif ps.spec is not None:
            node = NODE_CLASSES[mode](ps.spec, backward=backward, step_mode="m", carry_state=False, name=ps.path)
            path = rewrite_pattern_site(gm, ps, node)
            if user_model is not None:
                _set_module(user_model, path, node)
            decision = mode
            reason = (f"{len(ps.steps)} steps of a hand-written neuron ({ps.steps[0].charge} charge, "
                      f"{ps.steps[0].reset} reset) rolled into one sequence node") + _kernel_note(node)
        report.rows.append(SiteRow(path, ps.spec.origin if ps.spec else "pattern", "c", len(ps.steps),
                                   (shape[0] and (len(ps.steps),) + tuple(shape)) if shape else None,
                                   decision, reason))


def _kernel_note(node: nn.Module) -> str:
    """Why a converted site runs the PyTorch path on every device (revpass.nodes.kernels), or ''."""
    from revpass.nodes import kernels

    spec = getattr(node, "spec", None)
    why = None if spec is None else kernels.unsupported(spec, node.params())
    return "" if why is None else f"; no fused kernel: {why}"


def _invalidate_reset_cache(gm: nn.Module) -> None:
    import sys

    if "spikingjelly" in sys.modules:
        try:
            from spikingjelly.activation_based import functional

            functional.invalidate_reset_cache(gm)
        except (ImportError, AttributeError):  # pragma: no cover
            pass


def _site_shapes(gm: fx.GraphModule, example_inputs) -> dict:
    """Input shape of every call_module node, by target (the first call's), from one run."""
    from torch.fx.passes.shape_prop import ShapeProp

    inputs = _as_tuple(example_inputs)
    probe = gm
    reset_states(probe)
    shapes = {}
    with torch.no_grad():
        ShapeProp(probe).propagate(*inputs)
    reset_states(probe)
    for n in probe.graph.nodes:
        meta = n.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            shapes[n.name] = tuple(meta.shape)  # every value, by node name (kind c sites)
        if n.op == "call_module" and n.args and isinstance(n.args[0], fx.Node):
            meta = n.args[0].meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape") and n.target not in shapes:
                shapes[n.target] = tuple(meta.shape)
    return shapes
