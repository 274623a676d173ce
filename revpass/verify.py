"""revpass.verify: run a converted model and its reference from the same state and compare
outputs and every gradient; run the converted model in its own dtype too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from revpass.nodes import Node, ReversibleNode
from revpass.reference import CouplingError, SiteLog, build_reference, converted_sites, first_tensor
from revpass.state import reset_states
from revpass.utils import as_tuple, flatten, safe_deepcopy

__all__ = ["verify", "VerifyReport", "TensorCheck", "with_backward"]

Tensor = torch.Tensor


@dataclass
class TensorCheck:
    name: str
    max_abs: float
    max_rel: float
    passed: bool


@dataclass
class VerifyReport:
    """Per tensor (outputs, input gradients, parameter gradients): max abs and rel error, pass.

    ``problems``: failures that are not one tensor's error (the reference or the converted model
    could not run, non-finite values in the converted model's own dtype). ``first_site``: the
    first converted site, in forward order, whose output differs from the reference's (with
    ``site_note`` saying more), or None. ``oracle``: the second part for a reversible conversion,
    the converted model against itself with ``backward="autograd"``. ``notes``: what else the
    check found or assumed."""

    against: str
    rtol: float
    atol: float
    precision: str = ""
    checks: List[TensorCheck] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    first_site: Optional[str] = None
    site_note: str = ""
    oracle: Optional["VerifyReport"] = None
    notes: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (not self.problems and all(c.passed for c in self.checks)
                and (self.oracle is None or self.oracle.passed))

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> List[TensorCheck]:
        """The tensors out of tolerance, the second part's included."""
        own = [c for c in self.checks if not c.passed]
        return own + (self.oracle.failures() if self.oracle is not None else [])

    def _table(self, verdict: bool, more: str = "") -> List[str]:
        ok = sum(c.passed for c in self.checks)
        lines = [
            f"revpass verify against {self.against}, in {self.precision}: {'PASS' if verdict else 'FAIL'} "
            f"({ok}/{len(self.checks)} tensors within |a - b| <= {self.atol:g} + {self.rtol:g} |b|{more})"
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        if self.first_site is not None:
            lines.append(f"  first site whose output differs (forward order): '{self.first_site}'; {self.site_note}")
        elif self.site_note:
            lines.append(f"  {self.site_note}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.checks:
            w = max([len("tensor")] + [len(c.name) for c in self.checks])
            lines.append(f"{'tensor'.ljust(w)}  {'max abs err':>12}  {'max rel err':>12}  result")
            for c in self.checks:
                result = "pass" if c.passed else "FAIL"
                lines.append(f"{c.name.ljust(w)}  {c.max_abs:12.3e}  {c.max_rel:12.3e}  {result}")
        return lines

    def __str__(self) -> str:
        """The verdict (both parts) and this part's counts on the first line, then the problems,
        the first differing site, the table, and the second part's."""
        if self.oracle is None:
            return "\n".join(self._table(self.passed))
        o = self.oracle
        more = (f"; second part {'PASS' if o.passed else 'FAIL'}, "
                f"{sum(c.passed for c in o.checks)}/{len(o.checks)}")
        lines = self._table(self.passed, more)
        lines += ["", "second part: " + "\n".join(o._table(o.passed))]
        return "\n".join(lines)

    __repr__ = __str__


def with_backward(model: nn.Module, backward: str) -> nn.Module:
    """A copy of a converted model whose revpass nodes use another backward."""
    twin = safe_deepcopy(model)
    for m in twin.modules():
        if isinstance(m, Node):
            m.backward_mode = backward
            m._register_op()
    return twin


class _RunError(Exception):
    """A model's forward or backward raised (``stage``; the cause is ``__cause__``)."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


_Result = Tuple[List[Tensor], Tuple[Optional[Tensor], ...], Dict[str, Optional[Tensor]]]


def _run(model: nn.Module, inputs: Sequence[Any], loss_fn, seed: int,
         params: Optional[Dict[str, Tensor]] = None, before: Optional[Callable[[], None]] = None) -> _Result:
    """(outputs, input gradients, parameter gradients by name) of one forward and backward from
    the reset state, with the same random numbers (dropout masks) for every model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reset_states(model)
        if before is not None:
            before()
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, Tensor) else x
                  for x in inputs]
        try:
            out = model(*leaves)
        except Exception as exc:  # noqa: BLE001 - the caller reports it
            raise _RunError("forward") from exc
        outs = flatten(out)
        try:
            if loss_fn is not None:
                loss = loss_fn(out)
            else:
                g = torch.Generator().manual_seed(seed)
                loss = sum((_widened(o) * torch.randn(o.shape, generator=g).to(_widened(o))).sum()
                           for o in outs if o.is_floating_point())
            params = dict(model.named_parameters()) if params is None else params
            params = {k: p for k, p in params.items() if p.requires_grad}  # frozen ones have no gradient
            targets = [x for x in leaves if isinstance(x, Tensor) and x.requires_grad] + list(params.values())
            grads = torch.autograd.grad(loss, targets, allow_unused=True)
        except Exception as exc:  # noqa: BLE001
            raise _RunError("backward") from exc
    n_in = len(targets) - len(params)
    return [o.detach() for o in outs], grads[:n_in], dict(zip(params, grads[n_in:]))


def _widened(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _dtype_trouble(exc: BaseException) -> bool:
    """A RuntimeError about dtypes (a model that cannot run in the comparison dtype), possibly
    the cause of a run or coupling error."""
    while exc is not None:
        if isinstance(exc, RuntimeError) and not isinstance(exc, CouplingError) and (
                "dtype" in str(exc) or "type" in str(exc)):
            return True
        exc = exc.__cause__
    return False


def _describe(err: _RunError) -> str:
    cause = err.__cause__
    return f"{type(cause).__name__}: {cause}" if cause is not None else err.stage


def verify(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Union[torch.Tensor, Sequence[Any]],
    loss_fn: Optional[Callable[[Any], torch.Tensor]] = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    seed: int = 0,
    dtype: Optional[torch.dtype] = torch.float64,
    concrete_args: Optional[Dict[str, Any]] = None,
) -> VerifyReport:
    """Compare converted model ``candidate`` with the original model ``reference`` from the same
    (reset) state: outputs, the gradient of every input and every parameter (matched by name).

    For an exact conversion the reference is the original model. A reversible conversion
    computes another function; the reference is then the original model with each reversible
    site replaced by the coupling of its **original neuron** on the channel halves
    (Y1 = X1 + F(X2), Y2 = X2 + G(Y1), the unpaired channel of an odd count through the neuron;
    revpass/reference.py), under plain autograd: a neuron whose spec is wrong, or a converted
    model whose weights are not the original's, fails. A second part compares the converted
    model's own backward with ``backward="autograd"``. When a site's output differs, the report
    names the first such site in forward order. A site whose neuron cannot run on half its
    channels fails, saying why.

    The loss is ``loss_fn(output)``, or a fixed random weighting of every output. The models run
    on copies in ``dtype`` (float64 by default): float32 rounding compounds through a deep
    network (batch norm amplifies it) and would swamp the tolerance without saying anything about
    the conversion. Every floating tensor the copies hold is cast, not only parameters and
    buffers: a framework's constants kept elsewhere (norse's ``p``, a named tuple of tensors)
    would leave the original computing partly in float32 (norse's ``dt * tau_mem_inv`` is 0.1f,
    1.5e-8 off 0.1) against a node whose constants, buffers, are in ``dtype``: two functions
    that differ by more than float64 rounding, which deep networks amplify past the tolerance.
    A model that cannot run in ``dtype`` is compared in its own precision; the report says which
    was used. ``dtype=None`` compares the models as they are. The converted
    model also runs forward and backward in its own dtype: an error or a non-finite value there
    is a failure. ``concrete_args``: what convert was given, for tracing the original when it
    holds hand-written neurons (kind c).
    """
    inputs = as_tuple(example_inputs)
    sites = converted_sites(candidate)  # from the model itself: a copy has no report
    rep = got = None
    if dtype is not None:
        try:
            rep, got = _verify_in(reference, candidate, sites, inputs, loss_fn, rtol, atol, seed, dtype, concrete_args)
        except _DtypeFallback:
            rep = None
    if rep is None:
        rep, got = _verify_in(reference, candidate, sites, inputs, loss_fn, rtol, atol, seed, None, concrete_args)
    own = _own_dtype(candidate, inputs)
    if rep.precision == str(own).replace("torch.", "") or rep.precision == "the models' own precision":
        if got is not None:
            rep.problems += _non_finite(got, own)
    else:
        rep.problems += _own_dtype_run(candidate, inputs, loss_fn, seed, own)
    return rep


class _DtypeFallback(Exception):
    """A model cannot run in the comparison dtype: compare in the models' own precision."""


def _verify_in(reference, candidate, sites, inputs, loss_fn, rtol, atol, seed, dtype, concrete_args):
    ref_model = safe_deepcopy(reference)
    cand = safe_deepcopy(candidate)
    if dtype is not None:
        ref_model, cand = _to_dtype(ref_model, dtype), _to_dtype(cand, dtype)
        inputs = [x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x for x in inputs]
    reversible = any(isinstance(m, ReversibleNode) for m in cand.modules())
    rep = VerifyReport(against="the original model", rtol=rtol, atol=atol,
                       precision=str(dtype or "the models' own precision").replace("torch.", ""))

    def attempt(fn, what):
        try:
            return fn()
        except (_RunError, CouplingError) as exc:
            if dtype is not None and _dtype_trouble(exc):
                raise _DtypeFallback() from exc
            if isinstance(exc, _RunError):
                rep.problems.append(f"{what}: its {exc.stage} raised {_describe(exc)}")
            else:
                rep.problems.append(f"{what}: {exc}")
            return None

    params, before, ref_log = None, None, SiteLog()
    if reversible:
        built = build_reference(ref_model, sites, inputs, concrete_args)
        rep.against = ("the original model, each reversible site replaced by the coupling "
                       "Y1 = X1 + F(X2), Y2 = X2 + G(Y1) of its original neuron")
        rep.problems += built.problems
        rep.notes += built.notes
        ref_model, params, before, ref_log = built.model, built.params, built.restart, built.log
        oracle_model = with_backward(cand, "autograd")  # before the hooks go on cand

    cand_log = SiteLog()
    hooks = _record_sites(cand, sites, cand_log) if reversible else []
    try:
        got = attempt(lambda: _run(cand, inputs, loss_fn, seed), "the converted model")
    finally:
        for h in hooks:
            h.remove()
    ref = None
    if not rep.problems:
        what = "the reference (the original model, its reversible sites coupled)" if reversible \
            else "the original model"
        ref = attempt(lambda: _run(ref_model, inputs, loss_fn, seed, params, before), what)
    if got is not None and ref is not None:
        _compare(rep, got, ref)
        if reversible:
            _first_site(rep, ref_log, cand_log)
    if reversible and got is not None:
        oracle = VerifyReport(against="the same converted model with backward='autograd' (its own backward's check)",
                              rtol=rtol, atol=atol, precision=rep.precision)
        try:
            _compare(oracle, got, _run(oracle_model, inputs, loss_fn, seed))
        except _RunError as exc:
            oracle.problems.append(f"the converted model with backward='autograd': its {exc.stage} raised "
                                   f"{_describe(exc)}")
        rep.oracle = oracle
    return rep, got


def _to_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, and also every floating tensor its modules hold outside their
    parameters and buffers, in attributes, tuples (named tuples), lists and dicts: the constants
    a framework keeps there (norse's ``p``, a named tuple of float32 tensors) would otherwise stay
    in their own dtype, and the model would compute in float64 another function than its own
    (norse's ``dt * tau_mem_inv`` rounded to float32) while a revpass node, whose constants are
    buffers, computes the float64 one. ``model`` is a copy: changed in place."""
    model = model.to(dtype)
    for m in model.modules():
        for name, value in list(vars(m).items()):
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            new = _cast_held(value, dtype, 0)
            if new is not value:
                m.__dict__[name] = new  # past a module's own __setattr__
    return model


def _cast_held(v: Any, dtype: torch.dtype, depth: int) -> Any:
    """``v`` with its floating tensors (not parameters) in ``dtype``; tuples rebuilt, lists and
    dicts changed in place; ``v`` itself when nothing changed."""
    if isinstance(v, Tensor):
        if v.is_floating_point() and not isinstance(v, nn.Parameter) and v.dtype != dtype:
            return v.to(dtype)
        return v
    if depth > 4:
        return v
    if isinstance(v, tuple):
        items = [_cast_held(i, dtype, depth + 1) for i in v]
        if all(a is b for a, b in zip(items, v)):
            return v
        try:
            return type(v)(*items) if hasattr(v, "_fields") else type(v)(items)
        except TypeError:  # a tuple type built otherwise: left as it is
            return v
    if isinstance(v, list):
        for i, item in enumerate(v):
            v[i] = _cast_held(item, dtype, depth + 1)
    elif isinstance(v, dict):
        for k, item in list(v.items()):
            v[k] = _cast_held(item, dtype, depth + 1)
    return v


def _compare(rep: VerifyReport, got: _Result, ref: _Result) -> None:
    """Append a check per output, input gradient and parameter gradient (``got`` against ``ref``)."""
    def add(name, a, b):
        if a is None and b is None:
            return
        if a is None or b is None:
            missing = "the converted model" if a is None else "the reference"
            rep.checks.append(TensorCheck(f"{name} (none in {missing})", float("inf"), float("inf"), False))
            return
        if a.shape != b.shape:
            rep.checks.append(TensorCheck(name + " (shape differs)", float("inf"), float("inf"), False))
            return
        mabs, mrel, ok = _close(a, b, rep.rtol, rep.atol)
        rep.checks.append(TensorCheck(name, mabs, mrel, ok))

    for i, (a, b) in enumerate(zip(got[0], ref[0])):
        add(f"output[{i}]", a, b)
    if len(got[0]) != len(ref[0]):
        rep.checks.append(TensorCheck("outputs (count differs)", float("inf"), float("inf"), False))
    for i, (a, b) in enumerate(zip(got[1], ref[1])):
        add(f"grad input[{i}]", a, b)
    for name in sorted(set(got[2]) | set(ref[2])):
        add(f"grad {name}", got[2].get(name), ref[2].get(name))


def _close(a: Tensor, b: Tensor, rtol: float, atol: float) -> Tuple[float, float, bool]:
    a, b = a.double(), b.double()
    err = (a - b).abs()
    if not err.numel():
        return 0.0, 0.0, True
    mabs = float(err.max())
    mrel = float((err / b.abs().clamp_min(1e-30)).max())
    return mabs, mrel, bool((err <= atol + rtol * b.abs()).all())


def _record_sites(cand: nn.Module, sites, log: SiteLog) -> list:
    """Forward hooks recording the input and output of the converted model's reversible nodes at
    ``sites`` (no input where a batch norm is folded into the node: it is called with the batch
    norm's input)."""
    hooks = []
    for site in sites:
        try:
            node = cand.get_submodule(site.path)
        except AttributeError:
            continue
        if site.decision != "reversible" or not isinstance(node, ReversibleNode):
            continue

        def hook(mod, args, out, path=site.path):
            folded = getattr(mod, "folded_bn", None) is not None
            x = args[0] if args and isinstance(args[0], Tensor) and not folded else None
            log.record(path, x, first_tensor(out))

        hooks.append(node.register_forward_hook(hook))
    return hooks


def _first_site(rep: VerifyReport, ref_log: SiteLog, cand_log: SiteLog) -> None:
    """Name the first site (in the reference's forward order) whose output differs."""
    for path in ref_log.calls:
        ref_calls, got_calls = ref_log.sequences(path), cand_log.sequences(path)
        if len(ref_calls) != len(got_calls):
            rep.first_site = path
            rep.site_note = (f"the reference called it {len(ref_calls)} times, the converted model "
                             f"{len(got_calls)} times")
            return
        for (rx, ry), (gx, gy) in zip(ref_calls, got_calls):
            if ry.shape == gy.shape and _close(gy, ry, rep.rtol, rep.atol)[2]:
                continue
            rep.first_site = path
            if ry.shape != gy.shape:
                err = f"output shape {tuple(gy.shape)}, the reference's {tuple(ry.shape)}"
            else:
                err = f"max abs err {_close(gy, ry, rep.rtol, rep.atol)[0]:.3e}"
            if rx is None or gx is None:
                rep.site_note = err
            elif rx.shape == gx.shape and _close(gx, rx, rep.rtol, rep.atol)[2]:
                rep.site_note = (f"{err}, from the same input: the converted neuron is not the original one "
                                 "(a registered neuron's spec, or the node)")
            else:
                rep.site_note = (f"{err}; its input differs already: the difference starts before it "
                                 "(the layers that feed it, or their weights)")
            return
    if (rep.problems or not all(c.passed for c in rep.checks)) and ref_log.calls:
        rep.site_note = "every converted site's output matches the reference's: the difference is elsewhere"


def _own_dtype(model: nn.Module, inputs: Sequence[Any]) -> torch.dtype:
    """The dtype ``model`` computes in: its first floating parameter's or buffer's, else its
    first floating input's."""
    for t in list(model.parameters()) + list(model.buffers()) + [x for x in inputs if isinstance(x, Tensor)]:
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _non_finite(got: _Result, dtype: torch.dtype) -> List[str]:
    outs, gin, gp = got
    named = [(f"output[{i}]", t) for i, t in enumerate(outs)] + [(f"grad input[{i}]", t) for i, t in enumerate(gin)]
    named += [(f"grad {k}", t) for k, t in gp.items()]
    bad = [n for n, t in named if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return []
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return [f"non-finite values (inf or NaN) in the converted model's {', '.join(bad[:5])}{more}, "
            f"in its own dtype ({str(dtype).replace('torch.', '')})"]


def _own_dtype_run(candidate: nn.Module, inputs: Sequence[Any], loss_fn, seed: int, dtype: torch.dtype) -> List[str]:
    """The converted model's forward and backward in its own dtype (a copy): the problems found."""
    try:
        got = _run(safe_deepcopy(candidate), inputs, loss_fn, seed)
    except _RunError as exc:
        return [f"the converted model's {exc.stage} in its own dtype ({str(dtype).replace('torch.', '')}) "
                f"raised {_describe(exc)}"]
    return _non_finite(got, dtype)
