"""The reversible node's algorithms, framework-free (docs/method.md): forward, reconstruction and
the three backwards, in PyTorch ops. The channel layout is revpass.nodes.layout's."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from revpass.neurons.spec import NeuronSpec, Params, State, family_of, run_sequence
from revpass.nodes.bits import pack_planes, unpack_planes
from revpass.nodes.layout import Layout, bits_shape, init_state, join_state_grads, split_state, state_part
from revpass.nodes.slicing import in_chunks

Tensor = torch.Tensor


def _pair(spec: NeuronSpec, x: Tensor, state0: Optional[State], P: Params):
    """What every pass over the pairs starts from: (family, layout, one step of ``x`` for
    shapes, the initial state (the reset state if None), G's and F's prepared parameters, G's
    and F's initial states)."""
    fam = family_of(spec)
    L = Layout(x.shape)
    x0 = x[0] if x.shape[0] else x.new_empty(x.shape[1:])
    if state0 is None:
        state0 = init_state(spec, x, P)
    PG = fam.prepare(spec, L.params(P, "g"))
    PF = fam.prepare(spec, L.params(P, "f"))
    return fam, L, x0, state0, PG, PF, state_part(L, state0, "g", x0), state_part(L, state0, "f", x0)


def reversible_forward(
    spec: NeuronSpec,
    x: Tensor,
    state0: Optional[State],
    P: Params,
    need_params: Sequence[str] = (),
) -> Tuple[Tensor, Tensor, Tensor, State]:
    """Forward without autograd. Returns (Y, packed F bits, kept tensors of the unpaired
    channel (K, T, ...), final state)."""
    fam, L, x0, state0, PG, PF, B, A = _pair(spec, x, state0, P)
    T = x.shape[0]
    y = torch.empty_like(x)
    X1, X2 = L.seq(x, "g"), L.seq(x, "f")
    Y1, Y2 = L.seq(y, "g"), L.seq(y, "f")
    nb = fam.n_bits(spec)
    bits = torch.empty(bits_shape(L, nb, x), dtype=torch.bool, device=x.device)
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
    return y, pack_planes(bits), kept, stateT


def reversible_forward_autograd(
    spec: NeuronSpec,
    x: Tensor,
    state0: Optional[State],
    P: Params,
    bits: Optional[Tensor] = None,
    include_rem: bool = True,
) -> Tuple[Tensor, State]:
    """The same forward under plain autograd (the oracle), optionally with F's spikes pinned."""
    fam, L, x0, state0, PG, PF, B, A = _pair(spec, x, state0, P)
    T = x.shape[0]
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


def _rebuild(spec, y: Tensor, bits: Tensor, state0: State, P: Params, hG: Tensor, hF: Tensor,
             x_out: Optional[Tensor] = None):
    """G and F rebuilt step by step: G from Y1 (bit-exactly: the same inputs and operations),
    X2 = Y2 - S^G (one rounding step from the true X2 at most), F from X2 with its stored
    decisions (``bits``, unpacked) pinned. Writes the membranes into ``hG`` and ``hF`` (the input
    gradient's slots for those channels: docs/method.md) and X2 into ``x_out``'s F channels if
    given; returns the parts' prepared parameters and their other records, stacked, with the
    membrane views as records 'h'."""
    fam, L, _, _, PG, PF, B, A = _pair(spec, y, state0, P)
    T = y.shape[0]
    Y1, Y2 = L.seq(y, "g"), L.seq(y, "f")
    X2 = None if x_out is None else L.seq(x_out, "f")
    rg: Dict[str, list] = {}
    rf: Dict[str, list] = {}
    for t in range(T):
        sG, B, rec, _ = fam.step(spec, Y1[t], B, PG)
        hG[t].copy_(rec.pop("h"))
        for k, v in rec.items():
            rg.setdefault(k, []).append(v)
        x2 = Y2[t] - sG if X2 is None else torch.sub(Y2[t], sG, out=X2[t])
        A, rec = fam.rebuild_step(spec, x2, A, PF, tuple(bits[t, i] for i in range(bits.shape[1])))
        hF[t].copy_(rec.pop("h"))
        for k, v in rec.items():
            rf.setdefault(k, []).append(v)
    recsG = {k: torch.stack(v) for k, v in rg.items()}
    recsF = {k: torch.stack(v) for k, v in rf.items()}
    recsG["h"], recsF["h"] = hG, hF
    return PG, PF, recsG, recsF


def _rem_backward(spec, L, gy, kept, state0, P, need_params, g_state, x0):
    fam = family_of(spec)
    keep = fam.exact_keep(spec, need_params)
    PR = fam.prepare(spec, L.params(P, "r"))
    R0 = state_part(L, state0, "r", x0)
    recs = fam.recs_from_kept(spec, dict(zip(keep, kept)), R0, PR)
    return fam.vjp(spec, recs, L.seq(gy, "r"), split_state(L, g_state, "r", x0), PR, need_params)


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
    bits = unpack_planes(packed, bits_shape(L, family_of(spec).n_bits(spec), y)) if L.c else None
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

    return in_chunks(run, gy, state0, P, min_elems)


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
            gY1, gY2 = L.seq(gy, "g"), L.seq(gy, "f")
            # the membranes go where their channels' gradients will: no buffer of their own
            hG, hF = L.seq(gx, "g"), L.seq(gx, "f")
            PG, PF, recs, recsF = _rebuild(spec, y, bits, state0, P, hG, hF, x_out)
            gY1_G, gB0, grads["g"] = fam.vjp(spec, recs, gY2, split_state(L, g_state, "g", x0), PG, need_params)
            del recs
            gX1 = torch.add(gY1, gY1_G, out=hG)  # G's membranes are read: its slots take dL/dX1
            del gY1_G
            if x_out is not None:
                torch.sub(L.seq(y, "g"), recsF["s"], out=L.seq(x_out, "g"))  # X1 = Y1 - S^F (unit spikes)
            gX2_F, gA0, grads["f"] = fam.vjp(spec, recsF, gX1, split_state(L, g_state, "f", x0), PF, need_params)
            del recsF
            torch.add(gY2, gX2_F, out=hF)
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
        g_state0 = join_state_grads(L, gs_parts, state0, x0)
    gP = L.join_param_grads(P, grads) if L.C else grads.get("r", {})
    return gx, g_state0, gP


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
