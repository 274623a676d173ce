"""The tracer: torch.fx with every framework's neurons kept as leaves, and the frameworks'
pitfalls (docs/frameworks/) handled so that the traced model behaves like the original over
repeated calls.

* The modules the adapters name as leaves (neurons and the frameworks' stateful modules),
  registered neuron classes and revpass's own nodes are leaves: one ``call_module`` node per call.
* Each loaded framework's adapter patches what would misbehave while tracing
  (:meth:`revpass.neurons.adapter.Adapter.trace_patches`): a state reset inside ``forward``
  becomes a node that resets every stateful module at that point of each call (``"reset"``); a
  state initialiser becomes a fresh empty tensor made in the graph, which the neuron (and
  revpass's node) reads as "start from the reset state" (``"fresh_state"``).
* A model that cannot be traced raises :class:`TraceError`, which names the module and line and
  says what to do (register a leaf, pass ``concrete_args``).
"""

from __future__ import annotations

import contextlib
import traceback
import weakref
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import fx, nn

from revpass.errors import RevpassError
from revpass.neurons import is_leaf, loaded_adapters
from revpass.nodes import Node
from revpass.state import StateReset
from revpass.utils import detached_memo

__all__ = ["trace", "RevpassTracer", "TraceError", "register_leaf"]


class TraceError(RevpassError, RuntimeError):
    """The model could not be traced; the message says where and what to do."""


_EXTRA_LEAVES: List[type] = []


def register_leaf(cls: type) -> None:
    """Keep modules of ``cls`` as single nodes when tracing (their forward is not traced)."""
    _EXTRA_LEAVES.append(cls)


def _framework_leaf(m: nn.Module) -> bool:
    return isinstance(m, (Node, StateReset, *_EXTRA_LEAVES)) or is_leaf(m)


class RevpassTracer(fx.Tracer):
    """torch.fx tracer whose leaves are the neurons of every supported framework.

    ``time_steps``: when set (convert sets it from the example input's leading dimension), a
    loop over a sequence tensor (``for x in x_seq``) unrolls over that many steps.
    """

    def __init__(self, time_steps: Optional[int] = None, input_shapes: Optional[List[Any]] = None, **kwargs):
        super().__init__(**kwargs)
        self.time_steps = time_steps
        self.input_shapes = list(input_shapes) if input_shapes is not None else None
        self._placeholders = 0

    def proxy(self, node: fx.Node) -> fx.Proxy:
        """With ``input_shapes``, the forward's tensor arguments answer ``.shape``, ``.size()``,
        ``.dim()`` and ``.ndim`` with the example's values (so that ``range(x.shape[0])`` traces)."""
        if node.op == "placeholder" and self.input_shapes is not None:
            i, self._placeholders = self._placeholders, self._placeholders + 1
            if i < len(self.input_shapes) and self.input_shapes[i] is not None:
                return _ShapedProxy(node, self, torch.Size(self.input_shapes[i]))
        return super().proxy(node)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _framework_leaf(m) or super().is_leaf_module(m, module_qualified_name)

    def iter(self, obj):
        if self.time_steps is not None:
            return iter([obj[i] for i in range(self.time_steps)])
        return super().iter(obj)


class _ShapedProxy(fx.Proxy):
    """A placeholder whose shape is the example input's (see RevpassTracer.proxy)."""

    def __init__(self, node: fx.Node, tracer, shape: torch.Size):
        super().__init__(node, tracer)
        self._rp_shape = shape

    def __getattr__(self, k):
        if k in ("shape", "ndim"):
            return self._rp_shape if k == "shape" else len(self._rp_shape)
        if k == "size":
            return lambda dim=None: self._rp_shape if dim is None else self._rp_shape[dim]
        if k == "dim":
            return lambda: len(self._rp_shape)
        return super().__getattr__(k)


_APPLY_WRAPPERS: Dict[type, Callable] = {}


def function_apply(cls: type) -> Callable:
    """A plain function that calls ``cls.apply`` (an autograd.Function), usable as a graph node
    target: the Function, with its own backward, stays one node instead of being traced through."""
    fn = _APPLY_WRAPPERS.get(cls)
    if fn is None:
        base = torch.autograd.function.Function.__dict__["apply"]

        def fn(*args, **kwargs):
            return base.__get__(None, cls)(*args, **kwargs)

        fn.__name__ = fn.__qualname__ = f"apply_{cls.__name__}"
        fn.__module__ = __name__
        fn.revpass_function = cls
        _APPLY_WRAPPERS[cls] = fn
    return fn


_RESET_MARK = "_revpass_reset"


@contextlib.contextmanager
def _patched_frameworks(tracer: "RevpassTracer"):
    """Replace reset_net / init_leaky & co. for the duration of a trace."""
    undo: List[Any] = []

    def patch(obj, name, new, old=None):
        old = getattr(obj, name) if old is None else old
        setattr(obj, name, new)
        undo.append((obj, name, old))

    Function = torch.autograd.function.Function
    base_apply = Function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        if any(isinstance(a, fx.Proxy) for a in args):
            return tracer.create_proxy("call_function", function_apply(cls), args, kwargs)
        return base_apply.__get__(None, cls)(*args, **kwargs)

    patch(Function, "apply", classmethod(apply), base_apply)

    def make_node(kind: str):
        if kind == "reset":  # every stateful module reset at this point of each call
            return tracer.create_proxy("call_module", _RESET_MARK, (), {})
        if kind == "fresh_state":  # "start from the reset state"
            return tracer.create_proxy("call_function", torch.zeros, (0,), {})
        raise ValueError(f"trace: unknown node kind {kind!r}")

    for adapter in loaded_adapters():
        adapter.trace_patches(patch, make_node)
    try:
        yield
    finally:
        for obj, name, old in reversed(undo):
            setattr(obj, name, old)


def _where(exc: BaseException) -> str:
    """The innermost frame of user code in a traceback: 'file:line in function'."""
    frames = traceback.extract_tb(exc.__traceback__)
    for f in reversed(frames):
        if "/torch/" not in f.filename and "/revpass/" not in f.filename:
            return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    return "unknown location"


def trace(
    model: nn.Module,
    concrete_args: Optional[Dict[str, Any]] = None,
    tracer: Optional[RevpassTracer] = None,
    time_steps: Optional[int] = None,
    input_shapes: Optional[List[Any]] = None,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that behaves like it over repeated calls.

    Forward arguments a framework's container takes for its own use (norse's
    ``SequentialState``'s ``state``) are bound by its adapter.
    autograd.Functions called in traced code stay single nodes (their backward is kept).
    ``time_steps`` unrolls loops over sequence tensors (``for x in x_seq``). ``input_shapes``
    (the example inputs' shapes, None for non-tensors): when the forward uses an input's shape as
    a number (``for t in range(x.shape[0])``), the model is traced again with those shapes fixed.
    """
    concrete_args = dict(concrete_args or {})
    _default_concrete_args(model, concrete_args)
    try:
        try:
            t = tracer or RevpassTracer(time_steps=time_steps)
            with _patched_frameworks(t):
                graph = t.trace(model, concrete_args=concrete_args or None)
        except TypeError as exc:
            # a shape read in forward used as a number (range(x.shape[0]), torch.zeros(x.shape[1], n)):
            # trace again with the example inputs' shapes, which the graph then assumes
            if tracer is not None or input_shapes is None or "Proxy" not in str(exc):
                raise
            t = RevpassTracer(time_steps=time_steps, input_shapes=input_shapes)
            with _patched_frameworks(t):
                graph = t.trace(model, concrete_args=concrete_args or None)
    except Exception as exc:  # noqa: BLE001 - re-raised with a location and a remedy
        raise TraceError(
            f"could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            f"  at {_where(exc)}\n"
            "  What to do: if this is data-dependent control flow inside a module, keep that module "
            "as one node with revpass.trace.register_leaf(ItsClass) (or register it as a neuron with "
            "revpass.register_neuron); if it depends on a forward argument, fix that argument with "
            "concrete_args={'name': value}."
        ) from exc
    for n in list(graph.nodes):
        # concrete_args=None become `_assert_is_none(arg)` calls; the graph's own code would then
        # name that wrapped function, and a GraphModule unpickled with it leaves an entry in fx's
        # table of wrapped functions that breaks every later trace in the process
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "_assert_is_none" and not n.users:
            graph.erase_node(n)
    has_reset = any(n.op == "call_module" and n.target == _RESET_MARK for n in graph.nodes)
    root = _Root(model, has_reset)
    gm = fx.GraphModule(root, graph, class_name=f"Traced{type(model).__name__}")
    type(gm).__deepcopy__ = _deepcopy_after_forward  # this GraphModule's own class
    gm.training = model.training
    if has_reset:
        gm._revpass_reset._owner = weakref.ref(gm)
    return gm


def _deepcopy_after_forward(self, memo):
    """Deepcopy of a traced model that works after a forward: the frameworks' neurons left in
    it hold state that is part of an autograd graph; it is copied detached."""
    for k, v in detached_memo(self).items():
        memo.setdefault(k, v)
    return fx.GraphModule.__deepcopy__(self, memo)


class _Root(nn.Module):
    """The traced model's modules, plus the reset marker's module when the forward reset state."""

    def __init__(self, model: nn.Module, with_reset: bool):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
        self.train(model.training)
        if with_reset:
            self.add_module(_RESET_MARK, StateReset())


def _default_concrete_args(model: nn.Module, concrete_args: Dict[str, Any]) -> None:
    for adapter in loaded_adapters():
        adapter.concrete_args(model, concrete_args)
