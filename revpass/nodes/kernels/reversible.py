"""The reversible node as two Triton kernels over its channel pairs (docs/method.md).

Forward: one loop over T per pair of channels, F and G coupled (F charges from X2, Y1 = X1 + S^F,
G charges from Y1, Y2 = X2 + S^G), writing Y and F's decisions as bits, 8 per byte, each plane of
a step starting on a byte (revpass.nodes.bits.pack_planes' layout, which the PyTorch path shares).

Backward: a forward sweep rebuilds G from Y1 (bit-exactly: the same inputs and operations),
X2 = Y2 - S^G and F with its stored decisions pinned, and writes the two membranes of each step
into the input gradient's buffer, in the slots of the pair's two channels; the reverse sweep
reads them back and overwrites them with the gradients. So the backward needs no transient buffer
of its own: what it keeps between the sweeps lives where its output goes. What a step's gradient
needs of the step before (PLIF's previous membrane, snnTorch's reset signal) comes from the
previous step's slots, which the reverse sweep has not reached yet. snnTorch neurons without
reset_delay, or with a learnable alpha, carry a recurrence those slots cannot give back; for them
the sweep records the states entering each step in a buffer (three floats per element and step),
for an eighth of the pairs at a time (SCRATCH_PARTS launches, whatever T).

The unpaired channel of an odd channel count runs through the exact node's kernels.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from revpass.neurons.spec import NeuronSpec, Params, State, family_of
from revpass.nodes import layout
from revpass.nodes.bits import packed_planes_shape
from revpass.nodes.kernels import LEAKY_SYNAPTIC, common, exact, family_id
from revpass.nodes.kernels.neuron import (
    block_window,
    bwd_step,
    decide,
    fwd_step,
    load_consts,
    load_state,
    sj_reset,
    store_state,
)
from revpass.nodes.kernels.surrogates import div

Tensor = torch.Tensor

_INTS = ["T", "NH", "NS", "CS", "CSH", "NBP", "S", "CH", "FIRST", "SW"]

#: snnTorch's recurrences in the backward need a scratch of 3 floats per element and step: the
#: pairs are processed in this many launches, so that it holds a fraction of them at a time
SCRATCH_PARTS = 8


@triton.jit
def _load_bit(plane_ptr, n, mask):
    """Bit n of a plane (element 8i + k is bit k of byte i)."""
    byte = tl.load(plane_ptr + n // 8, mask=mask, other=0)
    return (byte >> (n % 8).to(tl.uint8)) & 1


@triton.jit
def _store_bits(plane_ptr, NBP, pid, s, mask, BLOCK: tl.constexpr):
    """This program's BLOCK decisions ``s`` (0/1) as BLOCK / 8 whole bytes of a plane."""
    b = tl.reshape(tl.where(mask, s, 0.0).to(tl.uint8), (BLOCK // 8, 8))
    shifts = tl.arange(0, 8).to(tl.uint8)
    byte = tl.sum((b << shifts[None, :]).to(tl.int32), axis=1).to(tl.uint8)
    i = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    tl.store(plane_ptr + i, byte, mask=i < NBP)


@triton.jit(do_not_specialize=_INTS)
def _rev_forward(x_ptr, y_ptr, bits_ptr, i0, i1, i2, o0, o1, o2, sc_ptr,
                 T, NH, NS, CS, CSH, NBP,
                 FAM: tl.constexpr, KIND: tl.constexpr, RESET: tl.constexpr, DECAY: tl.constexpr,
                 DETACH: tl.constexpr, DELAY: tl.constexpr, FIRE_GE: tl.constexpr, SURR: tl.constexpr,
                 NB: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n, mask, aG = block_window(NH, CSH, CS, 0, 0, BLOCK)  # channel ch of G's half, and ch + c of F's
    aF = aG + CSH
    c0, c1, c2, c3, c4, _ = load_consts(sc_ptr)
    like = tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty)
    A0, A1, A2 = load_state(i0, i1, i2, aF, mask, like, c1, c2, FAM, HAS_STATE)
    B0, B1, B2 = load_state(i0, i1, i2, aG, mask, like, c1, c2, FAM, HAS_STATE)
    NS64 = NS.to(tl.int64)
    xs = x_ptr + aG
    ys = y_ptr + aG
    bp = bits_ptr
    for _ in range(T):
        x1 = tl.load(xs, mask=mask, other=0.0)
        x2 = tl.load(xs + CSH, mask=mask, other=0.0)
        sF, spF, hF, A0, A1, A2, rF = fwd_step(x2, A0, A1, A2, c0, c1, c2, c3, c4, x2, x2,
                                               FAM, KIND, RESET, DECAY, DELAY, FIRE_GE, False)
        y1 = x1 + sF
        sG, spG, hG, B0, B1, B2, rG = fwd_step(y1, B0, B1, B2, c0, c1, c2, c3, c4, y1, y1,
                                               FAM, KIND, RESET, DECAY, DELAY, FIRE_GE, False)
        tl.store(ys, y1, mask=mask)
        tl.store(ys + CSH, x2 + sG, mask=mask)
        _store_bits(bp, NBP, pid, spF, mask, BLOCK)
        if NB == 2:
            _store_bits(bp + NBP, NBP, pid, rF, mask, BLOCK)
        xs += NS64
        ys += NS64
        bp += NB * NBP
    store_state(o0, o1, o2, aF, A0, A1, A2, mask)
    store_state(o0, o1, o2, aG, B0, B1, B2, mask)


@triton.jit
def _records(h, hp, has_prev, sp, spp, x, s0, s1, s2, scr, stride, mask, c0, c1, c2, RESET: tl.constexpr,
             DECAY: tl.constexpr, FAM: tl.constexpr, SCRATCH: tl.constexpr, NEED_PREV: tl.constexpr, like):
    """One neuron's records for the backward of step t (see neuron.bwd_step), from its previous
    step's membrane ``hp`` and decision ``spp`` (or its initial state s0..s2 at t = 0), and, for
    snnTorch's recurrences, the states entering the step (``scr``: syn, u, r)."""
    r = like
    up = like
    synp = like
    dq = like
    if NEED_PREV:
        if FAM == 0:
            vprev = tl.where(has_prev, sj_reset(hp, spp, c1, c2, RESET), s0)
            if DECAY:
                dq = x - (vprev - c2)
            else:
                dq = -(vprev - c2)
        elif FAM == 1:
            if SCRATCH:
                synp = tl.load(scr, mask=mask, other=0.0)
                up = tl.load(scr + stride, mask=mask, other=0.0)
                r = tl.load(scr + 2 * stride, mask=mask, other=0.0)
            else:
                r = tl.where(has_prev, spp, s2)
                up = tl.where(has_prev, hp, s1)
    return r, up, synp, dq


@triton.jit(do_not_specialize=_INTS)
def _rev_backward(gy_ptr, gx_ptr, y_ptr, bits_ptr, gi0, gi1, gi2, i0, i1, i2, o0, o1, o2, gp_ptr, scr_ptr, sc_ptr,
                  gbits_ptr, sums_ptr, gamma_ptr, beta_ptr, cin_ptr, mean_ptr, invstd_ptr,
                  T, NH, NS, CS, CSH, NBP, S, CH, FIRST, SW,
                  FAM: tl.constexpr, KIND: tl.constexpr, RESET: tl.constexpr, DECAY: tl.constexpr,
                  DETACH: tl.constexpr, DELAY: tl.constexpr, FIRE_GE: tl.constexpr, SURR: tl.constexpr,
                  NB: tl.constexpr, HAS_STATE: tl.constexpr, HAS_GSTATE: tl.constexpr, NEED_PREV: tl.constexpr,
                  NEED_PG: tl.constexpr, SCRATCH: tl.constexpr, FOLD: tl.constexpr, HAS_GAMMA: tl.constexpr,
                  HAS_BETA: tl.constexpr, KEEP_INPUT: tl.constexpr, BLOCK: tl.constexpr):
    """The backward; with FOLD (a batch norm folded into the node, revpass/nodes/batchnorm.py)
    it also writes G's decisions as bits and, per element, the sums over T of the batch norm's
    output gradient dL/dz and of dL/dz * x^, x^ rebuilt from z (the node's input, rebuilt) or from
    the kept batch-norm input (KEEP_INPUT). With SCRATCH a launch covers SW elements from block
    FIRST (the scratch holds theirs)."""
    pid = tl.program_id(0).to(tl.int64) + FIRST
    n, mask, aG = block_window(NH, CSH, CS, 0, FIRST, BLOCK)
    b = n // CSH
    c0, c1, c2, c3, c4, c5 = load_consts(sc_ptr)
    like = tl.zeros([BLOCK], dtype=y_ptr.dtype.element_ty)
    A0, A1, A2 = load_state(i0, i1, i2, aG + CSH, mask, like, c1, c2, FAM, HAS_STATE)
    B0, B1, B2 = load_state(i0, i1, i2, aG, mask, like, c1, c2, FAM, HAS_STATE)
    a0, a1, a2 = A0, A1, A2  # the initial states, for the records of step 0
    b0, b1, b2 = B0, B1, B2
    NS64 = NS.to(tl.int64)
    NH64 = NH.to(tl.int64)
    SW64 = SW.to(tl.int64)
    # the forward sweep: G from Y1, X2 = Y2 - S^G, F from X2 with its decisions pinned
    ys = y_ptr + aG
    gxs = gx_ptr + aG
    scr = scr_ptr + (n - FIRST * BLOCK)
    bp = bits_ptr
    for t in range(T):
        y1 = tl.load(ys, mask=mask, other=0.0)
        y2 = tl.load(ys + CSH, mask=mask, other=0.0)
        if SCRATCH:
            tl.store(scr, B0, mask=mask)
            tl.store(scr + SW64, B1, mask=mask)
            tl.store(scr + 2 * SW64, B2, mask=mask)
            tl.store(scr + 3 * SW64, A0, mask=mask)
            tl.store(scr + 4 * SW64, A1, mask=mask)
            tl.store(scr + 5 * SW64, A2, mask=mask)
            scr += 6 * SW64
        sG, spG, hG, B0, B1, B2, rG = fwd_step(y1, B0, B1, B2, c0, c1, c2, c3, c4, y1, y1,
                                               FAM, KIND, RESET, DECAY, DELAY, FIRE_GE, False)
        bit0 = _load_bit(bp, n, mask)
        bit1 = bit0
        if NB == 2:
            bit1 = _load_bit(bp + NBP, n, mask)
        sF, spF, hF, A0, A1, A2, rF = fwd_step(y2 - sG, A0, A1, A2, c0, c1, c2, c3, c4, bit0, bit1,
                                               FAM, KIND, RESET, DECAY, DELAY, FIRE_GE, True)
        tl.store(gxs, hG, mask=mask)
        tl.store(gxs + CSH, hF, mask=mask)
        if FOLD:
            _store_bits(gbits_ptr + t * NBP, NBP, pid, spG, mask, BLOCK)
        ys += NS64
        gxs += NS64
        bp += NB * NBP
    # the reverse sweep
    gB0, gB1, gB2 = load_state(gi0, gi1, gi2, aG, mask, like, c1, c2, -1, HAS_GSTATE)
    gA0, gA1, gA2 = load_state(gi0, gi1, gi2, aG + CSH, mask, like, c1, c2, -1, HAS_GSTATE)
    acc_a = like
    acc_b = like
    acc_c = like
    acc_d = like
    if FOLD:
        ch = (n - b * CSH) // S  # G's channel; F's is ch + CH
        fold_g1 = like
        fold_g2 = like
        fold_f1 = like
        fold_f2 = like
        if KEEP_INPUT:
            mG = tl.load(mean_ptr + ch, mask=mask, other=0.0)
            mF = tl.load(mean_ptr + ch + CH, mask=mask, other=0.0)
            iG = tl.load(invstd_ptr + ch, mask=mask, other=1.0)
            iF = tl.load(invstd_ptr + ch + CH, mask=mask, other=1.0)
        else:
            if HAS_BETA:
                bG = tl.load(beta_ptr + ch, mask=mask, other=0.0)
                bF = tl.load(beta_ptr + ch + CH, mask=mask, other=0.0)
            if HAS_GAMMA:
                wG = tl.load(gamma_ptr + ch, mask=mask, other=1.0)
                wF = tl.load(gamma_ptr + ch + CH, mask=mask, other=1.0)
    last = (T - 1).to(tl.int64)
    gxs = gx_ptr + aG + last * NS64
    gys = gy_ptr + aG + last * NS64
    ys = y_ptr + aG + last * NS64
    scr = scr_ptr + (n - FIRST * BLOCK) + last * (6 * SW64)
    bp = bits_ptr + last * (NB * NBP)
    cins = cin_ptr + aG + last * NS64
    hG_next = tl.load(gxs, mask=mask & (T > 0), other=0.0)
    hF_next = tl.load(gxs + CSH, mask=mask & (T > 0), other=0.0)
    for i in range(T):
        t = T - 1 - i
        has_prev = t > 0
        hG = hG_next
        hF = hF_next
        hG_next = tl.load(gxs - NS64, mask=mask & has_prev, other=0.0)
        hF_next = tl.load(gxs - NS64 + CSH, mask=mask & has_prev, other=0.0)
        if FAM <= 1:
            thr = c1
        else:
            thr = c3
        spG = decide(hG - thr, hG, False, FIRE_GE)
        spF = _load_bit(bp, n, mask).to(hF.dtype)
        spFp = _load_bit(bp - NB * NBP, n, mask & has_prev).to(hF.dtype)
        spGp = decide(hG_next - thr, hG_next, False, FIRE_GE)
        x1 = like
        x2 = like
        if NEED_PREV:
            if FAM == 0:
                x1 = tl.load(ys, mask=mask, other=0.0)  # G's input, Y1
                x2 = tl.load(ys + CSH, mask=mask, other=0.0) - spG  # F's, X2 = Y2 - S^G
        rG, upG, synG, dqG = _records(hG, hG_next, has_prev, spG, spGp, x1, b0, b1, b2, scr, SW64,
                                      mask, c0, c1, c2, RESET, DECAY, FAM, SCRATCH, NEED_PREV, like)
        rF, upF, synF, dqF = _records(hF, hF_next, has_prev, spF, spFp, x2, a0, a1, a2, scr + 3 * SW64, SW64,
                                      mask, c0, c1, c2, RESET, DECAY, FAM, SCRATCH, NEED_PREV, like)
        gy1 = tl.load(gys, mask=mask, other=0.0)
        gy2 = tl.load(gys + CSH, mask=mask, other=0.0)
        gxG, gB0, gB1, gB2, ta, tb, tc, td = bwd_step(gy2, gB0, gB1, gB2, hG, spG, rG, upG, synG, dqG,
                                                      c0, c1, c2, c3, c4, c5,
                                                      FAM, KIND, RESET, DECAY, DETACH, DELAY, SURR)
        gx1 = gy1 + gxG
        gxF, gA0, gA1, gA2, ua, ub, uc, ud = bwd_step(gx1, gA0, gA1, gA2, hF, spF, rF, upF, synF, dqF,
                                                      c0, c1, c2, c3, c4, c5,
                                                      FAM, KIND, RESET, DECAY, DETACH, DELAY, SURR)
        gx2 = gy2 + gxF
        tl.store(gxs, gx1, mask=mask)
        tl.store(gxs + CSH, gx2, mask=mask)
        if FOLD:
            if KEEP_INPUT:
                xh1 = (tl.load(cins, mask=mask, other=0.0) - mG) * iG
                xh2 = (tl.load(cins + CSH, mask=mask, other=0.0) - mF) * iF
            else:
                xh1 = tl.load(ys, mask=mask, other=0.0) - spF  # X1 = Y1 - S^F
                xh2 = tl.load(ys + CSH, mask=mask, other=0.0) - spG  # X2 = Y2 - S^G
                if HAS_BETA:
                    xh1 = xh1 - bG
                    xh2 = xh2 - bF
                if HAS_GAMMA:
                    xh1 = div(xh1, wG)
                    xh2 = div(xh2, wF)
            fold_g1 += gx1
            fold_g2 += gx1 * xh1
            fold_f1 += gx2
            fold_f2 += gx2 * xh2
        if NEED_PG:
            acc_a += ta + ua
            acc_b += tb + ub
            acc_c += tc + uc
            acc_d += td + ud
        gxs -= NS64
        gys -= NS64
        ys -= NS64
        scr -= 6 * SW64
        bp -= NB * NBP
        cins -= NS64
    if HAS_STATE:
        store_state(o0, o1, o2, aG, gB0, gB1, gB2, mask)
        store_state(o0, o1, o2, aG + CSH, gA0, gA1, gA2, mask)
    if FOLD:
        NC = (CS * (NH // CSH)).to(tl.int64)  # elements of a (B, C, ...) step
        tl.store(sums_ptr + aG, fold_g1, mask=mask)
        tl.store(sums_ptr + aG + CSH, fold_f1, mask=mask)
        tl.store(sums_ptr + NC + aG, fold_g2, mask=mask)
        tl.store(sums_ptr + NC + aG + CSH, fold_f2, mask=mask)
    if NEED_PG:
        tl.store(gp_ptr + n, acc_a, mask=mask)
        tl.store(gp_ptr + NH64 + n, acc_b, mask=mask)
        tl.store(gp_ptr + 2 * NH64 + n, acc_c, mask=mask)
        tl.store(gp_ptr + 3 * NH64 + n, acc_d, mask=mask)


def _or(t: Optional[Tensor], other: Tensor) -> Tensor:
    return other if t is None else t


def scratch(spec: NeuronSpec, need: Sequence[str]) -> bool:
    """Whether the backward records the states entering each step (snnTorch recurrences)."""
    return family_id(spec) == LEAKY_SYNAPTIC and (not spec.consts["reset_delay"] or exact.keep_syn(spec, need))


def _pairs(x: Tensor) -> Tuple[layout.Layout, int, int, int, int]:
    """(layout, elements per step, C * S, c * S, pair elements per step) of a (T, B, C, ...) x."""
    L = layout.Layout(x.shape)
    S = 1
    for d in x.shape[3:]:
        S *= d
    B = x.shape[1] if x.dim() >= 2 else 1
    NS = 1
    for d in x.shape[1:]:
        NS *= d
    return L, NS, L.C * S, L.c * S, B * L.c * S


def forward(spec: NeuronSpec, x: Tensor, state0: Optional[State], P: Params, need: Sequence[str]
            ) -> Tuple[Tensor, Tensor, Tensor, State]:
    """As revpass.nodes.reversible.reversible_forward: (Y, F's packed bits, kept tensors of the
    unpaired channel (K, T, ...), final state)."""
    x = x.contiguous()
    fam = family_of(spec)
    L, NS, CS, CSH, NH = _pairs(x)
    nb = fam.n_bits(spec)
    shape = packed_planes_shape(layout.bits_shape(L, nb, x))
    bits = x.new_zeros(shape, dtype=torch.uint8)
    keep = fam.exact_keep(spec, need)
    y = torch.empty_like(x)
    states, out = common.new_state(spec, x.new_empty(x.shape[1:]))
    sc = common.consts(spec, P, x.dtype, x.device)
    T = x.shape[0]
    if L.c:
        i = common.state_slots(spec, state0, out[0])
        common.launch(_rev_forward, NH, x, y, bits, *i, *out, sc, T, NH, NS, CS, CSH, shape[1] // nb,
                      NB=nb, HAS_STATE=state0 is not None, **common.options(spec))
    rem = L.seq(x, "r")
    kept = x.new_empty((len(keep),) + tuple(rem.shape))
    if L.n_rem != 0:
        lo, width = (2 * L.c, L.C - 2 * L.c) if L.C else (0, 1)
        exact.run_forward(spec, x, y, kept, state0, out, sc, lo, width, need)
    return y, bits, kept, tuple(states)


def backward(spec: NeuronSpec, gy: Tensor, g_state: Optional[State], y: Tensor, bits: Tensor, kept: Tensor,
             state0: Optional[State], P: Params, need: Sequence[str], fold: Optional[dict] = None
             ) -> Tuple[Tensor, Optional[State], Dict[str, Tensor]]:
    """As revpass.nodes.reversible.reversible_backward: (input gradient, initial state's
    gradient or None, parameter gradients). ``fold`` (revpass/nodes/kernels/batchnorm.py) asks
    for a folded batch norm's first pass too: it holds gamma, beta (or None), the kept input,
    mean and 1/std (or None), and receives 'gbits' (G's decisions, packed) and 'sums'
    (2, B, C, ...): per element, the sums over T of dL/dz and of dL/dz * x^."""
    gy = gy.contiguous()
    fam = family_of(spec)
    L, NS, CS, CSH, NH = _pairs(y)
    nb = fam.n_bits(spec)
    gx = torch.empty_like(gy)
    g0, out = common.new_state(spec, gy.new_empty(gy.shape[1:]))
    sc = common.consts(spec, P, y.dtype, y.device)
    T = y.shape[0]
    terms = []
    if L.c:
        i = common.state_slots(spec, state0, out[0])
        gi = common.state_slots(spec, g_state, out[0])
        gp = gy.new_empty((exact.N_TERMS, NH)) if need else None
        use_scratch = scratch(spec, need)
        blk = common.block()
        blocks = -(-NH // blk)
        # the scratch's recurrences are a transient of 3 floats per element and step: bounded by
        # launching over groups of at most 1/SCRATCH_PARTS of the pairs (a fixed count, whatever T)
        per = max(1, -(-blocks // SCRATCH_PARTS) if use_scratch else blocks)
        scr = gy.new_empty((T, 6, per * blk)) if use_scratch else gy
        S = CSH // L.c
        f = fold or {}
        if fold is not None:
            f["gbits"] = y.new_zeros((T, bits.shape[1] // nb), dtype=torch.uint8)
            f["sums"] = y.new_empty((2,) + tuple(y.shape[1:]))
        for first in range(0, blocks, per):
            _rev_backward[(min(per, blocks - first),)](
                gy, gx, y, bits, *gi, *i, *out, gp if gp is not None else gy, scr, sc, f.get("gbits", bits),
                f.get("sums", gy), _or(f.get("gamma"), y), _or(f.get("beta"), y), _or(f.get("input"), y),
                _or(f.get("mean"), y), _or(f.get("invstd"), y), T, NH, NS, CS, CSH, bits.shape[1] // nb, S, L.c,
                first, per * blk, NB=nb, HAS_STATE=state0 is not None, HAS_GSTATE=g_state is not None,
                NEED_PREV=exact.need_prev(spec, need), NEED_PG=bool(need), SCRATCH=use_scratch,
                FOLD=fold is not None, HAS_GAMMA=f.get("gamma") is not None, HAS_BETA=f.get("beta") is not None,
                KEEP_INPUT=f.get("input") is not None, BLOCK=blk, enable_fp_fusion=False, **common.options(spec))
        terms.append(gp)
    if L.n_rem != 0:
        lo, width = (2 * L.c, L.C - 2 * L.c) if L.C else (0, 1)
        terms.append(exact.run_backward(spec, gy, gx, kept.contiguous(), g_state, state0, out, sc, lo, width, need))
    gp = None if not need else torch.cat([t for t in terms if t is not None], 1)
    return gx, (tuple(g0) if state0 is not None else None), exact.param_grads(spec, P, gp, need)
