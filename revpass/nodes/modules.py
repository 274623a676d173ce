"""The replacement modules: :class:`ReversibleNode` and :class:`ExactNode`.

Both are built from a library neuron with ``Node.from_neuron(neuron)``, register the neuron's own
parameters and buffers under the same names (one copy; state_dict keys unchanged), and run a
whole (T, B, ...) sequence as one custom op. State behaves like the neuron they replace:
``reset()`` returns to the reset state (SpikingJelly's ``functional.reset_net`` calls it), and the
final state of one call is the initial state of the next when ``carry_state`` is on.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from revpass import neurons
from revpass.neurons import spec_from_module
from revpass.neurons.spec import NeuronSpec, family_of, run_sequence
from revpass.nodes import batchnorm, kernels, ops, reversible

Tensor = torch.Tensor
BACKWARDS = ("optimized", "recompute", "autograd")


class Node(nn.Module):
    """The base of revpass's neuron nodes: a whole (T, B, ...) sequence (or one step) of a
    neuron as one custom op, with the neuron's parameters, state and reset behaviour."""

    kind = "node"
    _backwards: Tuple[str, ...] = BACKWARDS

    def __init__(
        self,
        spec: NeuronSpec,
        *,
        backward: str = "optimized",
        step_mode: str = "m",
        carry_state: bool = True,
        return_state: bool = False,
        name: str = "",
    ):
        super().__init__()
        if backward not in self._backwards:
            raise ValueError(
                f"{name or type(self).__name__}: backward={backward!r}; choose one of "
                f"{', '.join(map(repr, self._backwards))}"
            )
        if step_mode not in ("s", "m"):
            raise ValueError(f"{name or type(self).__name__}: step_mode must be 's' or 'm', got {step_mode!r}")
        self.spec = spec
        self.backward_mode = backward
        self.step_mode = step_mode
        self.carry_state = carry_state
        self.return_state = return_state
        self.name = name or spec.origin
        self._param_attr: Dict[str, str] = {}
        for key, t in spec.params.items():
            attr = spec.attr_names.get(key) or f"_rp_{key}"
            if isinstance(t, nn.Parameter):
                self.register_parameter(attr, t)
            else:
                self.register_buffer(attr, t, persistent=attr in spec.attr_names.values())
            self._param_attr[key] = attr
        self.borrowed: frozenset = frozenset()  # see borrow
        self.state: Optional[Tuple[Tensor, ...]] = None
        self.plain = False  # standard tensor ops, nothing carried (revpass.export_onnx sets it)
        self.slice_min_elems: Optional[int] = None  # see set_slicing
        self._register_op()

    # -- copying and pickling --------------------------------------------------------------------
    def __getstate__(self):
        """The carried state is copied detached (after a forward it is part of an autograd graph,
        which deepcopy and pickle cannot take); the op's configuration is made again on load (a
        user's own surrogate is known to its process by a token)."""
        d = dict(self.__dict__)
        d.pop("_config", None)  # made again on load: a user's surrogate is known per process
        if d.get("state") is not None:
            d["state"] = tuple(t.detach() for t in d["state"])
        return d

    def __setstate__(self, d):
        super().__setstate__(d)
        self._register_op()

    def _register_op(self) -> None:
        backward = "optimized" if self.backward_mode == "autograd" else self.backward_mode
        self._config = ops.node_config(self.spec, tuple(self._param_attr), backward,
                                       self.__dict__.get("slice_min_elems"), self.name)

    # -- tensors another module owns ---------------------------------------------------------------
    def borrow(self, attrs) -> None:
        """Mark tensors this node holds that another module of the model owns (a hand-written
        PLIF's ``w``, read from the model in its forward): the state_dict has them once, under
        the owner's key, so that the converted model's keys are the original's and a checkpoint
        loads strictly either way (loading the owner's key sets the very tensor the node uses)."""
        self.borrowed = frozenset(attrs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for attr in self.__dict__.get("borrowed", ()):
            destination.pop(prefix + attr, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for attr in self.__dict__.get("borrowed", ()):
            if prefix + attr in missing_keys:
                missing_keys.remove(prefix + attr)

    def set_slicing(self, min_elems: Optional[int]) -> None:
        """Run the optimized backward in slices of at least ``min_elems`` elements per step
        (revpass.nodes.slicing.chunks; None: the default, slicing.CHUNK_MIN_ELEMS): smaller slices, a
        smaller transient, more kernel launches."""
        self.slice_min_elems = min_elems
        self._register_op()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_neuron(cls, neuron: nn.Module, *, name: str = "", **kwargs) -> "Node":
        """Build the node from a library neuron (SpikingJelly, snnTorch, norse or registered)."""
        spec = spec_from_module(neuron, name)
        kwargs.setdefault("step_mode", neurons.step_mode(neuron))
        kwargs.setdefault("carry_state", neurons.carries_state(neuron))
        node = cls(spec, name=name or type(neuron).__name__, **kwargs)
        # the library neuron's other persistent buffers keep their state_dict keys too
        for bname, buf in neuron.named_buffers(recurse=False):
            if bname in neuron._non_persistent_buffers_set or hasattr(node, bname):
                continue
            node.register_buffer(bname, buf)
        return node

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the reset state (as SpikingJelly's reset / snnTorch's reset_mem)."""
        self.state = None

    def detach(self) -> None:
        """Detach the carried state from the graph (truncated BPTT)."""
        if self.state is not None:
            self.state = tuple(s.detach() for s in self.state)

    def params(self) -> Dict[str, Tensor]:
        return {k: getattr(self, a) for k, a in self._param_attr.items()}

    def public_state(self, state):
        """The final state as the framework returns it (its own state type where it has one)."""
        if state is None:
            return None
        public = tuple(state[: family_of(self.spec).n_public(self.spec)])
        return self.spec.make_state(*public) if self.spec.make_state is not None else public

    def _complete(self, state, x0: Tensor):
        fam = family_of(self.spec)
        if isinstance(state, Tensor):
            state = (state,)
        state = tuple(torch.as_tensor(s, dtype=x0.dtype, device=x0.device) for s in state)
        P = fam.prepare(self.spec, {k: v.detach() for k, v in self.params().items()})
        if len(state) == len(fam.init_state(self.spec, x0[:0], P)):
            full = state
        else:
            full = fam.complete_state(self.spec, state, P)
        return tuple(s.expand_as(x0) if s.shape != x0.shape else s for s in full)

    # -- a batch norm folded in ---------------------------------------------------------------------
    _fold_now = False
    _residual: Optional[Tensor] = None

    @property
    def folded_bn(self) -> Optional[nn.Module]:
        """The batch norm folded into this node (revpass/nodes/batchnorm.py), or None."""
        return self.__dict__.get("_bn")

    def fold_batch_norm(self, bn: Optional[nn.Module]) -> None:
        """Run ``bn`` (the batch norm whose only reader is this node) inside the node, keeping
        its per-channel statistics instead of its input; the node is then called with the batch
        norm's input. The module stays where it is in the model (not a child of the node: its
        state_dict keys do not change)."""
        if bn is not None and not batchnorm.foldable_into(self, bn):
            raise ValueError(f"{self.name}: {type(bn).__name__} cannot be folded into this node (a multi-step "
                             "batch norm can, into an exact node whose neuron family rebuilds its input)")
        object.__setattr__(self, "_bn", bn)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor, state=None, residual: Optional[Tensor] = None):
        """The neuron over ``x`` (from ``state``, else the carried or reset state). With a folded
        batch norm, ``x`` is its input, and ``residual`` what the model adds to its output before
        the neuron (``bn(x) + residual``: the exact node folds that too, docs/method.md section 12)."""
        bn = self.folded_bn
        if bn is None:
            if residual is not None:
                raise TypeError(f"{self.name}: residual= is the addend of a folded batch norm's output; "
                                "this node has none")
            return self._forward(x, state)
        if not batchnorm.applies(self, bn, x, residual):
            z = bn(x)
            return self._forward(z if residual is None else z + residual, state)
        self._fold_now, self._residual = True, residual
        try:
            return self._forward(x, state)
        finally:
            self._fold_now, self._residual = False, None

    def _forward(self, x: Tensor, state=None):
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}: expected a tensor input, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{self.name}: input dtype {x.dtype} is not floating point; spiking nodes run on "
                "float32/float64 (float16/bfloat16 inputs are computed in float32; cast the input, "
                "e.g. x.float())."
            )
        single = self.step_mode == "s"
        xs = x.unsqueeze(0) if single else x
        if xs.dim() < 2:
            raise ValueError(
                f"{self.name}: expected input (T, B, ...) in step_mode='m' or (B, ...) in "
                f"step_mode='s', got shape {tuple(x.shape)}"
            )
        half = xs.dtype in (torch.float16, torch.bfloat16)
        if half:  # the membrane accumulates in float32; the output returns in the input's dtype
            xs = xs.float()
        explicit = state is not None
        if state is None and self.carry_state and self.state is not None:
            state = self.state
            if state[0].shape != xs.shape[1:] or state[0].dtype != xs.dtype:
                state = None  # shape or dtype changed: start again, as SpikingJelly does
        x0 = xs[0] if xs.shape[0] else xs.new_empty(xs.shape[1:])
        state0 = None if state is None else self._complete(state, x0)
        if self.plain:
            with torch.no_grad():
                y, stateT = self._run_plain(xs, state0)
        else:
            y, stateT = self._run(xs, state0)
        if self.carry_state and not self.plain:
            self.state = stateT
        y = y[0] if single else y
        if half:
            y = y.to(x.dtype)
        if self.return_state or explicit:
            return y, self.public_state(stateT)
        return y

    def _run(self, x, state0):
        raise NotImplementedError

    def _run_plain(self, x, state0):
        """The forward in standard tensor ops (no custom op, no autograd): what an exporter traces."""
        raise NotImplementedError

    def _op_args(self, state0):
        P = self.params()
        names = list(self._param_attr)
        params = [P[n] for n in names]
        need = sum(1 << i for i, p in enumerate(params) if p.requires_grad and torch.is_grad_enabled())
        return [] if state0 is None else list(state0), params, need

    # -- reports --------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, backward={self.backward_mode!r}, step_mode={self.step_mode!r}"


class ReversibleNode(Node):
    """The reversible node of docs/method.md sections 2 to 5.

    Splits channels (dim 2 of a (T, B, C, ...) input) into halves coupled by two copies F and G of
    the neuron (shared parameters): Y1 = X1 + S^F(X2), Y2 = X2 + S^G(Y1). Keeps for backward only
    Y, F's spikes packed 8 per byte, and a non-reset initial state. With an odd channel count
    the unpaired channel runs through the exact node (see :meth:`report`).
    """

    kind = "reversible"

    def _run(self, x, state0):
        if self._fold_now:
            return batchnorm.run(self, self.folded_bn, x, state0)
        if self.backward_mode == "autograd":
            return reversible.reversible_forward_autograd(self.spec, x, state0, self.params())
        s0, params, need = self._op_args(state0)
        y, _, _, stateT = ops.run_op("reversible", x, s0, params, self._config, need)
        return y, tuple(stateT)

    def _run_plain(self, x, state0):
        y, _, _, stateT = reversible.reversible_forward(self.spec, x, state0, self.params())
        return y, stateT

    def report(self, channels: Optional[int] = None) -> Dict[str, object]:
        """How the node lays out ``channels`` channels (paired reversibly, unpaired exact)."""
        out: Dict[str, object] = {"kind": self.kind, "neuron": self.spec.describe(), "backward": self.backward_mode}
        if channels is not None:
            c = channels // 2
            out.update(channels=channels, paired=2 * c, unpaired=channels - 2 * c)
            if channels - 2 * c:
                out["note"] = (
                    f"{channels} channels: {2 * c} run reversibly as {c} pairs; the unpaired "
                    f"channel {channels - 1} runs through the exact node"
                    + (" (all of them: fewer than 2 channels)" if c == 0 else "")
                )
            else:
                out["note"] = f"{channels} channels: {c} reversible pairs"
        return out


class ExactNode(Node):
    """The exact node of docs/method.md section 6: the original neuron's function bit for bit, with the
    analytic backward; keeps the pre-spike membrane H_t (one float per element and step)."""

    kind = "exact"
    _backwards = ("optimized", "autograd")

    def _run(self, x, state0):
        if self._fold_now:
            return batchnorm.run(self, self.folded_bn, x, state0, self._residual)
        if self.backward_mode == "autograd":
            s, stateT, _, _ = run_sequence(self.spec, x, state0, self.params(), autograd=True)
            return s, stateT
        if (not torch.is_grad_enabled() and type(x) is Tensor and x.shape[0] and not torch.compiler.is_compiling()
                and kernels.choose(x, self.spec, self.params()) == "torch"):
            # nothing differentiates it (a recomputed segment's forward, inference): the same ops
            # without the records a backward would read (one float per element and step less)
            return self._run_plain(x, state0)
        s0, params, need = self._op_args(state0)
        s, _, stateT = ops.run_op("exact", x, s0, params, self._config, need)
        return s, tuple(stateT)

    def _run_plain(self, x, state0):
        s, stateT, _, _ = run_sequence(self.spec, x, state0, self.params())
        return s, stateT
