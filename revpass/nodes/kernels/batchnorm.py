"""A batch norm folded into a node (revpass/nodes/batchnorm.py), in Triton.

Into a reversible node:

The first pass is the node's own backward kernel with FOLD (revpass/nodes/kernels/reversible.py):
it gives dL/dz in the input gradient's buffer, G's decisions as bits, and per element the sums
over T of dL/dz and dL/dz * x^; the per-channel sums are those summed over the batch and spatial
dims (a fixed order: deterministic). The second pass, here, rebuilds x^ from z = Y - spikes (F's
stored bits for G's channels, G's for F's) and writes the batch norm's input gradient over dL/dz:

    gc = gamma / std * (gz - dbeta / M - x^ * dgamma / M)

Into an exact node (SpikingJelly's LIF, IF, parametric LIF and ``beta V + X``): after the exact
node's backward kernel has given dL/dz, one kernel (``_exact_bn``) sweeps each element's steps
twice, a launch each: x^ from z rebuilt step by step from the kept membranes H (the charge
H = charge(V, X) solved for X, V the reset of the previous step's H as the forward fired, less
the residual where one was added), first summing dL/dz and dL/dz * x^ over T per element, then,
with the per-channel sums, writing the batch norm's input gradient over dL/dz as above.
"""

from __future__ import annotations

import math

from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from revpass.neurons.spec import NeuronSpec, Params, State, family_of
from revpass.nodes.kernels import common, reversible
from revpass.nodes.kernels.neuron import decide, sj_reset
from revpass.nodes.kernels.surrogates import div

Tensor = torch.Tensor

_INTS = ["T", "NH", "NS", "CS", "CSH", "NBP", "S", "CH"]


@triton.jit
def _from_input(cin_t, ch, mask, mean_ptr, invstd_ptr):
    """x^ = (c - mean) / std at channels ``ch``, from the batch norm's kept input c."""
    return (tl.load(cin_t, mask=mask, other=0.0) - tl.load(mean_ptr + ch, mask=mask, other=0.0)) \
        * tl.load(invstd_ptr + ch, mask=mask, other=1.0)


@triton.jit
def _from_output(z, ch, mask, gamma_ptr, beta_ptr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """x^ = (z - beta) / gamma at channels ``ch``, from the batch norm's output z (rebuilt)."""
    if HAS_BETA:
        z = z - tl.load(beta_ptr + ch, mask=mask, other=0.0)
    if HAS_GAMMA:
        z = div(z, tl.load(gamma_ptr + ch, mask=mask, other=1.0))
    return z


@triton.jit
def _normalized(y_ptr_t, cin_t, plane_ptr, n, ch, mask, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, KEEP_INPUT: tl.constexpr):
    """x^ of one half at step t: from the kept input, or from z = Y - spikes."""
    if KEEP_INPUT:
        xh = _from_input(cin_t, ch, mask, mean_ptr, invstd_ptr)
    else:
        byte = tl.load(plane_ptr + n // 8, mask=mask, other=0)
        spike = ((byte >> (n % 8).to(tl.uint8)) & 1)
        z = tl.load(y_ptr_t, mask=mask, other=0.0)
        xh = _from_output(z - spike.to(z.dtype), ch, mask, gamma_ptr, beta_ptr, HAS_GAMMA, HAS_BETA)
    return xh


@triton.jit(do_not_specialize=_INTS)
def _input_grad(g_ptr, y_ptr, fbits_ptr, gbits_ptr, cin_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                dbm_ptr, ndgm_ptr, scale_ptr, T, NH, NS, CS, CSH, NBP, S, CH,
                NB: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, KEEP_INPUT: tl.constexpr,
                BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = n < NH
    b = n // CSH
    aG = b * CS + (n - b * CSH)
    chG = (n - b * CSH) // S
    chF = chG + CH
    dG = tl.load(dbm_ptr + chG, mask=mask, other=0.0)
    dF = tl.load(dbm_ptr + chF, mask=mask, other=0.0)
    eG = tl.load(ndgm_ptr + chG, mask=mask, other=0.0)
    eF = tl.load(ndgm_ptr + chF, mask=mask, other=0.0)
    kG = tl.load(scale_ptr + chG, mask=mask, other=0.0)
    kF = tl.load(scale_ptr + chF, mask=mask, other=0.0)
    NS64 = NS.to(tl.int64)
    o = aG
    fb = fbits_ptr
    gb = gbits_ptr
    for _ in range(T):
        xG = _normalized(y_ptr + o, cin_ptr + o, fb, n, chG, mask, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                         HAS_GAMMA, HAS_BETA, KEEP_INPUT)  # X1 = Y1 - S^F
        xF = _normalized(y_ptr + o + CSH, cin_ptr + o + CSH, gb, n, chF, mask, mean_ptr, invstd_ptr, gamma_ptr,
                         beta_ptr, HAS_GAMMA, HAS_BETA, KEEP_INPUT)  # X2 = Y2 - S^G
        g1 = tl.load(g_ptr + o, mask=mask, other=0.0)
        g2 = tl.load(g_ptr + o + CSH, mask=mask, other=0.0)
        tl.store(g_ptr + o, ((g1 - dG) + xG * eG) * kG, mask=mask)
        tl.store(g_ptr + o + CSH, ((g2 - dF) + xF * eF) * kF, mask=mask)
        o += NS64
        fb += NB * NBP
        gb += NBP


def backward(spec: NeuronSpec, gy: Tensor, g_state: Optional[State], y: Tensor, bits: Tensor, kept: Tensor,
             state0: Optional[State], P: Params, need: Sequence[str], gamma: Optional[Tensor],
             beta: Optional[Tensor], c: Optional[Tensor], mean: Tensor, invstd: Tensor
             ) -> Tuple[Tensor, Optional[State], Dict[str, Tensor], Tensor, Tensor]:
    """The folded node's backward: (the batch norm's input gradient, the node's initial state's
    gradient, the node's parameter gradients, dgamma, dbeta). ``c`` is the batch norm's input
    where it was kept (a small gamma), else None."""
    dt = y.dtype

    def cast(t):
        return None if t is None else t.detach().to(dt).contiguous()

    fold = {"gamma": cast(gamma), "beta": cast(beta), "input": None if c is None else c.contiguous(),
            "mean": cast(mean), "invstd": cast(invstd)}
    gz, g0, gP = reversible.backward(spec, gy, g_state, y, bits, kept, state0, P, need, fold=fold)
    C = y.shape[2]
    sums = fold["sums"].reshape(2, y.shape[1], C, -1)
    dbeta, dgamma = sums[0].sum((0, 2)), sums[1].sum((0, 2))
    M = y.numel() // C
    scale = invstd if gamma is None else gamma.detach().to(dt) * invstd
    L, NS, CS, CSH, NH = reversible._pairs(y)
    nb = family_of(spec).n_bits(spec)
    if L.c:
        common.launch(_input_grad, NH, gz, y, bits, fold["gbits"], fold["input"] if c is not None else y,
                      fold["mean"], fold["invstd"], fold["gamma"] if gamma is not None else y,
                      fold["beta"] if beta is not None else y, (dbeta / M).contiguous(), (-dgamma / M).contiguous(),
                      scale.contiguous(), y.shape[0], NH, NS, CS, CSH, bits.shape[1] // nb, CSH // L.c, L.c,
                      NB=nb, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, KEEP_INPUT=c is not None)
    return gz, g0, gP, dgamma, dbeta


@triton.jit
def _sj_input(h, v, c0, c2, KIND: tl.constexpr, DECAY: tl.constexpr):
    """X solved from SpikingJelly's charge H = charge(V, X) (Family.input_steps; neuron.fwd_step
    is the charge): KIND 0 LIF (c0 = tau), 1 IF, 2 parametric LIF (c0 = q), 3 ``c0 V + X``; c2 is
    v_reset (0 for a soft reset)."""
    if KIND == 1:
        x = h - v
    elif KIND == 3:
        x = h - c0 * v
    elif KIND == 0:
        if DECAY:  # H = V + (X - (V - r)) / tau
            x = (h - v) * c0 + (v - c2)
        else:  # H = V - (V - r) / tau + X
            x = (h - v) + div(v - c2, c0)
    else:
        if DECAY:  # H = V + (X - (V - r)) q
            x = div(h - v, c0) + (v - c2)
        else:  # H = V - (V - r) q + X
            x = (h - v) + (v - c2) * c0
    return x


@triton.jit(do_not_specialize=["T", "NS", "C", "S"])
def _exact_bn(g_ptr, kept_ptr, v0_ptr, r_ptr, cin_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, sc_ptr,
              sums_ptr, dbm_ptr, ndgm_ptr, scale_ptr, T, NS, C, S,
              KIND: tl.constexpr, RESET: tl.constexpr, DECAY: tl.constexpr, FIRE_GE: tl.constexpr,
              HAS_STATE: tl.constexpr, RES: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
              KEEP_INPUT: tl.constexpr, SUMS: tl.constexpr, BLOCK: tl.constexpr):
    """Over elements n of a (B, C, S) step, T steps: with SUMS, sum over T of g and g * x^ into
    sums (2, NS); else g = ((g - dbeta / M) + x^ * (-dgamma / M)) * scale, in place. x^ from the
    kept input (KEEP_INPUT), or from z rebuilt from H (kept (T, NS)) and the state before each
    step: v0 (HAS_STATE) or the reset state at the first, then the reset of the previous H.
    RES: 0 no residual, 1 a tensor r (T, NS), 2 spikes as bits (r_ptr: bytes, element t NS + n)."""
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = n < NS
    ch = (n // S) % C
    c0 = tl.load(sc_ptr)
    c1 = tl.load(sc_ptr + 1)
    c2 = tl.load(sc_ptr + 2)
    like = tl.zeros([BLOCK], dtype=g_ptr.dtype.element_ty)
    if HAS_STATE:
        v = tl.load(v0_ptr + n, mask=mask, other=0.0)
    else:
        v = like + c2
    if SUMS:
        acc_g = like
        acc_gx = like
    else:
        dbm = tl.load(dbm_ptr + ch, mask=mask, other=0.0)
        ndgm = tl.load(ndgm_ptr + ch, mask=mask, other=0.0)
        sc = tl.load(scale_ptr + ch, mask=mask, other=0.0)
    NS64 = NS.to(tl.int64)
    o = n
    for _ in range(T):
        if KEEP_INPUT:
            xh = _from_input(cin_ptr + o, ch, mask, mean_ptr, invstd_ptr)
        else:
            h = tl.load(kept_ptr + o, mask=mask, other=0.0)
            z = _sj_input(h, v, c0, c2, KIND, DECAY)
            v = sj_reset(h, decide(h - c1, h, False, FIRE_GE), c1, c2, RESET)  # the state before the next step
            if RES == 1:
                z = z - tl.load(r_ptr + o, mask=mask, other=0.0)
            elif RES == 2:
                byte = tl.load(r_ptr + o // 8, mask=mask, other=0)
                z = z - ((byte >> (o % 8).to(tl.uint8)) & 1).to(z.dtype)
            xh = _from_output(z, ch, mask, gamma_ptr, beta_ptr, HAS_GAMMA, HAS_BETA)
        g = tl.load(g_ptr + o, mask=mask, other=0.0)
        if SUMS:
            acc_g += g
            acc_gx += g * xh
        else:
            tl.store(g_ptr + o, ((g - dbm) + xh * ndgm) * sc, mask=mask)
        o += NS64
    if SUMS:
        tl.store(sums_ptr + n, acc_g, mask=mask)
        tl.store(sums_ptr + NS64 + n, acc_gx, mask=mask)


def exact_backward(spec: NeuronSpec, gz: Tensor, kept: Tensor, state0: Optional[State], P: Params,
                   gamma: Optional[Tensor], beta: Optional[Tensor], c: Optional[Tensor], mean: Tensor,
                   invstd: Tensor, residual: Optional[Tensor], residual_bits: bool) -> Tuple[Tensor, Tensor]:
    """The batch norm's part of a folded exact node's backward (revpass.nodes.batchnorm.FoldedExact):
    ``gz`` (dL/dz, contiguous (T, B, C, ...)) is overwritten with the batch norm's input
    gradient; returns (dgamma, dbeta). ``kept`` is the exact node's (K, T, ...) records, H first;
    ``c`` the batch norm's input where it was kept (a small gamma), else None; ``residual`` what
    was added to the batch norm's output before the node (as it was kept: packed bits when
    ``residual_bits``), or None. The per-channel sums are the per-element ones summed in float64,
    in a fixed order (the same result run after run)."""
    dt = gz.dtype

    def cast(t):
        return None if t is None else t.detach().to(dt).contiguous()

    T, C, S = gz.shape[0], gz.shape[2], math.prod(gz.shape[3:])
    NS = gz.shape[1] * C * S
    M = gz.numel() // C
    o = common.options(spec)
    gam, bet = cast(gamma), cast(beta)
    v0 = common.state_slots(spec, state0, gz.new_empty(gz.shape[1:]))[0] if state0 is not None else gz
    r = gz if residual is None else residual.contiguous()
    sums = gz.new_zeros((2, NS))
    h = kept[0].contiguous() if c is None else gz
    cin = c.contiguous() if c is not None else gz
    sc = common.consts(spec, P, dt, gz.device)
    meta = dict(KIND=o["KIND"], RESET=o["RESET"], DECAY=o["DECAY"], FIRE_GE=o["FIRE_GE"],
                HAS_STATE=state0 is not None, RES=0 if residual is None else (2 if residual_bits else 1),
                HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, KEEP_INPUT=c is not None)
    args = (gz, h, v0, r, cin, cast(mean), cast(invstd), gam if gam is not None else gz,
            bet if bet is not None else gz, sc)
    common.launch(_exact_bn, NS, *args, sums, gz, gz, gz, T, NS, C, S, SUMS=True, **meta)
    per_channel = sums.reshape(2, -1, C, S).sum((1, 3), dtype=torch.float64).to(dt)
    dbeta, dgamma = per_channel[0], per_channel[1]
    scale = invstd.to(dt) if gamma is None else gam * invstd.to(dt)
    common.launch(_exact_bn, NS, *args, sums, (dbeta / M).contiguous(), (-dgamma / M).contiguous(),
                  scale.contiguous(), T, NS, C, S, SUMS=False, **meta)
    return dgamma, dbeta
