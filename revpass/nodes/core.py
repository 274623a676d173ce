"""The node algorithms, framework-free: forward, reconstruction and the three backwards.

Layout (METHOD.md section 2): the input X (T, B, C, ...) is split along the channel dim 2 into
X1 = X[:, :, :c], X2 = X[:, :, c:2c] with c = C // 2, and a remainder X3 = X[:, :, 2c:] of zero
or one channel. Neuron F charges from X2 and its spikes are added to X1; neuron G charges from
Y1 and its spikes are added to X2. The unpaired channel (odd C) runs through the exact node.
Per channel the parameters are those of the original neuron: G sits on channels [0, c), F on
[c, 2c), the remainder on [2c, C); states are laid out the same way.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from revpass.neurons.spec import NeuronSpec, Params, State, family_of, run_sequence

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# channel layout
# ---------------------------------------------------------------------------------------------


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


def _join(parts: List[Optional[Tensor]], dim: int, likes: List[Tensor]) -> Tensor:
    return torch.cat([p if p is not None else torch.zeros_like(like) for p, like in zip(parts, likes)], dim)


# ---------------------------------------------------------------------------------------------
# bit packing: 8 spikes per byte
# ---------------------------------------------------------------------------------------------

def is_binary(t: Tensor) -> bool:
    """Every element is 0 or 1 (spikes): a floating-point tensor with data (not on meta)."""
    return (t.is_floating_point() and t.numel() > 0 and t.device.type != "meta"
            and bool(((t == 0) | (t == 1)).all()))


def pack_bits(b: Tensor) -> Tensor:
    """(T, ...) bool -> (T, ceil(n/8)) uint8, n = elements per step."""
    T = b.shape[0]
    flat = b.reshape(T, -1)
    n = flat.shape[1]
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(T, pad)], 1)
    flat = flat.view(T, -1, 8).to(torch.uint8)
    out = flat[..., 0].clone()
    for i in range(1, 8):
        out |= flat[..., i] << i
    return out


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of pack_bits; ``shape`` is the (T, ...) shape of the bool tensor."""
    T = packed.shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(T, -1)[:, :n].reshape(shape).bool()


def n_packed_bytes(T: int, n: int) -> Tuple[int, int]:
    return (T, (n + 7) // 8)


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def init_state(spec: NeuronSpec, x: Tensor, P: Params) -> State:
    fam = family_of(spec)
    x0 = x[0] if x.shape[0] else x.new_empty(x.shape[1:])
    return fam.init_state(spec, x0, fam.prepare(spec, P))


def state_part(layout: Layout, state: State, part: str, x0: Tensor) -> State:
    return tuple(layout.step(s, part, x0) for s in state)


def _bits_shape(layout: Layout, nb: int, x: Tensor):
    f = layout.seq(x, "f")
    return (x.shape[0], nb) + tuple(f.shape[1:])


# ---------------------------------------------------------------------------------------------
# reversible node
# ---------------------------------------------------------------------------------------------


def reversible_forward(
    spec: NeuronSpec,
    x: Tensor,
    state0: Optional[State],
    P: Params,
    need_params: Sequence[str] = (),
) -> Tuple[Tensor, Tensor, Tensor, State]:
    """Forward without autograd. Returns (Y, packed F bits, kept tensors of the unpaired
    channel (K, T, ...), final state)."""
    fam = family_of(spec)
    L = Layout(x.shape)
    T = x.shape[0]
    x0 = x[0] if T else x.new_empty(x.shape[1:])
    if state0 is None:
        state0 = init_state(spec, x, P)
    y = torch.empty_like(x)
    PG = fam.prepare(spec, L.params(P, "g"))
    PF = fam.prepare(spec, L.params(P, "f"))
    A = state_part(L, state0, "f", x0)
    B = state_part(L, state0, "g", x0)
    X1, X2 = L.seq(x, "g"), L.seq(x, "f")
    Y1, Y2 = L.seq(y, "g"), L.seq(y, "f")
    nb = fam.n_bits(spec)
    bits = torch.empty(_bits_shape(L, nb, x), dtype=torch.bool, device=x.device)
    if L.c:
        for t in range(T):
            sF, A, _, bF = fam.step(spec, X2[t], A, PF)
            y1 = X1[t] + sF
            Y1[t] = y1
            sG, B, _, _ = fam.step(spec, y1, B, PG)
            Y2[t] = X2[t] + sG
            for i in range(nb):
                bits[t, i] = bF[i]
    keep = fam.exact_keep(spec, need_params)
    if L.n_rem != 0:
        R = state_part(L, state0, "r", x0)
        sR, R, recs, _ = run_sequence(spec, L.seq(x, "r"), R, L.params(P, "r"), record=keep)
        L.seq(y, "r").copy_(sR)
        rem = L.seq(x, "r")
        kept = torch.stack([recs[k] for k in keep]) if T else rem.new_empty((len(keep),) + rem.shape)
    else:
        R = None
        kept = x.new_empty((len(keep),) + L.seq(x, "r").shape)
    if L.C == 0:
        stateT = R
    else:
        parts = [B, A] + ([R] if R is not None else [])
        stateT = tuple(torch.cat([p[i] for p in parts], 1) for i in range(len(state0)))
    return y, pack_bits(bits), kept, stateT


def reversible_forward_autograd(
    spec: NeuronSpec,
    x: Tensor,
    state0: Optional[State],
    P: Params,
    bits: Optional[Tensor] = None,
    include_rem: bool = True,
) -> Tuple[Tensor, State]:
    """The same forward under plain autograd (the oracle), optionally with F's spikes pinned."""
    fam = family_of(spec)
    L = Layout(x.shape)
    T = x.shape[0]
    x0 = x[0] if T else x.new_empty(x.shape[1:])
    if state0 is None:
        state0 = init_state(spec, x, P)
    PG = fam.prepare(spec, L.params(P, "g"))
    PF = fam.prepare(spec, L.params(P, "f"))
    A = state_part(L, state0, "f", x0)
    B = state_part(L, state0, "g", x0)
    X1, X2 = L.seq(x, "g"), L.seq(x, "f")
    y1s, y2s = [], []
    for t in range(T if L.c else 0):
        bt = None if bits is None else tuple(bits[t, i] for i in range(bits.shape[1]))
        sF, A, _, _ = fam.step(spec, X2[t], A, PF, bits=bt, autograd=True)
        y1 = X1[t] + sF
        sG, B, _, _ = fam.step(spec, y1, B, PG, autograd=True)
        y1s.append(y1)
        y2s.append(X2[t] + sG)
    pieces = []
    if L.c and T:
        pieces = [torch.stack(y1s), torch.stack(y2s)]
    elif L.c:
        pieces = [X1 * 1, X2 * 1]
    R = None
    if include_rem and L.n_rem != 0:
        R = state_part(L, state0, "r", x0)
        sR, R, _, _ = run_sequence(spec, L.seq(x, "r"), R, L.params(P, "r"), autograd=True)
        pieces.append(sR)
    y = torch.cat(pieces, 2) if L.C else pieces[-1]
    if L.C == 0:
        return y, R
    parts = [B, A] + ([R] if R is not None else [])
    return y, tuple(torch.cat([p[i] for p in parts], 1) for i in range(len(state0)))


def _rebuild_g(spec, L: Layout, y: Tensor, state0: State, P: Params, record: bool):
    """G, recomputed bit-exactly from Y1 (same inputs, same operations), and X2 = Y2 - S^G."""
    fam = family_of(spec)
    x0 = y[0] if y.shape[0] else y.new_empty(y.shape[1:])
    PG = fam.prepare(spec, L.params(P, "g"))
    sG, _, recsG, _ = run_sequence(
        spec, L.seq(y, "g"), state_part(L, state0, "g", x0), PG, record=record, prepared=True
    )
    X2 = L.seq(y, "f") - sG  # one rounding step away from the true X2 at most
    return PG, recsG, X2


def _rebuild_f(spec, L: Layout, y: Tensor, bits: Tensor, X2: Tensor, state0: State, P: Params, record: bool):
    """F, rebuilt forward in time from X2 with its stored spike decisions (``bits``, unpacked)
    pinned."""
    fam = family_of(spec)
    x0 = y[0] if y.shape[0] else y.new_empty(y.shape[1:])
    PF = fam.prepare(spec, L.params(P, "f"))
    sF, _, recsF, _ = run_sequence(
        spec, X2, state_part(L, state0, "f", x0), PF, bits=bits, record=record, prepared=True
    )
    return PF, recsF, sF


def _split_gstate(L: Layout, g_state: Optional[State], part: str, x0: Tensor) -> Optional[State]:
    if g_state is None:
        return None
    return tuple(L.step(g, part, x0) for g in g_state)


def _rem_backward(spec, L, gy, kept, state0, P, need_params, g_state, x0):
    fam = family_of(spec)
    keep = fam.exact_keep(spec, need_params)
    PR = fam.prepare(spec, L.params(P, "r"))
    R0 = state_part(L, state0, "r", x0)
    recs = fam.recs_from_kept(spec, dict(zip(keep, kept)), R0, PR)
    return fam.vjp(spec, recs, L.seq(gy, "r"), _split_gstate(L, g_state, "r", x0), PR, need_params)


def reversible_backward(
    spec: NeuronSpec,
    gy: Tensor,
    g_state: Optional[State],
    y: Tensor,
    packed: Tensor,
    kept: Tensor,
    state0: Optional[State],
    P: Params,
    need_params: Sequence[str],
    mode: str = "optimized",
    on_slice=None,
    min_elems: Optional[int] = None,
) -> Tuple[Tensor, Optional[State], Dict[str, Tensor]]:
    """Gradients of the reversible node from what it kept: (gx, g state0, g params).

    The optimized backward runs in slices of the batch or a spatial dim (:func:`chunks`): each
    element's neuron depends on no other element, so the slices are independent, and the
    transient records and factors are those of one slice, not of the whole sequence. With
    ``on_slice`` (even channel counts) it calls ``on_slice(slice, x, gx)`` after each slice with
    the rebuilt input and its gradient (a folded batch norm's backward reads them:
    revpass/nodes/batchnorm.py). ``min_elems``: elements per step of a slice (default
    CHUNK_MIN_ELEMS)."""
    L = Layout(y.shape)
    bits = unpack_bits(packed, _bits_shape(L, family_of(spec).n_bits(spec), y)) if L.c else None
    if mode != "optimized":
        return _reversible_backward(spec, gy, g_state, y, bits, kept, state0, P, need_params, mode)
    if on_slice is not None and (L.n_rem != 0 or not L.c):
        raise ValueError(f"rebuilding the input needs an even channel count, got shape {tuple(y.shape)}")

    def run(sl, out):
        x = None if on_slice is None else torch.empty_like(sl(y))
        res = _reversible_backward(spec, sl(gy), sl.state(g_state), sl(y), sl.inner(bits), sl.inner(kept),
                                   sl.state(state0), P, need_params, mode, out=out, x_out=x)
        if on_slice is not None:
            on_slice(sl, x, res[0])
        return res

    return _in_chunks(run, gy, state0, P, min_elems)


def _reversible_backward(spec, gy, g_state, y, bits, kept, state0, P, need_params, mode="optimized", out=None,
                         x_out=None):
    fam = family_of(spec)
    L = Layout(y.shape)
    x0 = y[0] if y.shape[0] else y.new_empty(y.shape[1:])
    given_state = state0 is not None
    if state0 is None:
        state0 = init_state(spec, y, P)
    grads: Dict[str, Dict[str, Tensor]] = {}
    gs_parts: Dict[str, Optional[State]] = {}
    gx = torch.empty_like(gy) if out is None else out  # each part writes its own channels
    if L.c:
        if mode == "optimized":
            # G first: its spikes feed Y2, so dL/dS^G = dL/dY2 is known for every step; G's records
            # are dropped before F's are built (a lower peak)
            gY1, gY2 = L.seq(gy, "g"), L.seq(gy, "f")
            PG, recs, X2 = _rebuild_g(spec, L, y, state0, P, record=True)
            if x_out is not None:
                L.seq(x_out, "f").copy_(X2)
            gY1_G, gB0, grads["g"] = fam.vjp(
                spec, recs, gY2, _split_gstate(L, g_state, "g", x0), PG, need_params
            )
            gX1 = torch.add(gY1, gY1_G, out=L.seq(gx, "g"))
            del recs, gY1_G
            PF, recs, sF = _rebuild_f(spec, L, y, bits, X2, state0, P, record=True)
            if x_out is not None:
                torch.sub(L.seq(y, "g"), sF, out=L.seq(x_out, "g"))  # X1 = Y1 - S^F
            del X2, sF
            gX2_F, gA0, grads["f"] = fam.vjp(
                spec, recs, gX1, _split_gstate(L, g_state, "f", x0), PF, need_params
            )
            torch.add(gY2, gX2_F, out=L.seq(gx, "f"))
            gs_parts = {"g": gB0, "f": gA0}
        elif mode == "recompute":
            gs_parts, grads = _recompute_backward(
                spec, L, gy, g_state, y, bits, state0, P, need_params, x0, gx
            )
        else:
            raise ValueError(f"unknown backward mode {mode!r}")
    if L.n_rem != 0:
        gX3, gR0, grads["r"] = _rem_backward(spec, L, gy, kept, state0, P, need_params, g_state, x0)
        L.seq(gx, "r").copy_(gX3)
        gs_parts["r"] = gR0
    g_state0 = None
    if given_state:
        g_state0 = _join_state_grads(L, gs_parts, state0, x0)
    gP = L.join_param_grads(P, grads) if L.C else grads.get("r", {})
    return gx, g_state0, gP


# ---------------------------------------------------------------------------------------------
# the backward in slices
# ---------------------------------------------------------------------------------------------

#: the optimized backwards run in at most CHUNK_MAX slices of at least CHUNK_MIN_ELEMS elements
#: of a step each. A slice costs a fixed number of kernel launches per step (a few dozen small
#: ops), and its work grows with its elements per step, so the bound is per step and holds at any
#: T. By default slices are large enough that the launches cost little (2^18 elements: on a CPU,
#: slices of 2^15 elements per step made a node's backward 1.5x slower); revpass.convert gives its
#: nodes CHUNK_MIN_ELEMS_FINE, memory first (:meth:`revpass.nodes.modules._Node.set_slicing`).
#: Set CHUNK_MAX = 1 to run whole sequences.
CHUNK_MAX = 8
CHUNK_MIN_ELEMS = 1 << 18
CHUNK_MIN_ELEMS_FINE = 1 << 12


def chunks(shape: Sequence[int], P: Params, min_elems: Optional[int] = None
           ) -> Optional[Tuple[int, List[Tuple[int, int]]]]:
    """How a (T, B, C, ...) sequence's backward is sliced: (dim, [(lo, hi), ...]) or None (whole).

    The slices run along the batch dim or a spatial dim (never T, which the sweep runs along,
    nor the channel dim, which the reversible node pairs) along which no parameter varies; the
    dim allowing the most slices is taken: the batch dim on a tie, else the outermost."""
    per_step = 1
    for s in shape[1:]:
        per_step *= s
    n = min(CHUNK_MAX, per_step // max(1, CHUNK_MIN_ELEMS if min_elems is None else min_elems))
    if n < 2 or len(shape) < 2:
        return None
    step_ndim = len(shape) - 1

    def free(d):
        j = d - 1  # the dim in a step's (B, C, ...) shape
        return all(not (0 <= p.dim() - step_ndim + j < p.dim()) or p.shape[p.dim() - step_ndim + j] == 1
                   for p in P.values())

    dims = [d for d in (1, *range(3, len(shape))) if free(d)]
    if not dims:
        return None
    d = max(dims, key=lambda d: (min(shape[d], n), d == 1, -d))
    k = min(n, shape[d])
    if k < 2:
        return None
    bounds = [i * shape[d] // k for i in range(k + 1)]
    return d, list(zip(bounds[:-1], bounds[1:]))


class _Slice:
    """One slice [lo, hi) of a (T, B, C, ...) sequence's dim ``d``, applied to the tensors the
    backward reads: sequences (dim d), stacked records and bits (K, T, ..., dim d + 1) and
    per-step states (B, C, ..., dim d - 1, broadcast ones expanded first)."""

    def __init__(self, d: int, lo: int, hi: int, step_shape: Sequence[int]):
        self.d, self.lo, self.n, self.step_shape = d, lo, hi - lo, tuple(step_shape)

    def __call__(self, t: Tensor) -> Tensor:
        return t.narrow(self.d, self.lo, self.n)

    def inner(self, t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.narrow(self.d + 1, self.lo, self.n)

    def step(self, t: Tensor) -> Tensor:
        """A per-step (B, C, ...) tensor's slice."""
        return t.narrow(self.d - 1, self.lo, self.n)

    def state(self, state: Optional[State]) -> Optional[State]:
        if state is None:
            return None
        return tuple(self.step(s.expand(self.step_shape)) for s in state)


def slices(shape: Sequence[int], P: Params, min_elems: Optional[int] = None) -> List[Any]:
    """The slices a (T, B, C, ...) sequence's backward runs in (:func:`chunks`): one whole-sequence
    slice, or :class:`_Slice` objects."""
    plan = chunks(shape, P, min_elems) if shape[0] else None
    if plan is None:
        return [_Whole()]
    d, ranges = plan
    return [_Slice(d, lo, hi, shape[1:]) for lo, hi in ranges]


def _in_chunks(run, g: Tensor, state0: Optional[State], P: Params, min_elems: Optional[int] = None):
    """Run a node's backward ``run(slice, out)`` slice by slice (:func:`slices`), writing the
    input gradient into one tensor, the initial states' gradients into others, and summing the
    parameter gradients."""
    parts = slices(g.shape, P, min_elems)
    if isinstance(parts[0], _Whole):
        return run(parts[0], None)
    gx = torch.empty_like(g)
    g0 = None if state0 is None else [torch.empty_like(g[0]) for _ in state0]
    gP: Dict[str, Tensor] = {}
    for sl in parts:
        out = sl(gx)
        gxc, g0c, gPc = run(sl, out)
        if gxc.data_ptr() != out.data_ptr() or gxc.stride() != out.stride():
            out.copy_(gxc)
        if g0 is not None:
            for full, part in zip(g0, g0c):
                sl.step(full).copy_(part)
        for k, v in gPc.items():
            gP[k] = v if k not in gP else gP[k] + v
        del gxc, g0c, gPc  # before the next slice allocates its own
    return gx, (None if g0 is None else tuple(g0)), gP


class _Whole:
    """The identity slice: the whole sequence."""

    def __call__(self, t):
        return t

    def inner(self, t):
        return t

    def step(self, t):
        return t

    def state(self, state):
        return state


def _join_state_grads(L: Layout, gs_parts, state0: State, x0: Tensor) -> State:
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
        out.append(_join(pieces, 1, likes))
    return tuple(out)


def _recompute_backward(spec, L, gy, g_state, y, bits, state0, P, need_params, x0, gx):
    """RevTorch-style baseline: reconstruct the inputs, re-run the forward under autograd."""
    _, _, X2 = _rebuild_g(spec, L, y, state0, P, record=False)
    _, _, sF = _rebuild_f(spec, L, y, bits, X2, state0, P, record=False)
    X1 = L.seq(y, "g") - sF
    with torch.enable_grad():
        xr = torch.cat([X1, X2], 2).detach().requires_grad_(True)
        Pl = {k: (v.detach().requires_grad_(True) if k in need_params else v.detach()) for k, v in P.items()}
        paired = 2 * L.c
        s0 = tuple(s.expand_as(x0).narrow(1, 0, paired).detach().requires_grad_(True) for s in state0)
        yr, sT = reversible_forward_autograd(spec, xr, s0, Pl, bits=bits, include_rem=False)
        outs = [yr]
        gouts = [gy.narrow(2, 0, paired)]
        if g_state is not None:
            for s, g in zip(sT, g_state):
                if s.requires_grad:
                    outs.append(s)
                    gouts.append(g.expand_as(x0).narrow(1, 0, paired))
        ins = [xr, *s0] + [Pl[k] for k in need_params]
        gr = torch.autograd.grad(outs, ins, gouts, allow_unused=True)
    gs = gr[1 : 1 + len(s0)]
    gP = {k: g for k, g in zip(need_params, gr[1 + len(s0) :]) if g is not None}
    gs_parts = {
        "g": tuple(None if g is None else g.narrow(1, 0, L.c) for g in gs),
        "f": tuple(None if g is None else g.narrow(1, L.c, L.c) for g in gs),
    }
    # parameter grads from the recompute are already full-shape over the paired channels
    grads = {"g": {}, "f": {}}
    for k, g in gP.items():
        _, axis = L.param(P[k], "g")
        if axis is None:
            grads["g"][k] = g
        else:
            grads["g"][k] = g.narrow(axis, 0, L.c)
            grads["f"][k] = g.narrow(axis, L.c, L.c)
    gx.narrow(2, 0, 2 * L.c).copy_(gr[0])
    return gs_parts, grads


# ---------------------------------------------------------------------------------------------
# exact node
# ---------------------------------------------------------------------------------------------


def exact_forward(
    spec: NeuronSpec, x: Tensor, state0: Optional[State], P: Params, need_params: Sequence[str]
) -> Tuple[Tensor, Tensor, State]:
    """Forward without autograd: (spikes, kept (K, T, ...), final state)."""
    fam = family_of(spec)
    keep = fam.exact_keep(spec, need_params)
    s, stateT, recs, _ = run_sequence(spec, x, state0, P, record=keep)
    kept = torch.stack([recs[k] for k in keep]) if x.shape[0] else x.new_empty((len(keep),) + x.shape)
    if stateT is None or len(stateT) == 0:
        stateT = init_state(spec, x, P)
    return s, kept, stateT


def exact_backward(
    spec: NeuronSpec,
    gs: Tensor,
    g_state: Optional[State],
    kept: Tensor,
    state0: Optional[State],
    P: Params,
    need_params: Sequence[str],
    min_elems: Optional[int] = None,
) -> Tuple[Tensor, Optional[State], Dict[str, Tensor]]:
    """Gradients of the exact node from its kept records: the family's
    :meth:`~revpass.neurons.spec.Family.exact_stream` where it has one (the framework's own
    backward, bit for bit), else its ``vjp`` in slices as :func:`reversible_backward`
    (``min_elems``: elements per step of a slice, default CHUNK_MIN_ELEMS)."""

    fam = family_of(spec)
    keep = fam.exact_keep(spec, need_params)
    streamed = fam.exact_stream(spec, dict(zip(keep, kept)), gs, g_state, fam.prepare(spec, P), need_params)
    if streamed is not None:  # the framework's own backward, step by step: no slices
        return _state_grad_or_none(gs, state0, *streamed)

    def run(sl, out):
        return _exact_backward(spec, sl(gs), sl.state(g_state), sl.inner(kept), sl.state(state0), P,
                               need_params)

    return _in_chunks(run, gs, state0, P, min_elems)


def _exact_backward(spec, gs, g_state, kept, state0, P, need_params):
    fam = family_of(spec)
    given = state0
    if state0 is None:
        state0 = init_state(spec, gs, P)
    keep = fam.exact_keep(spec, need_params)
    Pp = fam.prepare(spec, P)
    recs = fam.recs_from_kept(spec, dict(zip(keep, kept)), state0, Pp)
    return _state_grad_or_none(gs, given, *fam.vjp(spec, recs, gs, g_state, Pp, need_params))


def _state_grad_or_none(gs, state0, gx, g0, gP):
    """The initial state's gradient where a state was given (zeros for a part the backward left
    None), None where the node started from its reset state."""
    if state0 is not None:
        x0 = gs[0] if gs.shape[0] else gs.new_empty(gs.shape[1:])
        g0 = tuple(
            torch.zeros_like(s.expand_as(x0)) if g0 is None or g0[i] is None else g0[i]
            for i, s in enumerate(state0)
        )
    else:
        g0 = None
    return gx, g0, gP
