"""The exact node as two Triton kernels: a forward over T keeping the pre-spike membrane, and a
reverse sweep computing every gradient from it (docs/method.md, "The exact node").

Both address a window of channels of a (T, B, C, ...) sequence (revpass.nodes.kernels.common.
window), so the reversible node runs its unpaired channel through them. The backward needs no
transient: what a step's gradient needs of the step before (PLIF's previous membrane, snnTorch's
reset signal) it reads from the kept membranes; snnTorch's reset signal without reset_delay, a
recurrence, is computed in a first forward pass into the input gradient's buffer, which the
reverse sweep then overwrites step by step.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from revpass.neurons.spec import NeuronSpec, Params, State, family_of
from revpass.nodes.kernels import LEAKY_SYNAPTIC, LIF, common, family_id
from revpass.nodes.kernels.surrogates import div
from revpass.nodes.kernels.neuron import (
    block_window,
    bwd_step,
    decide,
    fwd_step,
    load_consts,
    load_state,
    sj_reset,
    snn_unext,
    store_state,
)

Tensor = torch.Tensor

#: per-element parameter-gradient terms the backward sums over T (neuron.bwd_step's ta..td)
N_TERMS = 4


_INTS = ["T", "NW", "NS", "CS", "LO", "WS"]


@triton.jit(do_not_specialize=_INTS)
def _exact_forward(x_ptr, y_ptr, kept_ptr, i0, i1, i2, o0, o1, o2, sc_ptr,
                   T, NW, NS, CS, LO, WS,
                   FAM: tl.constexpr, KIND: tl.constexpr, RESET: tl.constexpr, DECAY: tl.constexpr,
                   DETACH: tl.constexpr, DELAY: tl.constexpr, FIRE_GE: tl.constexpr, SURR: tl.constexpr,
                   HAS_STATE: tl.constexpr, KEEP_SYN: tl.constexpr, BLOCK: tl.constexpr):
    n, mask, a = block_window(NW, WS, CS, LO, 0, BLOCK)
    c0, c1, c2, c3, c4, _ = load_consts(sc_ptr)
    xs = x_ptr + a
    ys = y_ptr + a
    ks = kept_ptr + n
    NS64 = NS.to(tl.int64)
    NW64 = NW.to(tl.int64)
    like = tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty)
    v0, v1, v2 = load_state(i0, i1, i2, a, mask, like, c1, c2, FAM, HAS_STATE)
    for _ in range(T):
        x = tl.load(xs, mask=mask, other=0.0)
        s, sp, h, v0, v1, v2, rn = fwd_step(x, v0, v1, v2, c0, c1, c2, c3, c4, x, x,
                                            FAM, KIND, RESET, DECAY, DELAY, FIRE_GE, False)
        tl.store(ys, s, mask=mask)
        tl.store(ks, h, mask=mask)
        if KEEP_SYN:
            tl.store(ks + T * NW64, v0, mask=mask)
        xs += NS64
        ys += NS64
        ks += NW64
    store_state(o0, o1, o2, a, v0, v1, v2, mask)


@triton.jit(do_not_specialize=_INTS)
def _exact_backward(gs_ptr, gx_ptr, kept_ptr, gi0, gi1, gi2, i0, i1, i2, o0, o1, o2, gp_ptr, sc_ptr,
                    T, NW, NS, CS, LO, WS,
                    FAM: tl.constexpr, KIND: tl.constexpr, RESET: tl.constexpr, DECAY: tl.constexpr,
                    DETACH: tl.constexpr, DELAY: tl.constexpr, FIRE_GE: tl.constexpr, SURR: tl.constexpr,
                    HAS_STATE: tl.constexpr, HAS_GSTATE: tl.constexpr, KEEP_SYN: tl.constexpr,
                    NEED_PREV: tl.constexpr, NEED_PG: tl.constexpr, BLOCK: tl.constexpr):
    n, mask, a = block_window(NW, WS, CS, LO, 0, BLOCK)
    c0, c1, c2, c3, c4, c5 = load_consts(sc_ptr)
    NS64 = NS.to(tl.int64)
    NW64 = NW.to(tl.int64)
    like = tl.zeros([BLOCK], dtype=kept_ptr.dtype.element_ty)
    s0, s1, s2 = load_state(i0, i1, i2, a, mask, like, c1, c2, FAM, HAS_STATE)
    if FAM == 1:
        if not DELAY:  # the reset signal, a recurrence: forward once, into gx's buffer
            r = s2
            ks = kept_ptr + n
            gxs = gx_ptr + a
            for _ in range(T):
                tl.store(gxs, r, mask=mask)
                h = tl.load(ks, mask=mask, other=0.0)
                sp = decide(h - c1, h, False, FIRE_GE)
                u = snn_unext(h, sp, r, c1, c2, RESET, DELAY)
                r = (u - c1 > 0).to(h.dtype)
                ks += NW64
                gxs += NS64
    g0, g1, g2 = load_state(gi0, gi1, gi2, a, mask, like, c1, c2, -1, HAS_GSTATE)
    acc_a = like
    acc_b = like
    acc_c = like
    acc_d = like
    last = (T - 1).to(tl.int64)
    ks = kept_ptr + n + last * NW64
    gss = gs_ptr + a + last * NS64
    gxs = gx_ptr + a + last * NS64
    h_next = tl.load(ks, mask=mask & (T > 0), other=0.0)
    for i in range(T):
        t = T - 1 - i
        h = h_next
        if FAM <= 1:
            sp = decide(h - c1, h, False, FIRE_GE)
        else:
            sp = decide(h - c3, h, False, FIRE_GE)
        has_prev = t > 0
        hp = tl.load(ks - NW64, mask=mask & has_prev, other=0.0)
        h_next = hp
        r = like
        up = like
        synp = like
        dq = like
        if NEED_PREV:
            if FAM == 0:
                spp = decide(hp - c1, hp, False, FIRE_GE)
                vprev = tl.where(has_prev, sj_reset(hp, spp, c1, c2, RESET), s0)
                if DECAY:
                    dq = div(h - vprev, c0)
                else:
                    dq = -(vprev - c2)
            else:
                spp = decide(hp - c1, hp, False, FIRE_GE)
                if DELAY:
                    r = tl.where(has_prev, spp, s2)
                    up = tl.where(has_prev, hp, s1)
                else:
                    r = tl.load(gxs, mask=mask, other=0.0)
                    rp = tl.load(gxs - NS64, mask=mask & has_prev, other=0.0)
                    up = tl.where(has_prev, snn_unext(hp, spp, rp, c1, c2, RESET, DELAY), s1)
                if KEEP_SYN:
                    synp = tl.where(has_prev, tl.load(ks + (T - 1) * NW64, mask=mask & has_prev, other=0.0), s0)
        gs = tl.load(gss, mask=mask, other=0.0)
        gx, g0, g1, g2, ta, tb, tc, td = bwd_step(gs, g0, g1, g2, h, sp, r, up, synp, dq,
                                                  c0, c1, c2, c3, c4, c5,
                                                  FAM, KIND, RESET, DECAY, DETACH, DELAY, SURR)
        tl.store(gxs, gx, mask=mask)
        if NEED_PG:
            acc_a += ta
            acc_b += tb
            acc_c += tc
            acc_d += td
        ks -= NW64
        gss -= NS64
        gxs -= NS64
    if HAS_STATE:
        store_state(o0, o1, o2, a, g0, g1, g2, mask)
    if NEED_PG:
        tl.store(gp_ptr + n, acc_a, mask=mask)
        tl.store(gp_ptr + NW64 + n, acc_b, mask=mask)
        tl.store(gp_ptr + 2 * NW64 + n, acc_c, mask=mask)
        tl.store(gp_ptr + 3 * NW64 + n, acc_d, mask=mask)


def need_prev(spec: NeuronSpec, need: Sequence[str]) -> bool:
    """Whether a step's gradient reads the step before (PLIF's dq, snnTorch's reset signal)."""
    return family_id(spec) == LEAKY_SYNAPTIC or (spec.consts.get("kind") == "plif" and "w" in need)


def keep_syn(spec: NeuronSpec, need: Sequence[str]) -> bool:
    return "syn" in family_of(spec).exact_keep(spec, need)


def run_forward(spec, x: Tensor, y: Tensor, kept: Tensor, state0: Optional[State], out_slots, sc: Tensor,
                lo: int, width: int, need: Sequence[str]) -> None:
    """The forward over channels [lo, lo + width) of contiguous x, writing y's window, kept
    (K, T, B, width, ...) and the final state into ``out_slots``."""
    CS, LO, WS, NW = common.window(x.shape[1:], lo, width)
    i = common.state_slots(spec, state0, out_slots[0])
    common.launch(_exact_forward, NW, x, y, kept, *i, *out_slots, sc, x.shape[0], NW, x[0].numel() if x.shape[0]
                  else max(1, NW), CS, LO, WS, HAS_STATE=state0 is not None, KEEP_SYN=keep_syn(spec, need),
                  **common.options(spec))


def run_backward(spec, gs: Tensor, gx: Tensor, kept: Tensor, g_state: Optional[State], state0: Optional[State],
                 out_slots, sc: Tensor, lo: int, width: int, need: Sequence[str]) -> Optional[Tensor]:
    """The backward over a window (as :func:`run_forward`), writing gx's window and the initial
    state's gradient into ``out_slots``; returns the per-element parameter-gradient terms
    (N_TERMS, elements) summed over T, or None when no parameter needs a gradient."""
    CS, LO, WS, NW = common.window(gs.shape[1:], lo, width)
    like = out_slots[0]
    i = common.state_slots(spec, state0, like)
    gi = common.state_slots(spec, g_state, like)
    gp = gs.new_empty((N_TERMS, NW)) if need else None
    common.launch(_exact_backward, NW, gs, gx, kept, *gi, *i, *out_slots, gp if gp is not None else gs, sc,
                  gs.shape[0], NW, gs[0].numel() if gs.shape[0] else max(1, NW), CS, LO, WS,
                  HAS_STATE=state0 is not None, HAS_GSTATE=g_state is not None, KEEP_SYN=keep_syn(spec, need),
                  NEED_PREV=need_prev(spec, need), NEED_PG=bool(need), **common.options(spec))
    return gp


def param_grads(spec: NeuronSpec, P: Params, terms: Optional[Tensor], need: Sequence[str]) -> Dict[str, Tensor]:
    """The parameter gradients from the per-element terms (summed in a fixed order: the same
    result run after run)."""
    if terms is None or not need:
        return {}
    sums = terms.sum(1)
    out: Dict[str, Tensor] = {}
    if family_id(spec) == LIF:
        if "w" in need:
            with torch.no_grad():
                q = P["w"].sigmoid()
            out["w"] = (sums[0] * q * (1 - q)).to(P["w"].dtype).reshape(P["w"].shape)
        return out
    for name, k in (("beta", 0), ("threshold", 1), ("graded", 2), ("alpha", 3)):
        if name in need:
            p = P[name]
            g = sums[k]
            if name in ("beta", "alpha"):  # torch.clamp's backward: zero outside (0, 1)
                g = g * ((p > 0) & (p < 1)).to(g.dtype)
            out[name] = g.to(p.dtype).reshape(p.shape)
    return out


def forward(spec: NeuronSpec, x: Tensor, state0: Optional[State], P: Params, need: Sequence[str]
            ) -> Tuple[Tensor, Tensor, State]:
    """As revpass.nodes.exact.exact_forward: (spikes, kept (K, T, ...), final state)."""
    x = x.contiguous()
    keep = family_of(spec).exact_keep(spec, need)
    y = torch.empty_like(x)
    kept = x.new_empty((len(keep),) + x.shape)
    states, out = common.new_state(spec, x.new_empty(x.shape[1:]))
    sc = common.consts(spec, P, x.dtype, x.device)
    run_forward(spec, x, y, kept, state0, out, sc, 0, x.shape[2] if x.dim() >= 3 else 1, need)
    return y, kept, tuple(states)


def backward(spec: NeuronSpec, gs: Tensor, g_state: Optional[State], kept: Tensor, state0: Optional[State],
             P: Params, need: Sequence[str]) -> Tuple[Tensor, Optional[State], Dict[str, Tensor]]:
    """As revpass.nodes.exact.exact_backward: (input gradient, initial state's gradient or None,
    parameter gradients)."""
    gs = gs.contiguous()
    gx = torch.empty_like(gs)
    g0, out = common.new_state(spec, gs.new_empty(gs.shape[1:]))
    sc = common.consts(spec, P, gs.dtype, gs.device)
    terms = run_backward(spec, gs, gx, kept.contiguous(), g_state, state0, out, sc, 0,
                         gs.shape[2] if gs.dim() >= 3 else 1, need)
    return gx, (tuple(g0) if state0 is not None else None), param_grads(spec, P, terms, need)
