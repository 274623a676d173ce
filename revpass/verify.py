"""revpass.verify: run two models from the same state and compare outputs and every gradient."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from revpass.nodes.modules import ReversibleNode, _Node
from revpass.trace import reset_states


@dataclass
class TensorCheck:
    name: str
    max_abs: float
    max_rel: float
    passed: bool


@dataclass
class VerifyReport:
    """Per tensor (outputs, input gradients, parameter gradients): max abs and rel error, pass."""

    against: str
    rtol: float
    atol: float
    precision: str = ""
    checks: List[TensorCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> List[TensorCheck]:
        return [c for c in self.checks if not c.passed]

    def __str__(self) -> str:
        w = max([len("tensor")] + [len(c.name) for c in self.checks])
        lines = [
            f"revpass verify against {self.against}, in {self.precision}: "
            f"{'PASS' if self.passed else 'FAIL'} "
            f"({len(self.checks) - len(self.failures())}/{len(self.checks)} tensors within "
            f"|a - b| <= {self.atol:g} + {self.rtol:g} |b|)",
            f"{'tensor'.ljust(w)}  {'max abs err':>12}  {'max rel err':>12}  result",
        ]
        for c in self.checks:
            lines.append(f"{c.name.ljust(w)}  {c.max_abs:12.3e}  {c.max_rel:12.3e}  {'pass' if c.passed else 'FAIL'}")
        return "\n".join(lines)

    __repr__ = __str__


def _flatten(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    return []


def with_backward(model: nn.Module, backward: str) -> nn.Module:
    """A copy of a converted model whose revpass nodes use another backward."""
    from revpass.api import safe_deepcopy

    twin = safe_deepcopy(model)
    for m in twin.modules():
        if isinstance(m, _Node):
            m.backward_mode = backward
            m._register_op()
    return twin


def _run(model: nn.Module, inputs: Sequence[Any], loss_fn, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same dropout masks and other randomness in both runs
        return _run_seeded(model, inputs, loss_fn, seed)


def _run_seeded(model: nn.Module, inputs: Sequence[Any], loss_fn, seed: int):
    reset_states(model)
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    out = model(*leaves)
    outs = _flatten(out)
    if loss_fn is not None:
        loss = loss_fn(out)
    else:
        g = torch.Generator().manual_seed(seed)
        loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o)).sum() for o in outs if o.is_floating_point())
    params = dict(model.named_parameters())
    targets = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad] + list(params.values())
    grads = torch.autograd.grad(loss, targets, allow_unused=True)
    n_in = len(targets) - len(params)
    return [o.detach() for o in outs], grads[:n_in], dict(zip(params, grads[n_in:]))


def verify(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Union[torch.Tensor, Sequence[Any]],
    loss_fn: Optional[Callable[[Any], torch.Tensor]] = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    seed: int = 0,
    dtype: Optional[torch.dtype] = torch.float64,
) -> VerifyReport:
    """Compare ``candidate`` with ``reference`` from the same (reset) state: outputs, the gradient
    of every input and every parameter (matched by name).

    A reversible conversion computes a different function from the original, so when
    ``candidate`` holds reversible nodes and ``reference`` does not, the reference becomes the
    candidate itself with ``backward="autograd"`` (the oracle); for an exact conversion the
    reference is the original model. The loss is ``loss_fn(output)``, or a fixed random weighting
    of every output.

    Both models run on copies in ``dtype`` (float64 by default): float32 rounding compounds
    through a deep network (batch norm amplifies it) and would swamp the tolerance without saying
    anything about the conversion. A model that cannot run in ``dtype`` (snnTorch computes its
    spikes in float32) is compared in its own precision; the report says which was used.
    ``dtype=None`` compares the models as they are.
    """
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if dtype is not None:
        try:
            return _verify_in(reference, candidate, inputs, loss_fn, rtol, atol, seed, dtype)
        except RuntimeError as exc:
            if "dtype" not in str(exc) and "type" not in str(exc):
                raise
    return _verify_in(reference, candidate, inputs, loss_fn, rtol, atol, seed, None)


def _verify_in(reference, candidate, inputs, loss_fn, rtol, atol, seed, dtype) -> VerifyReport:
    from revpass.api import safe_deepcopy

    if dtype is not None:
        reference = safe_deepcopy(reference).to(dtype)
        candidate = safe_deepcopy(candidate).to(dtype)
        inputs = [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    against = "the reference model"
    cand_rev = any(isinstance(m, ReversibleNode) for m in candidate.modules())
    ref_rev = any(isinstance(m, ReversibleNode) for m in reference.modules())
    if cand_rev and not ref_rev:
        reference = with_backward(candidate, "autograd")
        against = "the same converted model with backward='autograd'"
    ref = _run(reference, inputs, loss_fn, seed)
    got = _run(candidate, inputs, loss_fn, seed)
    rep = VerifyReport(against=against, rtol=rtol, atol=atol,
                       precision=str(dtype or "the models' own precision").replace("torch.", ""))

    def add(name, a, b):
        if a is None and b is None:
            return
        if a is None or b is None:
            rep.checks.append(TensorCheck(name, float("inf"), float("inf"), False))
            return
        a, b = a.double(), b.double()
        if a.shape != b.shape:
            rep.checks.append(TensorCheck(name + " (shape differs)", float("inf"), float("inf"), False))
            return
        err = (a - b).abs()
        mabs = float(err.max()) if err.numel() else 0.0
        mrel = float((err / b.abs().clamp_min(1e-30)).max()) if err.numel() else 0.0
        ok = bool((err <= atol + rtol * b.abs()).all())
        rep.checks.append(TensorCheck(name, mabs, mrel, ok))

    for i, (a, b) in enumerate(zip(got[0], ref[0])):
        add(f"output[{i}]", a, b)
    if len(got[0]) != len(ref[0]):
        rep.checks.append(TensorCheck("outputs (count differs)", float("inf"), float("inf"), False))
    for i, (a, b) in enumerate(zip(got[1], ref[1])):
        add(f"grad input[{i}]", a, b)
    for name in sorted(set(got[2]) | set(ref[2])):
        add(f"grad {name}", got[2].get(name), ref[2].get(name))
    return rep
