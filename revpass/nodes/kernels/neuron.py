"""One neuron step, forward and backward, for every family, as Triton functions.

The forward repeats revpass/neurons/families.py's ``step`` operation for operation (so, with
``enable_fp_fusion=False`` and round-to-nearest division, a kernel's forward is bit-identical to
the PyTorch path); the backward is the family's analytic VJP for one step (docs/method.md). The
SpikingJelly backward is written as SpikingJelly's own Triton LIF kernel writes it.

Families (``FAM``) and their state, in the order the nodes carry it (revpass.nodes.layout):

* 0 SpikingJelly (v,): KIND 0 LIF, 1 IF, 2 ParametricLIF, 3 a hand-written ``beta V + X``; RESET 0
  hard, 1 soft; consts c0 = tau (LIF), q = sigmoid(w) (PLIF) or beta, c1 = threshold, c2 = v_reset
  (0 for a soft reset);
* 1 snnTorch (syn, u, r) for Synaptic (KIND 1), (u, r) for Leaky (KIND 0), passed as (-, u, r);
  RESET 0 subtract, 1 zero, 2 none; c0 = clamped beta, c1 = threshold, c2 = graded spikes factor,
  c3 = clamped alpha;
* 2 norse LIF (v, i): c0 = dt tau_mem_inv, c1 = -dt tau_syn_inv, c2 = v_leak, c3 = v_th,
  c4 = v_reset;
* 3 norse LIFBox (v,): RESET 0 to a value, 1 by subtraction; consts as norse LIF.

c5 is the surrogate's argument. The spike of ``fwd_step`` is the unit decision ``sp`` times the
graded factor (snnTorch); ``PIN`` replaces the decisions by stored bits (reconstruction).
"""

import triton
import triton.language as tl

from revpass.nodes.kernels.surrogates import div, surrogate_grad


@triton.jit
def block_window(N, WS, CS, LO, FIRST, BLOCK: tl.constexpr):
    """This program's elements n of a channel window (revpass.nodes.kernels.common.window), the
    mask of those that exist, and their offsets in a (B, C, ...) step. A launch over a part of
    the elements starts at block FIRST."""
    n = (tl.program_id(0).to(tl.int64) + FIRST) * BLOCK + tl.arange(0, BLOCK)
    b = n // WS
    return n, n < N, b * CS + LO + (n - b * WS)


@triton.jit
def load_consts(sc_ptr):
    """The neuron's constants c0..c5 (see above)."""
    return (tl.load(sc_ptr), tl.load(sc_ptr + 1), tl.load(sc_ptr + 2), tl.load(sc_ptr + 3), tl.load(sc_ptr + 4),
            tl.load(sc_ptr + 5))


@triton.jit
def load_state(i0, i1, i2, a, mask, like, c1, c2, FAM: tl.constexpr, HAS_STATE: tl.constexpr):
    """The three state slots at offsets ``a``, or, without them, the reset state (FAM -1: zeros,
    for a state's gradient)."""
    if HAS_STATE:
        v0 = tl.load(i0 + a, mask=mask, other=0.0)
        v1 = tl.load(i1 + a, mask=mask, other=0.0)
        v2 = tl.load(i2 + a, mask=mask, other=0.0)
    elif FAM < 0:
        v0 = like
        v1 = like
        v2 = like
    else:
        v0, v1, v2 = init_state(like, c1, c2, FAM)
    return v0, v1, v2


@triton.jit
def store_state(o0, o1, o2, a, v0, v1, v2, mask):
    tl.store(o0 + a, v0, mask=mask)
    tl.store(o1 + a, v1, mask=mask)
    tl.store(o2 + a, v2, mask=mask)


@triton.jit
def decide(d, bit, PIN: tl.constexpr, FIRE_GE: tl.constexpr):
    """The Heaviside step of ``d`` (>= 0 or > 0), or the stored ``bit`` when pinned."""
    if PIN:
        out = bit.to(d.dtype)
    elif FIRE_GE:
        out = (d >= 0).to(d.dtype)
    else:
        out = (d > 0).to(d.dtype)
    return out


@triton.jit
def init_state(like, c1, c2, FAM: tl.constexpr):
    """The reset state (v0, v1, v2) for a block shaped like ``like``."""
    zero = tl.zeros_like(like)
    if FAM == 0:
        v0 = zero + c2  # v_reset (0 for a soft reset)
        v1 = zero
        v2 = zero
    elif FAM == 1:
        v0 = zero
        v1 = zero
        v2 = ((zero - c1) > 0).to(like.dtype)  # the reset signal of u = 0
    else:
        v0 = zero + c2  # v_leak
        v1 = zero
        v2 = zero
    return v0, v1, v2


@triton.jit
def sj_reset(h, sp, c1, c2, RESET: tl.constexpr):
    if RESET == 1:
        v = h - sp * c1
    else:
        v = sp * c2 + (1.0 - sp) * h
    return v


@triton.jit
def snn_unext(h, sp, r, c1, c2, RESET: tl.constexpr, DELAY: tl.constexpr):
    """snnTorch's membrane after the step's reset."""
    if DELAY:
        u = h
    else:
        do_reset = div(sp * c2, c2) - r
        if RESET == 0:
            u = h - do_reset * c1
        elif RESET == 1:
            u = h - do_reset * h
        else:
            u = h
    return u


@triton.jit
def fwd_step(x, v0, v1, v2, c0, c1, c2, c3, c4, b0, b1,
             FAM: tl.constexpr, KIND: tl.constexpr, RESET: tl.constexpr, DECAY: tl.constexpr,
             DELAY: tl.constexpr, FIRE_GE: tl.constexpr, PIN: tl.constexpr):
    """One step: (spike, unit decision, membrane before fire and reset h, next state (3),
    second decision (snnTorch's reset signal, stored when reset_delay=False))."""
    if FAM == 0:
        if KIND == 1:
            h = v0 + x
        elif KIND == 3:
            h = c0 * v0 + x
        elif KIND == 0:
            if DECAY:
                h = v0 + div(x - (v0 - c2), c0)
            else:
                h = v0 - div(v0 - c2, c0) + x
        else:
            if DECAY:
                h = v0 + (x - (v0 - c2)) * c0
            else:
                h = v0 - (v0 - c2) * c0 + x
        sp = decide(h - c1, b0, PIN, FIRE_GE)
        s = sp
        n0 = sj_reset(h, sp, c1, c2, RESET)
        n1 = v1
        n2 = v2
        rn = sp
    elif FAM == 1:
        syn = v0
        u = v1
        r = v2
        if KIND == 1:
            syn = c3 * syn + x
            base = c0 * u + syn
            if RESET == 0:
                h = base - r * c1
            elif RESET == 1:
                h = base - base * r
            else:
                h = base
        else:
            if RESET == 0:
                h = c0 * u + x - r * c1
            elif RESET == 1:
                h = c0 * ((1.0 - r) * u) + x
            else:
                h = c0 * u + x
        sp = decide(h - c1, b0, PIN, FIRE_GE)
        s = sp * c2
        n1 = snn_unext(h, sp, r, c1, c2, RESET, DELAY)
        if DELAY:
            rn = sp
        else:
            rn = decide(n1 - c1, b1, PIN, False)
        n0 = syn
        n2 = rn
    elif FAM == 2:
        i_new = v1 + x
        dv = c0 * ((c2 - v0) + i_new)
        h = v0 + dv
        di = c1 * i_new
        n1 = i_new + di
        sp = decide(h - c3, b0, PIN, FIRE_GE)
        s = sp
        n0 = (1.0 - sp) * h + sp * c4
        n2 = v2
        rn = sp
    else:
        dv = c0 * (x + c2 - v0)
        h = v0 + dv
        sp = decide(h - c3, b0, PIN, FIRE_GE)
        s = sp
        if RESET == 0:
            n0 = (1.0 - sp) * h + sp * c4
        else:
            n0 = (1.0 - sp) * h + sp * (h - c3)
        n1 = v1
        n2 = v2
        rn = sp
    return s, sp, h, n0, n1, n2, rn


@triton.jit
def bwd_step(gs, g0, g1, g2, h, sp, r, uprev, synprev, dq, c0, c1, c2, c3, c4, c5,
             FAM: tl.constexpr, KIND: tl.constexpr, RESET: tl.constexpr, DECAY: tl.constexpr,
             DETACH: tl.constexpr, DELAY: tl.constexpr, SURR: tl.constexpr):
    """The gradients of one step, from the gradient ``gs`` of its spike and (g0, g1, g2) of its
    next state: (gradient of its input, of its previous state (3), and four per-step terms of the
    parameter gradients: PLIF's dL/dq; snnTorch's beta, threshold, graded factor and alpha).
    SpikingJelly's LIF and IF are written as SpikingJelly's own Triton kernels write them (so an
    exact node's gradients can equal SpikingJelly's CUDA neuron's bit for bit).

    Records: h, the unit decision sp, and where the family needs them the reset signal r of the
    previous step, the previous membrane ``uprev``, current ``synprev``, and PLIF's ``dq``."""
    zero = tl.zeros_like(h)
    ta = zero
    tb = zero
    tc = zero
    td = zero
    n1 = zero
    n2 = zero
    if FAM == 0 and KIND == 1:  # IF: as SpikingJelly's Triton IF kernel writes it (no fma)
        sg = surrogate_grad(h - c1, c5, SURR)
        if RESET == 1:
            reset_grad = zero + 1.0
        else:
            reset_grad = 1.0 - sp
        if not DETACH:
            if RESET == 1:
                reset_grad = reset_grad - c1 * sg
            else:
                reset_grad = reset_grad + (c2 - h) * sg
        gh = gs * sg + g0 * reset_grad
        gx = gh
        n0 = gh
    elif FAM == 0:
        sg = surrogate_grad(h - c1, c5, SURR)
        if RESET == 1:
            if DETACH:
                gh = tl.fma(gs, sg, g0)
            else:
                gh = tl.fma(gs - c1 * g0, sg, g0)
        else:
            if DETACH:
                gh = tl.fma(gs, sg, g0 * (1.0 - sp))
            else:
                gh = tl.fma(tl.fma(g0, c2 - h, gs), sg, g0 * (1.0 - sp))
        if KIND == 3:
            gx = gh
            n0 = gh * c0
        elif KIND == 0:
            r_tau = 1.0 / c0
            if DECAY:
                gx = gh * r_tau
            else:
                gx = gh
            n0 = gh * (1.0 - r_tau)
        else:
            if DECAY:
                gx = gh * c0
            else:
                gx = gh
            n0 = gh * (1.0 - c0)
            ta = gh * dq
    elif FAM == 1:
        sg = surrogate_grad(h - c1, c5, SURR)
        ds = sg * c2
        gh = gs * ds
        if DELAY:
            gh = gh + g1
        elif RESET == 0:
            gh = gh + g1 * (1.0 - sg * c1)
        elif RESET == 1:
            gh = gh + g1 * ((1.0 - (sp - r)) - h * sg)
        else:
            gh = gh + g1
        if RESET == 1:
            gb = gh * (1.0 - r)
        else:
            gb = gh
        n1 = gb * c0
        if KIND == 1:
            gsy = gb + g0
            gx = gsy
            n0 = gsy * c3
            td = gsy * synprev
        else:
            gx = gh
            n0 = zero
        ta = gb * uprev
        tb = -(gs * ds)
        if RESET == 0:
            tb = tb - gh * r
        if not DELAY:
            if RESET == 0:
                tb = tb + g1 * (c1 * sg - (sp - r))
            elif RESET == 1:
                tb = tb + g1 * (h * sg)
        tc = gs * sp
    elif FAM == 2:
        sg = surrogate_grad(h - c3, c5, SURR)
        dvdh = (c4 - h) * sg + 1.0 - sp
        gh = gs * sg + g0 * dvdh
        gi = gh * c0 + g1 * (1.0 + c1)
        gx = gi
        n1 = gi
        n0 = gh * (1.0 - c0)
    else:
        sg = surrogate_grad(h - c3, c5, SURR)
        if RESET == 0:
            dvdh = (c4 - h) * sg + 1.0 - sp
        else:
            dvdh = 1.0 - c3 * sg
        gh = gs * sg + g0 * dvdh
        gx = gh * c0
        n0 = gh * (1.0 - c0)
    return gx, n0, n1, n2, ta, tb, tc, td
