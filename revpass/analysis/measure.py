"""What each node of a graph keeps for backward, measured on example inputs.

:func:`measure` runs a GraphModule with a :class:`torch.fx.Interpreter` under
``saved_tensors_hooks`` and attributes every tensor saved for backward (and still held when the
forward returns) to the node that saved it, deduplicated by storage over the whole graph: a
storage kept by several nodes (a reversible node's output, kept again by the conv that reads it)
counts once, at the first node that keeps it. It also records each node's output shape, dtype,
whether its values are all 0 or 1 (spikes), the most each module call's forward held at once
(:class:`_Forward`), and the backward workspace of revpass nodes and recomputed segments
(revpass.analysis.workspace).
"""

from __future__ import annotations

import contextlib
import io
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx

from revpass.analysis.workspace import workspace
from revpass.errors import ExampleInputError
from revpass.memory import StorageTracker
from revpass.nodes import Node
from revpass.nodes.bits import is_binary
from revpass.nodes.segment import RecomputeSegment
from revpass.state import reset_states
from revpass.utils import as_tuple, flatten, scratch_copy


@dataclass
class NodeMemory:
    kept_bytes: int
    forward_step: int
    shape: Optional[List[int]]
    dtype: Optional[str]
    binary: bool = False  # every element of the output is 0 or 1 (spikes)
    own_bytes: int = 0  # what the node keeps, counting storages other nodes also keep
    workspace_bytes: int = 0  # revpass nodes: what their backward allocates besides the input gradient
    #: module calls: the most its forward held at once beyond what existed when it started (its
    #: output and what it keeps included: a recomputed segment's whole layers, a node's temporaries)
    forward_bytes: int = 0


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.now: List[Optional[str]] = [None]  # the name of the node running now
        self.order: List[fx.Node] = []
        self.outputs: Dict[str, Any] = {}
        self.binary: Dict[str, bool] = {}
        self.forward: Dict[str, int] = {}  # module calls: the most their forward held beyond what existed
        self.tracker: Optional[_Forward] = None  # None: forwards not measured (meta tensors)

    def run_node(self, n: fx.Node) -> Any:
        self.now[0] = n.name
        self.order.append(n)
        if n.op == "call_module" and self.tracker is not None:
            out, self.forward[n.name] = self.tracker.call(lambda: super(_Recorder, self).run_node(n))
        else:
            out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.outputs[n.name] = (list(out.shape), str(out.dtype).replace("torch.", ""))
            with torch.no_grad():
                self.binary[n.name] = is_binary(out)
        return out


class _Forward:
    """What each module call's forward holds at once beyond what existed when it started: one
    storage tracker (revpass.memory.StorageTracker) over the measuring run, told of the
    parameters, buffers and inputs first (a view of one made inside would otherwise count its
    storage as new), its peak set back to the current total before each call."""

    def __init__(self, tensors: List[torch.Tensor]):
        self.mt = StorageTracker(*tensors)

    def call(self, run) -> Tuple[Any, int]:
        start = self.mt.peak = self.mt.total  # the running peak, from now
        out = run()
        return out, max(0, self.mt.peak - start)


def measure(gm: fx.GraphModule, example_inputs: Sequence[Any], detail: bool = True) -> Dict[str, NodeMemory]:
    """Bytes each node keeps for backward (storage-deduplicated over the graph), by node name;
    with ``detail``, also each module call's forward peak and each node's and segment's backward
    workspace (what the estimate needs; a pass that reads only shapes and kept bytes skips them)."""
    inputs = as_tuple(example_inputs)
    reset_states(gm)
    rec = _Recorder(gm)
    excluded = {t.untyped_storage().data_ptr() for t in (*gm.parameters(), *gm.buffers()) if t.numel()}
    excluded |= {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor) and x.numel()}
    seen = []
    # the hook holds no graph (node names, not nodes; not the recorder): a saved tensor's hooks live
    # as long as the saved tensor, and with them whatever the hook refers to
    now = rec.now

    def pack(t: torch.Tensor):
        # the graph keeps an alias, not t: a saved output packed as itself would hold its own
        # grad_fn, a cycle through autograd's C++ nodes that gc cannot see, and it leaked the
        # whole graph (parameters included) at every measuring run. The alias lives exactly as
        # long as the graph keeps it, so its weak reference says whether it is still kept.
        kept_as = t.detach()
        if t.numel() and t.device.type != "meta":
            st = t.untyped_storage()
            if st.data_ptr() not in excluded:
                seen.append((weakref.ref(kept_as), st.data_ptr(), st.nbytes(), now[0]))
        return kept_as

    leaves = [x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    # a measuring run must leave no trace: buffers (batch norm's running statistics) are put back
    # and the random number generator is not advanced
    buffers = [(b, b.clone()) for b in gm.buffers()]
    cuda = sorted({t.device.index or 0 for t in (*gm.parameters(), *leaves)
                   if isinstance(t, torch.Tensor) and t.is_cuda})
    known = [*gm.parameters(), *gm.buffers(), *(x for x in leaves if isinstance(x, torch.Tensor))]
    rec.tracker = None if not detail or any(t.device.type == "meta" for t in known) else _Forward(known)
    with torch.random.fork_rng(devices=cuda), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            rec.tracker.mt if rec.tracker is not None else contextlib.nullcontext():
        out = rec.run(*leaves)
    rec.tracker = None  # the tracker holds weak references only, but not past the run
    with torch.no_grad():
        for b, v in buffers:
            b.copy_(v)
    kept: Dict[str, int] = {}
    owner: Dict[int, str] = {}
    own: Dict[str, Dict[int, int]] = {}
    for ref, ptr, nbytes, name in seen:
        if ref() is None or name is None:
            continue  # freed before the forward returned
        own.setdefault(name, {})[ptr] = nbytes
        if ptr in owner:
            continue  # already counted (shared storage)
        owner[ptr] = name
        kept[name] = kept.get(name, 0) + nbytes
    del out
    reset_states(gm)
    result = {}
    for i, n in enumerate(rec.order):
        shape, dtype = rec.outputs.get(n.name, (None, None))
        result[n.name] = NodeMemory(kept.get(n.name, 0), i, shape, dtype, rec.binary.get(n.name, False),
                                    sum(own.get(n.name, {}).values()), forward_bytes=rec.forward.get(n.name, 0))
    sized: Dict[str, int] = {}
    for n in rec.order if detail else ():  # the backward workspace of revpass nodes and segments, once per
        # module and shapes
        if n.op != "call_module" or not n.args or not isinstance(gm.get_submodule(n.target),
                                                                                         (Node, RecomputeSegment)):
            continue
        # a node's input (and the residual a folded batch norm's output gets: revpass/nodes/batchnorm.py)
        args = (n.args[:1] + tuple(v for k, v in n.kwargs.items() if k == "residual")
                if isinstance(gm.get_submodule(n.target), Node) else n.args)
        src = [(*rec.outputs.get(a.name, (None, None)), rec.binary.get(a.name, False)) if isinstance(a, fx.Node)
               else (None, None, False) for a in args]
        if all(shape is not None for shape, _, _ in src):
            key = f"{n.target}{src}"
            if key not in sized:
                sized[key] = workspace(gm.get_submodule(n.target),
                                       [(shape, getattr(torch, dtype), b) for shape, dtype, b in src])
            result[n.name].workspace_bytes = sized[key]
    reset_states(gm)  # a segment's layers ran again (a dropout draws a mask): no trace left
    return result


def site_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Dict[str, tuple]:
    """From one run of ``gm`` (left reset): the output shape of every node by name, and the
    input shape of every call_module node by target (its first call's)."""
    from torch.fx.passes.shape_prop import ShapeProp

    inputs = as_tuple(example_inputs)
    reset_states(gm)
    shapes: Dict[str, tuple] = {}
    cuda = sorted({x.device.index or 0 for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda})
    # ShapeProp prints the traceback of a node that fails before it raises: convert tries traces
    # that may (revpass.api._faithful_trace), and says what failed itself. What else the run
    # writes to stderr (the model's own warnings) is passed on when it succeeds.
    said = io.StringIO()
    try:  # the random number generator is not advanced: the run leaves no trace
        with torch.no_grad(), torch.random.fork_rng(devices=cuda), contextlib.redirect_stderr(said):
            ShapeProp(gm).propagate(*inputs)
        sys.stderr.write(said.getvalue())
    except Exception as exc:  # noqa: BLE001 - the model's own error, in one line, as a revpass error
        cause = exc.__cause__ or exc
        given = ", ".join(f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}" if isinstance(x, torch.Tensor)
                          else type(x).__name__ for x in inputs)
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        raise ExampleInputError(
            f"the model does not run on the example inputs ({given}): {type(cause).__name__}: {first}. "
            "Pass inputs the model itself accepts (shape (T, B, ...) for a multi-step model, its "
            "parameters' dtype)"
        ) from None
    finally:
        reset_states(gm)
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            shapes[n.name] = tuple(tm.shape)  # every value, by node name (kind c sites)
        if n.op == "call_module" and n.args and isinstance(n.args[0], fx.Node):
            tm = n.args[0].meta.get("tensor_meta")
            if tm is not None and hasattr(tm, "shape") and n.target not in shapes:
                shapes[n.target] = tuple(tm.shape)
    return shapes


def trace_differs(original: torch.nn.Module, traced: fx.GraphModule, example_inputs: Sequence[Any]) -> Optional[str]:
    """How the traced graph's outputs differ from the original model's on the example inputs
    (copies of both, from the reset state, the same random draws), or None when they agree: a
    trace can go wrong silently where Python looks at a traced value (``isinstance(out,
    tuple)`` on a module's output, a branch on a value)."""
    inputs = as_tuple(example_inputs)
    cuda = sorted({x.device.index or 0 for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda})
    outs = []
    for m in (original, traced):
        m = scratch_copy(m)
        reset_states(m)
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            out = m(*inputs)
        outs.append((type(out).__name__, flatten(out)))
    (kind_a, a), (kind_b, b) = outs
    if len(a) != len(b):
        return f"the model returns {len(a)} tensors ({kind_a}), the traced graph {len(b)} ({kind_b})"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return (f"output {i}: the model gives {tuple(x.shape)} {x.dtype}, the traced graph {tuple(y.shape)} "
                    f"{y.dtype}")
        if x.device.type == "meta":  # shapes are all a meta tensor has
            continue
        if not torch.equal(x, y) and not torch.allclose(x.double(), y.double(), rtol=1e-4, atol=1e-5,
                                                          equal_nan=True):
            return f"output {i}: values differ by up to {float((x.double() - y.double()).abs().max()):.3g}"
    return None
