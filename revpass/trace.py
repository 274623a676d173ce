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
* Code that reads shapes (``if x.ndim == 4``, ``for t in range(x.shape[0])``,
  ``torch.zeros(x.shape[0], n, device=x.device)``): when the symbolic trace fails and example
  inputs are known, the model is traced again with every value carrying an example value (a
  meta tensor: shapes, no data) computed alongside, so that ``.shape``, ``.size()``, ``.dim()``,
  ``.ndim``, ``.numel()`` and ``len()`` of any intermediate value are numbers; the graph then
  assumes those shapes. ``.device`` and ``.dtype`` stay nodes of the graph.
* A torch constructor given a traced value (``torch.zeros(n, device=x.device)``) and a write
  ``x[i] = v`` become nodes of the graph (``operator.setitem``: an in-place write the passes see).
* A tensor the forward reads that is neither a parameter nor a buffer (a tensor attribute, a
  ``torch.tensor(...)`` made in forward) is a non-persistent buffer of the result: the
  state_dict keys stay the model's.
* A part of the model that still cannot be traced is kept whole: the innermost module whose
  forward failed becomes a leaf and the model is traced again; ``gm.revpass_untraced`` maps each
  such part (and each module kept whole by :func:`register_leaf`) to why
  (revpass/passes/untraced.py converts the multi-step neurons inside them by module swap).
* A model that cannot be traced at all (its own ``forward`` fails) raises :class:`TraceError`,
  which names the file and line and says what to do (register a leaf, pass ``concrete_args``).
"""

from __future__ import annotations

import contextlib
import copy
import operator
import os
import traceback
import weakref
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace as _fx_trace
from torch.fx.proxy import Attribute

from revpass.errors import RevpassError
from revpass.neurons import is_leaf, is_neuron, loaded_adapters
from revpass.nodes import Node
from revpass.nodes.spike_input import LayerOnSpikes
from revpass.state import StateReset
from revpass.utils import detached_memo, safe_deepcopy

__all__ = ["trace", "RevpassTracer", "TraceError", "register_leaf", "UNTRACED"]


class TraceError(RevpassError, RuntimeError):
    """The model could not be traced; the message says where and what to do."""


#: the attribute of a traced GraphModule that maps each part kept whole to why ({path: reason})
UNTRACED = "revpass_untraced"

_EXTRA_LEAVES: List[type] = []


def register_leaf(cls: type) -> None:
    """Keep modules of ``cls`` as single nodes when tracing (their forward is not traced; the
    multi-step neurons inside them are still converted, by module swap)."""
    if cls not in _EXTRA_LEAVES:
        _EXTRA_LEAVES.append(cls)


def _framework_leaf(m: nn.Module) -> bool:
    return isinstance(m, (Node, LayerOnSpikes, StateReset, *_EXTRA_LEAVES)) or is_leaf(m)


_NO = object()  # no example value
#: undoes fx's patches (Module.__call__, __getattr__) for a while: example values are computed by
#: running code, which must not be traced (torch 2.x; without it no example values)
_REVERT_FX_PATCHES = getattr(_fx_trace, "_maybe_revert_all_patches", None)
_ZEROS = torch.zeros  # the fresh-state node's target, whatever torch.zeros is while tracing

#: tensor constructors that take no tensor: a call with a traced value among its arguments
#: (``torch.zeros(n, device=x.device)``) becomes a node of the graph
_CONSTRUCTORS = ("zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "eye", "linspace",
                 "logspace", "tensor", "as_tensor", "scalar_tensor")


class RevpassTracer(fx.Tracer):
    """torch.fx tracer whose leaves are the neurons of every supported framework.

    ``time_steps``: when set (convert sets it from the example input's leading dimension), a
    loop over a sequence tensor (``for x in x_seq``) unrolls over that many steps.
    ``examples``: the forward's positional arguments' example values (meta tensors; None for an
    argument without one): every value then carries an example value computed alongside, and
    answers ``.shape``, ``.size()``, ``.dim()``, ``.ndim``, ``.numel()`` and ``len()`` with it.
    ``leaves``: module paths kept whole besides the framework leaves ({path: why}).
    """

    def __init__(self, time_steps: Optional[int] = None, input_shapes: Optional[List[Any]] = None,
                 examples: Optional[List[Any]] = None, leaves: Optional[Dict[str, str]] = None, **kwargs):
        super().__init__(**kwargs)
        self.time_steps = time_steps
        if examples is None and input_shapes is not None:
            examples = _examples(input_shapes)
        self.examples = list(examples) if examples is not None else None
        self.leaves = dict(leaves or {})
        self._placeholders = 0
        self._copies: Dict[Any, nn.Module] = {}  # per leaf path: its copy (its state evolves call to call)
        self._suspend: Callable[[], Any] = contextlib.nullcontext  # the frameworks' trace patches, off

    # -- leaves -----------------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.leaves or _framework_leaf(m)
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args, kwargs) -> Any:
        """As fx's; an exception raised while tracing through ``m``'s forward is marked with
        ``m``'s path, innermost first (the part :func:`trace` keeps whole on its next try)."""
        if self._made_in_forward(m):  # nn.Upsample(...)(x) in forward: its operations are the graph's
            return forward(*args, **kwargs)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "_revpass_module"):
                try:
                    path = self.path_of_module(m)
                except Exception:  # noqa: BLE001 - a module outside the model: no path to keep whole
                    path = None
                if path is not None and not self.is_leaf_module(m, path):
                    exc._revpass_module = (path, type(m).__name__)
            raise
        value = out.__dict__.get("_rp_value", _NO) if isinstance(out, fx.Proxy) else _NO
        if isinstance(value, tuple):  # a leaf returning a tuple: a tuple of its traced items
            return tuple(out[i] for i in range(len(value)))
        return out

    def _made_in_forward(self, m: nn.Module) -> bool:
        """A module that is not the model's (made in forward) and holds no tensor: tracing through
        it is exact (one with parameters would be made, so drawn, anew each call: it stays an
        error, and the part that makes it is kept whole)."""
        try:
            self.path_of_module(m)
            return False
        except NameError:
            return next(iter([*m.parameters(), *m.buffers()]), None) is None and not is_neuron(m)

    # -- values carried alongside -----------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        if self.examples is None:
            return _Proxy(node, self)
        p = _ValueProxy(node, self)
        if node.op == "placeholder":  # one per forward argument, concrete ones too, in order
            i, self._placeholders = self._placeholders, self._placeholders + 1
            if i < len(self.examples) and self.examples[i] is not None:
                p._rp_value = torch.empty_like(self.examples[i])  # its own: in-place ops may change it
        return p

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        rv = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.examples is not None and isinstance(rv, _ValueProxy) and kind != "placeholder":
            value = self._example_value(kind, target, args, kwargs)
            if value is not _NO:
                rv._rp_value = value
        return rv

    def _example_value(self, kind: str, target, args, kwargs) -> Any:
        """The value of a new node computed on the example values (meta tensors), or _NO."""
        if kind == "call_module" and not _is_submodule(self.root, target):
            return _NO  # the reset marker
        try:
            a, kw = fx.node.map_aggregate((args, kwargs), _example_of)
        except _NoValue:
            return _NO
        if _REVERT_FX_PATCHES is None:
            return _NO
        with contextlib.ExitStack() as stack:
            stack.enter_context(_REVERT_FX_PATCHES())  # fx's Module.__call__ & co.: plain calls
            stack.enter_context(self._suspend())  # and the frameworks' patches: plain code again
            stack.enter_context(torch.no_grad())
            try:
                return _as_meta(self._run(kind, target, a, kw, on_meta=True))
            except Exception:  # noqa: BLE001 - no meta kernel, or a module that needs data
                pass
            if kind not in ("call_function", "call_method", "call_module"):
                return _NO
            try:  # zeros of the same shapes, on a real device (the module's own)
                device = _device_of(self.root.get_submodule(target)) if kind == "call_module" else None
                real = fx.node.map_aggregate((a, kw), lambda v: _zeros_of(v, device))
                return _as_meta(self._run(kind, target, *real, on_meta=False))
            except Exception:  # noqa: BLE001 - no value: the node answers symbolically
                return _NO

    def _run(self, kind: str, target, args, kwargs, on_meta: bool) -> Any:
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "get_attr":
            obj = self.root
            for atom in target.split("."):
                obj = getattr(obj, atom)
            return obj
        if kind == "call_module":
            key = (target, on_meta)
            if key not in self._copies:
                m = self.root.get_submodule(target)
                self._copies[key] = _meta_copy(m) if on_meta else safe_deepcopy(m)
            return self._copies[key](*args, **kwargs)
        raise _NoValue

    def iter(self, obj):
        value = obj.__dict__.get("_rp_value", _NO)
        if isinstance(value, torch.Tensor) and value.dim():
            return iter([obj[i] for i in range(value.shape[0])])
        if isinstance(value, (tuple, list)):
            return iter([obj[i] for i in range(len(value))])
        if self.time_steps is not None:
            return iter([obj[i] for i in range(self.time_steps)])
        return super().iter(obj)


def _is_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


class _NoValue(Exception):
    pass


def _example_of(a: Any) -> Any:
    """An argument as an example value: a traced value's, a real tensor as a meta tensor."""
    if isinstance(a, fx.Proxy):
        value = a.__dict__.get("_rp_value", _NO)
        if value is _NO:
            raise _NoValue
        return value
    if isinstance(a, torch.Tensor) and a.device.type != "meta":
        return a.detach().to("meta")
    return a


def _as_meta(out: Any) -> Any:
    return fx.node.map_aggregate(
        out, lambda v: v.detach().to("meta") if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)


def _device_of(m: nn.Module) -> torch.device:
    for t in [*m.parameters(), *m.buffers()]:
        return t.device
    return torch.device("cpu")


def _zeros_of(a: Any, device: Optional[torch.device]) -> Any:
    """A meta value as zeros on ``device`` (CPU by default)."""
    device = device or torch.device("cpu")
    if isinstance(a, torch.Tensor) and a.device.type == "meta":
        return torch.zeros(a.shape, dtype=a.dtype, device=device)
    if isinstance(a, torch.device) and a.type == "meta":
        return device
    return a


def _meta_copy(m: nn.Module) -> nn.Module:
    """A copy of ``m`` whose tensors (parameters, buffers, state, constants) are meta tensors:
    ``m`` itself, its state included, is not touched."""
    memo = {}
    for sub in m.modules():
        for p in sub._parameters.values():
            if p is not None:
                memo[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
        pools = [vars(sub), sub._buffers] + [v for v in vars(sub).values() if isinstance(v, dict)]
        for pool in pools:
            stack = list(pool.values())
            while stack:
                v = stack.pop()
                if isinstance(v, torch.Tensor):
                    memo.setdefault(id(v), v.detach().to("meta"))
                elif isinstance(v, (tuple, list)):
                    stack.extend(v)
                elif isinstance(v, dict):
                    stack.extend(v.values())
    return copy.deepcopy(m, memo)


def _examples(input_shapes: List[Any]) -> List[Any]:
    """Example values (meta tensors) from example inputs or their shapes (None: no value)."""
    out = []
    for s in input_shapes:
        if isinstance(s, torch.Tensor):
            out.append(s.detach().to("meta"))
        elif s is None:
            out.append(None)
        else:
            out.append(torch.empty(tuple(s), device="meta"))
    return out


class _Proxy(fx.Proxy):
    """fx's Proxy, and ``x[i] = v`` as an ``operator.setitem`` node (an in-place write the
    passes see: revpass.passes.decide.written_in_place)."""

    def __setitem__(self, key, value) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


_Proxy.__name__ = _Proxy.__qualname__ = "Proxy"  # what an error names: "'Proxy' object cannot be ..."


class _ValueProxy(_Proxy):
    """A traced value with an example value (``_rp_value``): a tensor's answers ``.shape``,
    ``.size()``, ``.dim()``, ``.ndim``, ``.numel()`` and ``len()`` from it."""

    _CONCRETE = ("shape", "ndim", "size", "dim", "numel", "nelement")

    def __getattr__(self, k):
        value = self.__dict__.get("_rp_value", _NO)
        if isinstance(value, torch.Tensor) and k in self._CONCRETE:
            return getattr(value, k)
        if k.startswith("__") or k == "_rp_value":
            raise AttributeError(k)
        return _ValueAttribute(self, k)

    def __len__(self) -> int:
        value = self.__dict__.get("_rp_value", _NO)
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
        if isinstance(value, (tuple, list)):
            return len(value)
        return super().__len__()


class _ValueAttribute(Attribute, _ValueProxy):
    """``value.attr`` of a traced value (a node only when used as a value, as fx's Attribute);
    its example value is the attribute of the example (``.device`` of a meta tensor is 'meta',
    which a constructor in the graph never sees: the node reads the real device)."""

    def __init__(self, root: fx.Proxy, attr: str):
        super().__init__(root, attr)
        value = root.__dict__.get("_rp_value", _NO)
        if value is not _NO:
            try:
                v = getattr(value, attr)
            except Exception:  # noqa: BLE001
                v = _NO
            if v is not _NO and not callable(v):
                self._rp_value = v


_ValueProxy.__name__ = _ValueProxy.__qualname__ = "Proxy"
_ValueAttribute.__name__ = _ValueAttribute.__qualname__ = "Proxy"


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


def _constructor(tracer: "RevpassTracer", original: Callable) -> Callable:
    """``original`` (a torch constructor) as a node when a traced value is among its arguments."""

    def make(*args, **kwargs):
        found = []
        fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, fx.Proxy) else a)
        if found:
            return tracer.create_proxy("call_function", original, args, kwargs)
        return original(*args, **kwargs)

    make.__name__ = getattr(original, "__name__", "constructor")
    make.__wrapped__ = original
    return make


@contextlib.contextmanager
def _patched_frameworks(tracer: "RevpassTracer"):
    """Replace reset_net / init_leaky & co. (and torch's constructors) for the duration of a
    trace; ``tracer._suspend()`` undoes them for a while (computing example values)."""
    undo: List[Any] = []

    def patch(obj, name, new, old=None):
        old = getattr(obj, name) if old is None else old
        setattr(obj, name, new)
        undo.append((obj, name, old, new))

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
            return tracer.create_proxy("call_function", _ZEROS, (0,), {})
        raise ValueError(f"trace: unknown node kind {kind!r}")

    for name in _CONSTRUCTORS:
        original = getattr(torch, name, None)
        if original is not None:
            patch(torch, name, _constructor(tracer, original))
    for adapter in loaded_adapters():
        adapter.trace_patches(patch, make_node)

    @contextlib.contextmanager
    def suspended():
        for obj, name, old, _ in reversed(undo):
            setattr(obj, name, old)
        try:
            yield
        finally:
            for obj, name, _, new in undo:
                setattr(obj, name, new)

    tracer._suspend = suspended
    try:
        yield
    finally:
        tracer._suspend = contextlib.nullcontext
        for obj, name, old, _ in reversed(undo):
            setattr(obj, name, old)


#: torch's own package and revpass's, by where their modules are (norse/torch/ is user code)
_SKIPPED_DIRS = tuple(os.path.join(os.path.dirname(os.path.abspath(f)), "") for f in (torch.__file__, __file__))


def _where(exc: BaseException) -> str:
    """The innermost frame of user code in a traceback (not torch's own package, not revpass's):
    'file:line in function: source'."""
    frames = traceback.extract_tb(exc.__traceback__)
    for f in reversed(frames):
        if not os.path.abspath(f.filename).startswith(_SKIPPED_DIRS):
            return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    return "unknown location"


def _summary(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _shape_as_number(exc: BaseException) -> bool:
    """A shape read in forward used as a number (range(x.shape[0]), torch.zeros(x.shape[1], n))."""
    return isinstance(exc, TypeError) and "Proxy" in str(exc)


def trace(
    model: nn.Module,
    concrete_args: Optional[Dict[str, Any]] = None,
    tracer: Optional[RevpassTracer] = None,
    time_steps: Optional[int] = None,
    input_shapes: Optional[List[Any]] = None,
    example_inputs: Optional[List[Any]] = None,
    keep_untraceable: bool = True,
    leaves: Optional[Dict[str, str]] = None,
    with_values: bool = False,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that behaves like it over repeated calls.

    Forward arguments a framework's container takes for its own use (norse's
    ``SequentialState``'s ``state``) are bound by its adapter.
    autograd.Functions called in traced code stay single nodes (their backward is kept).
    ``time_steps`` unrolls loops over sequence tensors (``for x in x_seq``).
    ``input_shapes`` (the example inputs' shapes, None for non-tensors) or ``example_inputs``
    (the inputs themselves: their dtypes too): when the symbolic trace fails, the model is traced
    again with example values carried alongside (shapes read in forward are then numbers the
    graph assumes). ``keep_untraceable``: a submodule whose forward still cannot be traced is
    kept whole (innermost first) instead of failing the model; ``gm.revpass_untraced`` says which
    and why. A failure in ``model``'s own forward raises :class:`TraceError`.
    ``leaves`` ({path: why}): parts kept whole from the start (the driver's, where tracing
    through them gave a graph that is not the model); ``with_values``: carry example values from
    the first try (a framework leaf whose output is a tuple is then a tuple of traced values, so
    that ``isinstance(out, tuple)`` in forward sees what it sees when the model runs).
    """
    concrete_args = dict(concrete_args or {})
    _default_concrete_args(model, concrete_args)
    if example_inputs is not None:
        examples = _examples([t if isinstance(t, torch.Tensor) else None for t in example_inputs])
    elif input_shapes is not None:
        examples = _examples(input_shapes)
    else:
        examples = None
    own_attrs = set(vars(model))
    leaves = dict(leaves or {})
    with_values = with_values and examples is not None
    tries = 0
    limit = 2 + sum(1 for _ in model.modules())
    while True:
        tries += 1
        t = tracer or RevpassTracer(time_steps=time_steps, examples=examples if with_values else None,
                                    leaves=leaves)
        try:
            with _patched_frameworks(t):
                graph = t.trace(model, concrete_args=concrete_args or None)
            break
        except Exception as exc:  # noqa: BLE001 - retried, or re-raised with a location and a remedy
            _drop_constants(model, own_attrs)
            if tracer is not None or tries >= limit:
                raise _trace_error(model, exc) from exc
            if not with_values and examples is not None:
                with_values = True  # shapes read in forward: trace again with example values
                continue
            part = getattr(exc, "_revpass_module", None)
            if not keep_untraceable or part is None or part[0] in leaves:
                raise _trace_error(model, exc) from exc
            path, cls = part
            why = f"{cls} could not be traced: {_summary(exc)} at {_where(exc)}"
            if _shape_as_number(exc) and examples is None:
                why += " (pass example_inputs: with them shapes read in forward are numbers)"
            leaves[path] = why
    for n in list(graph.nodes):
        # concrete_args=None become `_assert_is_none(arg)` calls; the graph's own code would then
        # name that wrapped function, and a GraphModule unpickled with it leaves an entry in fx's
        # table of wrapped functions that breaks every later trace in the process
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "_assert_is_none" and not n.users:
            graph.erase_node(n)
    has_reset = any(n.op == "call_module" and n.target == _RESET_MARK for n in graph.nodes)
    root = _Root(model, has_reset)
    for n in graph.nodes:  # a tensor attribute of the model itself, or a constant fx stowed on it
        if n.op == "get_attr" and "." not in n.target and not hasattr(root, n.target):
            setattr(root, n.target, getattr(model, n.target))
    gm = fx.GraphModule(root, graph, class_name=f"Traced{type(model).__name__}")
    _constants_not_in_state_dict(gm, model)
    _drop_constants(model, own_attrs)
    type(gm).__deepcopy__ = _deepcopy_after_forward  # this GraphModule's own class
    gm.training = model.training
    if has_reset:
        gm._revpass_reset._owner = weakref.ref(gm)
    untraced = dict(leaves)
    for n in graph.nodes:  # modules kept whole on request: the neurons inside them are not in the graph
        if n.op == "call_module" and n.target not in untraced and n.target != _RESET_MARK:
            m = gm.get_submodule(n.target)
            if isinstance(m, tuple(_EXTRA_LEAVES)) and not isinstance(m, Node) and not is_neuron(m):
                untraced[n.target] = f"kept whole: {type(m).__name__} is registered with revpass.trace.register_leaf"
    setattr(gm, UNTRACED, untraced)
    gm.revpass_shapes_assumed = with_values  # the example inputs' shapes, wherever forward read one
    return gm


def _trace_error(model: nn.Module, exc: BaseException) -> TraceError:
    part = getattr(exc, "_revpass_module", None)
    inside = f" (inside '{part[0]}', a {part[1]})" if part else ""
    return TraceError(
        f"could not trace {type(model).__name__}{inside}: {type(exc).__name__}: {exc}\n"
        f"  at {_where(exc)}\n"
        "  What to do: if this is data-dependent control flow inside a module, keep that module "
        "as one node with revpass.trace.register_leaf(ItsClass) (or register it as a neuron with "
        "revpass.register_neuron); if it depends on a forward argument, fix that argument with "
        "concrete_args={'name': value}; if it reads a shape (x.ndim, x.shape[0]), pass example_inputs."
    )


def _constants_not_in_state_dict(gm: fx.GraphModule, model: nn.Module) -> None:
    """Tensors the graph reads that are neither parameters nor buffers of the model (a tensor
    attribute, a ``torch.tensor(...)`` made in forward, which fx stows on the model as
    ``_tensor_constant<n>``) are buffers of the GraphModule (fx's way: they move with ``.to``),
    kept out of its state_dict, whose keys stay the model's."""
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        prefix, _, field = n.target.rpartition(".")
        try:
            owner = model.get_submodule(prefix)
            copy_owner = gm.get_submodule(prefix)
        except AttributeError:
            continue
        if field not in owner._parameters and field not in owner._buffers and field in copy_owner._buffers:
            copy_owner._non_persistent_buffers_set.add(field)


def _drop_constants(model: nn.Module, own_attrs: set) -> None:
    """Remove the constants fx stowed on the model while tracing (the user's, with inplace)."""
    for name in set(vars(model)) - own_attrs:
        if name.startswith("_tensor_constant"):
            delattr(model, name)


def _deepcopy_after_forward(self, memo):
    """Deepcopy of a traced model that works after a forward: the frameworks' neurons left in
    it hold state that is part of an autograd graph; it is copied detached. What revpass wrote
    on it (``revpass_*``: the parts kept whole, a converted model's report and plan) is copied
    too: fx's own deepcopy keeps only what its graph calls, and a copy without
    ``revpass_untraced`` would neither list the neurons inside those parts nor keep them out of
    recomputed segments."""
    for k, v in detached_memo(self).items():
        memo.setdefault(k, v)
    res = fx.GraphModule.__deepcopy__(self, memo)
    for k, v in vars(self).items():
        if k.startswith("revpass_") and k not in vars(res):
            setattr(res, k, copy.deepcopy(v, memo))
    return res


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
