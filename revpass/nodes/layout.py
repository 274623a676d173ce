"""The reversible node's channel layout (docs/method.md, "The reversible node").

The input X (T, B, C, ...) is split along the channel dim 2 into X1 = X[:, :, :c] (G's part),
X2 = X[:, :, c:2c] (F's part) with c = C // 2, and a remainder X3 = X[:, :, 2c:] of zero or one
channel (odd C), which runs through the exact node. Neuron F charges from X2 and its spikes are
added to X1; neuron G charges from Y1 and its spikes are added to X2. Per channel the parameters
are those of the original neuron: G sits on channels [0, c), F on [c, 2c), the remainder on
[2c, C); states and state gradients are laid out the same way, cat(G, F, R) along channels.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from revpass.neurons.spec import NeuronSpec, Params, State, family_of

Tensor = torch.Tensor

class Layout:
    """Channel split of a (T, B, C, ...) input: G part, F part, remainder."""

    def __init__(self, x_shape: Sequence[int]):
        self.shape = tuple(x_shape)
        self.C = x_shape[2] if len(x_shape) >= 3 else 0
        self.c = self.C // 2
        self.step_ndim = len(x_shape) - 1
        # with no channel dim, everything goes through the exact node
        self.parts = {
            "g": (0, self.c),
            "f": (self.c, 2 * self.c),
            "r": (2 * self.c, self.C),
        }

    @property
    def n_rem(self) -> int:
        return self.C - 2 * self.c if self.C else -1  # -1: no channel dim, all exact

    def seq(self, t: Tensor, part: str) -> Tensor:
        """A (T, B, C, ...) tensor's part."""
        if self.C == 0:
            return t if part == "r" else t[:, :, :0] if t.dim() >= 3 else t[:0]
        lo, hi = self.parts[part]
        return t.narrow(2, lo, hi - lo)

    def step(self, t: Tensor, part: str, like: Tensor) -> Tensor:
        """A per-step (B, C, ...) tensor's part; broadcast state is expanded first."""
        t = t.expand_as(like) if t.shape != like.shape else t
        if self.C == 0:
            return t
        lo, hi = self.parts[part]
        return t.narrow(1, lo, hi - lo)

    def param(self, p: Tensor, part: str) -> Tuple[Tensor, Optional[int]]:
        """A parameter's slice for a part, and the axis it was sliced on (None: shared)."""
        if self.C == 0:
            return p, None
        axis = p.dim() - self.step_ndim + 1
        if 0 <= axis < p.dim() and p.shape[axis] > 1:
            lo, hi = self.parts[part]
            return p.narrow(axis, lo, hi - lo), axis
        return p, None

    def params(self, P: Params, part: str) -> Params:
        return {k: self.param(v, part)[0] for k, v in P.items()}

    def join_param_grads(self, P: Params, grads: Dict[str, Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Assemble per-part parameter gradients into full-shape ones."""
        out = {}
        for name, p in P.items():
            parts = [(k, grads[k][name]) for k in ("g", "f", "r") if name in grads.get(k, {})]
            if not parts:
                continue
            _, axis = self.param(p, "g")
            if axis is None:
                total = parts[0][1]
                for _, g in parts[1:]:
                    total = total + g
                out[name] = total
            else:
                out[name] = torch.cat([g for _, g in parts], axis)
        return out


def join(parts: List[Optional[Tensor]], dim: int, likes: List[Tensor]) -> Tensor:
    return torch.cat([p if p is not None else torch.zeros_like(like) for p, like in zip(parts, likes)], dim)


# ---------------------------------------------------------------------------------------------
# bit packing: 8 spikes per byte

def init_state(spec: NeuronSpec, x: Tensor, P: Params) -> State:
    fam = family_of(spec)
    x0 = x[0] if x.shape[0] else x.new_empty(x.shape[1:])
    return fam.init_state(spec, x0, fam.prepare(spec, P))


def state_part(layout: Layout, state: State, part: str, x0: Tensor) -> State:
    return tuple(layout.step(s, part, x0) for s in state)


def bits_shape(layout: Layout, nb: int, x: Tensor) -> Tuple[int, ...]:
    """The (T, nb, B, c, ...) shape of F's unpacked decisions for an input ``x``."""
    f = layout.seq(x, "f")
    return (x.shape[0], nb) + tuple(f.shape[1:])


def split_state(L: Layout, g_state: Optional[State], part: str, x0: Tensor) -> Optional[State]:
    """A part of a state gradient, or None."""
    if g_state is None:
        return None
    return tuple(L.step(g, part, x0) for g in g_state)


def join_state_grads(L: Layout, gs_parts, state0: State, x0: Tensor) -> State:
    if L.C == 0:
        g = gs_parts.get("r")
        return tuple(torch.zeros_like(s.expand_as(x0)) if g is None or g[i] is None else g[i]
                     for i, s in enumerate(state0))
    out = []
    order = [k for k in ("g", "f", "r") if L.parts[k][1] > L.parts[k][0]]
    for i, s in enumerate(state0):
        pieces, likes = [], []
        for k in order:
            g = gs_parts.get(k)
            like = L.step(s, k, x0)
            pieces.append(None if g is None or g[i] is None else g[i])
            likes.append(like)
        out.append(join(pieces, 1, likes))
    return tuple(out)

