"""The equations of every supported neuron family, framework-free.

Each ``step`` repeats the framework's own operations in the framework's order (each page of
docs/frameworks/, "Equations"), so the forward is bit-identical; each ``vjp`` is the analytic
backward of docs/method.md section 5: per-step factors once over all T, then one reverse-time
sweep of a few fused ops.

Notation in the VJPs: ``h`` is the membrane before fire and reset, ``s`` the unit spike
(0/1, pinned where reconstruction says so), ``sg`` the surrogate derivative at ``h - threshold``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from revpass.neurons.spec import (
    Family,
    const,
    pin,
    reduce_to,
    register_family,
)

Tensor = torch.Tensor


def _sweep(gh_all: Tensor, dv_dh: Optional[Tensor], dh_dv, g_v: Optional[Tensor]):
    """The reverse-time sweep shared by single-state families, in place on ``gh_all``.

    On entry gh_all[t] = g_spike_t * ds_dh_t (computed for all t at once: it does not depend on
    the sweep); on exit gh_all[t] = g_spike_t * ds_dh_t + g_v * dv_dh_t with g_v <- gh_t * dh_dv,
    two fused ops per step. Returns (gh_all, gradient of the initial state).
    """
    for t in range(gh_all.shape[0] - 1, -1, -1):
        gh = gh_all[t]
        if g_v is not None:
            if dv_dh is None:
                gh.add_(g_v)
            else:
                gh.addcmul_(g_v, dv_dh[t])
        g_v = gh * (const(dh_dv, gh) if isinstance(dh_dv, float) else dh_dv)
    return gh_all, g_v


def _sg(spec, recs, h: Tensor, thr) -> Tensor:
    """Surrogate derivative at h - thr over the whole sequence (a fresh tensor)."""
    shift = recs.pop("shift", None)
    return spec.surrogate.deriv_(shift if shift is not None else h - thr)


def _untracked(*ts: Tensor) -> bool:
    """Nothing records these for a backward, and they are alike (shape, dtype): a step's
    temporaries can share buffers, each in-place operation computing what its out-of-place form
    would (no broadcast to a larger shape, no promotion to another dtype)."""
    first = ts[0]
    return (not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))
            and all(t.shape == first.shape and t.dtype == first.dtype for t in ts))


def _spike(spec, h: Tensor, thr, bits, autograd: bool) -> Tensor:
    """The step's spike: the surrogate's Heaviside, or the stored bit during reconstruction."""
    if bits is not None and not autograd:
        return bits[0].to(h.dtype)
    shift = h - (const(thr, h) if isinstance(thr, float) else thr)
    s = spec.surrogate.spike(shift) if autograd else spec.surrogate.fire(shift)
    return pin(s, None if bits is None else bits[0], autograd)


# ----------------------------------------------------------------------------------------------
# SpikingJelly 2.0.0: LIFNode, IFNode, ParametricLIFNode
# ----------------------------------------------------------------------------------------------


class SpikingJellyFamily(Family):
    """H = charge(V, X); S = Theta(H - v_th) (fires at the threshold); V = reset(H, S).

    consts: kind ('lif' | 'if' | 'plif' | 'beta'), tau, decay_input, v_threshold, v_reset (None =
    soft), detach_reset, beta ('beta': H = beta V + X, a hand-written snnTorch-style charge).
    params: 'w' for 'plif' (1/tau = sigmoid(w)).
    """

    name = "spikingjelly"
    equations = "lif"
    public_state = ("v",)
    binary_spikes = True

    def prepare(self, spec, P):
        P = dict(P)
        if spec.consts["kind"] == "plif":
            P["q"] = P["w"].sigmoid()
        return P

    def init_state(self, spec, x0, P):
        r = spec.consts["v_reset"]
        return (torch.full_like(x0, 0.0 if r is None else r),)

    def _charge(self, c, x, v, P):
        # constants as 0-d tensors (revpass.neurons.spec.const): the same arithmetic, fewer ops
        r = const(0.0 if c["v_reset"] is None else c["v_reset"], x)
        kind = c["kind"]
        if kind == "if":
            return v + x
        if kind == "beta":  # snnTorch-style charge, hand-written: H = beta V + X
            return const(c["beta"], x) * v + x
        if kind == "lif":
            tau = const(c["tau"], x)
            if _untracked(x, v):  # the same operations in one buffer (IEEE: x - a == -a + x, a + b == b + a)
                a = v - r
                return a.neg_().add_(x).div_(tau).add_(v) if c["decay_input"] else a.div_(tau).neg_().add_(v).add_(x)
            return v + (x - (v - r)) / tau if c["decay_input"] else v - (v - r) / tau + x
        q = P["q"]
        return v + (x - (v - r)) * q if c["decay_input"] else v - (v - r) * q + x

    def _reset(self, c, h, s):
        sd = s.detach() if c["detach_reset"] else s
        r = c["v_reset"]
        if _untracked(h, sd):  # as below, in fewer buffers (IEEE: h - a == -a + h, a + b == b + a)
            if r is None:
                return (sd * const(c["v_threshold"], h)).neg_().add_(h)
            return (const(1.0, h) - sd).mul_(h).add_(sd * const(r, h))
        if r is None:
            return h - sd * const(c["v_threshold"], h)
        return sd * const(r, h) + (const(1.0, h) - sd) * h

    def step(self, spec, x, state, P, bits=None, autograd=False):
        c = spec.consts
        (v,) = state
        h = self._charge(c, x, v, P)
        s = _spike(spec, h, c["v_threshold"], bits, autograd)
        v_next = self._reset(c, h, s)
        rec = {"h": h, "s": s}
        if c["kind"] == "plif":
            r = 0.0 if c["v_reset"] is None else c["v_reset"]
            rec["dq"] = x - (v - r) if c["decay_input"] else -(v - r)
        return s, (v_next,), rec, (s,)

    def rebuild_step(self, spec, x, state, P, bits):
        """F's step with its spike pinned, in 3-5 fused operations instead of :meth:`step`'s
        dozen: lerp for the charge (v + (x - v) / tau), addcmul for the reset. PLIF with its
        record for w's gradient takes :meth:`step`."""
        c = spec.consts
        kind = c["kind"]
        if kind == "plif":
            return super().rebuild_step(spec, x, state, P, bits)
        (v,) = state
        s = bits[0].to(x.dtype)
        r = 0.0 if c["v_reset"] is None else c["v_reset"]
        if kind == "if":
            h = v + x
        elif kind == "beta":
            h = torch.add(x, v, alpha=c["beta"])
        elif c["decay_input"]:  # v + (x - (v - r)) / tau
            h = torch.lerp(v, x if r == 0.0 else x + const(r, x), const(1.0 / c["tau"], x))
        else:  # v - (v - r) / tau + x
            h = torch.add(x, v, alpha=1.0 - 1.0 / c["tau"])
            if r != 0.0:
                h.add_(const(r / c["tau"], x))
        if c["v_reset"] is None:
            v_next = torch.add(h, s, alpha=-c["v_threshold"])
        else:
            v_next = torch.addcmul(h, s, h, value=-1.0)  # (1 - s) h
            if r != 0.0:
                v_next.add_(s, alpha=r)
        return (v_next,), {"h": h, "s": s}

    def _decay(self, c, P):
        """(dH/dV, dH/dX) as Python floats or 0-d tensors."""
        kind = c["kind"]
        if kind == "if":
            return 1.0, 1.0
        if kind == "beta":
            return c["beta"], 1.0
        k = 1.0 / c["tau"] if kind == "lif" else P["q"]
        return 1.0 - k, (k if c["decay_input"] else 1.0)

    def vjp(self, spec, recs, g_spike, g_state, P, need_params):
        c = spec.consts
        h, s = recs["h"], recs["s"]
        thr = c["v_threshold"]
        sg = _sg(spec, recs, h, thr)
        r = c["v_reset"]
        if c["detach_reset"]:
            dv_dh = None if r is None else torch.rsub(s, 1.0)
        elif r is None:
            dv_dh = sg.mul(-thr).add_(1.0)  # 1 - thr sg
        else:
            dv_dh = torch.rsub(h, r).mul_(sg).add_(1.0).sub_(s)  # (1 - s) + (r - h) sg
        a, b = self._decay(c, P)
        g_v = None if g_state is None else g_state[0]
        gh, g_v0 = _sweep(sg.mul_(g_spike), dv_dh, a, g_v)
        gP = {}
        if "w" in need_params:
            q = P["q"]
            gq = (gh * recs["dq"]).sum()
            gP["w"] = reduce_to(gq * q * (1 - q), P["w"])
        gx = gh if isinstance(b, float) and b == 1.0 else gh.mul_(b)
        return gx, (None if g_v0 is None else (g_v0,)), gP

    def exact_stream(self, spec, kept, g_spike, g_state, P, need_params):
        """LIF and IF: the exact node's backward as SpikingJelly 2.0 computes it on the CPU, op for
        op, one whole step at a time.

        On the CPU SpikingJelly differentiates its reference step (``_ops/lif/reference.py``)
        with autograd, so each step's gradient is a sequence of separately rounded ops:

            g_s  = g_spike_t - g_v * h_t  [+ g_v * v_reset]   hard reset, spike not detached
                 = g_spike_t - g_v * v_threshold               soft reset, spike not detached
            g_h  = g_s * sg_t + g_v * (1 - s_t)                (soft reset: + g_v)
            g_x  = g_h / tau                                   (IF, decay_input=False: g_h)
            g_v <- g_h - g_h / tau                             (IF: g_h)

        Mathematically this is :meth:`vjp`; only the rounding differs (by an ulp here and there),
        and training amplifies that. The surrogate derivative ``sg_t`` is SpikingJelly's own
        formula, evaluated over the whole step as SpikingJelly evaluates it: a transcendental one
        (Sigmoid, the default) rounds differently in a CPU kernel's vectorized lanes and its scalar
        tail, so a slice of the step would round some elements differently. Hence one step at a
        time rather than slices; the transient is a few step-sized tensors besides the input
        gradient. The parametric LIF (its tau gradient is a reduction, summed in another order)
        keeps :meth:`vjp`.
        """
        c = spec.consts
        if c["kind"] not in ("lif", "if"):
            return None
        h = kept["h"]
        thr, r = c["v_threshold"], c["v_reset"]
        tau = c["tau"] if c["kind"] == "lif" else None
        through_spike = not c["detach_reset"]
        gx = torch.empty_like(g_spike)
        g_v = None if g_state is None else g_state[0]
        for t in range(h.shape[0] - 1, -1, -1):  # few step-sized temporaries alive at once
            gh = h[t] - thr
            # 1 - s as a float (exactly 0 or 1), taken before the derivative overwrites gh
            keep = None if r is None or g_v is None else (~(gh >= 0)).to(gh.dtype)
            gh = spec.surrogate.deriv_(gh)  # sg_t
            if through_spike and g_v is not None:
                gs = (g_v * (thr if r is None else h[t])).neg_().add_(g_spike[t])
                if r is not None and r != 0.0:
                    gs.add_(g_v * r)
                gh.mul_(gs)
                del gs
            else:
                gh.mul_(g_spike[t])
            if g_v is not None:
                if keep is None:
                    gh.add_(g_v)
                else:
                    gh.addcmul_(g_v, keep)
                del keep
            if tau is None:
                gx[t] = g_v = gh
            elif c["decay_input"]:
                g_v = gh - torch.div(gh, tau, out=gx[t])
            else:
                gx[t] = gh
                g_v = gh.sub_(gh / tau)
        return gx, (None if g_v is None else (g_v,)), {}

    def rebuilds_input(self, spec):
        return spec.consts["kind"] in ("lif", "if", "plif", "beta")

    def input_steps(self, spec, kept, state, P):
        """X = the charge H = charge(V, X) solved for X, over the steps given at once: the state
        before each step is the reset of the previous step's H as the forward fires (h - thr and
        thr compare alike: a float difference is 0 only where they are equal), so it needs no
        sweep. Step-sized temporaries: X, the state before each step, the spikes as booleans."""
        c = spec.consts
        h = kept["h"]
        (v0,) = state
        r = 0.0 if c["v_reset"] is None else c["v_reset"]
        thr = const(c["v_threshold"], h)
        fired = torch.ge(h, thr) if spec.surrogate.fires_at_zero else torch.gt(h, thr)
        if c["v_reset"] is None:
            v_after = torch.sub(h, fired.to(h.dtype), alpha=c["v_threshold"])
        else:
            v_after = torch.where(fired, const(r, h), h)
        del fired
        v = v0.expand_as(h[0]).unsqueeze(0) if h.shape[0] == 1 else torch.cat(
            [v0.expand_as(h[0]).unsqueeze(0), v_after[:-1]])
        kind = c["kind"]
        x = torch.sub(h, v, alpha=c["beta"]) if kind == "beta" else torch.sub(h, v)
        if kind in ("lif", "plif"):
            k = const(1.0 / c["tau"], h) if kind == "lif" else P["q"]
            if c["decay_input"]:  # H = V + (X - (V - r)) k
                x.div_(k).add_(v)
                if r != 0.0:
                    x.sub_(const(r, h))
            else:  # H = V - (V - r) k + X
                x.addcmul_(v if r == 0.0 else v - const(r, h), k.expand_as(v) if k.dim() else k)
        return x, (v_after[-1],)

    def recs_from_kept(self, spec, kept, state0, P):
        c = spec.consts
        h = kept["h"]
        shift = h - c["v_threshold"]
        recs = {"h": h, "s": spec.surrogate.fire(shift), "shift": shift}
        if c["kind"] == "plif":
            (v0,) = state0
            v_after = self._reset(c, h, recs["s"])  # V_t for all t, vectorized
            v_prev = torch.cat([v0.expand_as(h[0]).unsqueeze(0), v_after[:-1]], 0)
            r = 0.0 if c["v_reset"] is None else c["v_reset"]
            if c["decay_input"]:
                recs["dq"] = (h - v_prev) / P["q"]  # = X - (V - r)
            else:
                recs["dq"] = -(v_prev - r)
        return recs


# ----------------------------------------------------------------------------------------------
# snnTorch 1.0.0: Leaky and Synaptic
# ----------------------------------------------------------------------------------------------


class SnnTorchFamily(Family):
    """snnTorch Leaky / Synaptic.

    The reset signal R_t = 1[U_{t-1} > threshold] (detached) is carried as part of the state,
    so that reconstruction can pin it. consts: kind ('leaky' | 'synaptic'), reset ('subtract' |
    'zero' | 'none'), reset_delay. params: beta, threshold, graded_spikes_factor, alpha
    (synaptic).
    """

    name = "snntorch"
    equations = "leaky_synaptic"

    def n_public(self, spec):
        return 2 if self._syn(spec) else 1  # (syn, mem) or (mem,); the reset signal is derived

    def n_state(self, spec):
        return self.n_public(spec) + 1

    def n_bits(self, spec):
        return 1 if spec.consts["reset_delay"] else 2

    def prepare(self, spec, P):
        P = dict(P)
        P["bc"] = P["beta"].clamp(0, 1)
        if spec.consts["kind"] == "synaptic":
            P["ac"] = P["alpha"].clamp(0, 1)
        return P

    def _syn(self, spec):
        return spec.consts["kind"] == "synaptic"

    def init_state(self, spec, x0, P):
        u = torch.zeros_like(x0)
        r = (u - P["threshold"] > 0).to(x0.dtype)
        return (torch.zeros_like(x0), u, r) if self._syn(spec) else (u, r)

    def complete_state(self, spec, public, P):
        u = public[-1]
        r = (u - P["threshold"] > 0).to(u.dtype)
        return (*public, r)

    def step(self, spec, x, state, P, bits=None, autograd=False):
        c = spec.consts
        thr, bc, g = P["threshold"], P["bc"], P["graded"]
        rec = {}
        if self._syn(spec):
            syn, u, r = state
            rec["synprev"] = syn
            syn = P["ac"] * syn + x
            rec["syn"] = syn
            base = bc * u + syn
            if c["reset"] == "subtract":
                h = base - r * thr
            elif c["reset"] == "zero":
                h = base - base * r
            else:
                h = base
        else:
            u, r = state
            if c["reset"] == "subtract":
                h = bc * u + x - r * thr
            elif c["reset"] == "zero":
                h = bc * ((1 - r) * u) + x
            else:
                h = bc * u + x
        rec.update(h=h, r=r, uprev=u)
        sp = _spike(spec, h, thr, bits, autograd)
        s = sp * g
        rec["s"] = sp
        if c["reset_delay"]:
            u_next = h
            r_next = sp.detach()
        else:
            do_reset = s / g - r
            rec["do_reset"] = do_reset
            if c["reset"] == "subtract":
                u_next = h - do_reset * thr
            elif c["reset"] == "zero":
                u_next = h - do_reset * h
            else:
                u_next = h
            r_next = (u_next - thr > 0).to(h.dtype).detach()
            r_next = pin(r_next, None if bits is None else bits[1], False)
        out_bits = (sp,) if c["reset_delay"] else (sp, r_next)
        new_state = (syn, u_next, r_next) if self._syn(spec) else (u_next, r_next)
        return s, new_state, rec, out_bits

    def vjp(self, spec, recs, g_spike, g_state, P, need_params):
        c = spec.consts
        thr, bc, g = P["threshold"], P["bc"], P["graded"]
        h, sp, r = recs["h"], recs["s"], recs["r"]
        T = h.shape[0]
        sg = _sg(spec, recs, h, thr)
        ds_dh = sg * g
        if c["reset_delay"] or c["reset"] == "none":
            du_dh = None
        elif c["reset"] == "subtract":
            du_dh = 1.0 - sg * thr
        else:
            du_dh = (1.0 - recs["do_reset"]) - h * sg
        syn = self._syn(spec)
        if syn:
            g_syn, g_u = (None, None) if g_state is None else (g_state[0], g_state[1])
        else:
            g_u = None if g_state is None else g_state[0]
        zero = c["reset"] == "zero"
        gx = torch.empty_like(g_spike)
        gh_all = torch.empty_like(g_spike)
        gu_in = torch.zeros_like(g_spike) if ("threshold" in need_params and du_dh is not None) else None
        gsyn_all = torch.empty_like(g_spike) if (syn and "alpha" in need_params) else None
        one_minus_r = 1.0 - r if zero else None
        torch.mul(g_spike, ds_dh, out=gh_all)
        for t in range(T - 1, -1, -1):
            gh = gh_all[t]
            if g_u is not None:
                if gu_in is not None:
                    gu_in[t] = g_u
                if du_dh is None:
                    gh.add_(g_u)
                else:
                    gh.addcmul_(g_u, du_dh[t])
            if syn:
                gb = gh * one_minus_r[t] if zero else gh
                g_u = gb * bc
                gs = gb if g_syn is None else gb + g_syn  # g_syn: from later steps
                gx[t] = gs
                if gsyn_all is not None:
                    gsyn_all[t] = gs
                g_syn = gs * P["ac"]
            else:
                gx[t] = gh
                g_u = gh * (bc * one_minus_r[t] if zero else bc)
        gP: Dict[str, Tensor] = {}
        if "beta" in need_params:
            beta = P["beta"]
            mask = ((beta > 0) & (beta < 1)).to(h.dtype)  # as torch.clamp's backward
            if syn:
                gb_all = gh_all * one_minus_r if zero else gh_all
                gbc = gb_all * recs["uprev"]
            else:
                gbc = gh_all * (one_minus_r * recs["uprev"] if zero else recs["uprev"])
            gP["beta"] = reduce_to(gbc.sum(0) if gbc.dim() > beta.dim() else gbc, beta) * mask
        if syn and "alpha" in need_params:
            alpha = P["alpha"]
            mask = ((alpha > 0) & (alpha < 1)).to(h.dtype)
            gP["alpha"] = reduce_to((gsyn_all * recs["synprev"]).sum(0), alpha) * mask
        if "threshold" in need_params:
            gt = -(g_spike * ds_dh)
            if c["reset"] == "subtract" and not zero:
                gt = gt - gh_all * r
            if gu_in is not None:
                if c["reset"] == "subtract":
                    gt = gt + gu_in * (thr * sg - recs["do_reset"])
                else:
                    gt = gt + gu_in * (h * sg)
            gP["threshold"] = reduce_to(gt.sum(0), P["threshold"])
        if "graded" in need_params:
            gP["graded"] = reduce_to((g_spike * sp).sum(0), P["graded"])
        if g_u is None:
            g0 = None
        elif syn:
            g0 = (g_syn, g_u, torch.zeros_like(g_u))
        else:
            g0 = (g_u, torch.zeros_like(g_u))
        return gx, g0, gP

    def exact_keep(self, spec, need_params):
        return ("h", "syn") if (self._syn(spec) and "alpha" in need_params) else ("h",)

    def recs_from_kept(self, spec, kept, state0, P):
        c = spec.consts
        thr, g = P["threshold"], P["graded"]
        h = kept["h"]
        shift = h - thr
        sp = spec.surrogate.fire(shift)
        syn = self._syn(spec)
        u, r = state0[-2], state0[-1]
        if c["reset_delay"]:
            # R_t = Theta(H_{t-1} - thr) = spike of the previous step; U_{t-1} = H_{t-1}
            r_seq = torch.cat([r.expand_as(h[0]).unsqueeze(0), sp[:-1]], 0)
            u_prev = torch.cat([u.expand_as(h[0]).unsqueeze(0), h[:-1]], 0)
            recs = {"h": h, "s": sp, "r": r_seq, "uprev": u_prev, "shift": shift}
        else:
            rs, us, drs = [], [], []
            for t in range(h.shape[0]):
                rs.append(r)
                us.append(u)
                do_reset = (sp[t] * g) / g - r
                drs.append(do_reset)
                if c["reset"] == "subtract":
                    u = h[t] - do_reset * thr
                elif c["reset"] == "zero":
                    u = h[t] - do_reset * h[t]
                else:
                    u = h[t]
                r = (u - thr > 0).to(h.dtype)
            recs = {"h": h, "s": sp, "r": torch.stack([x.expand_as(h[0]) for x in rs]),
                    "uprev": torch.stack([x.expand_as(h[0]) for x in us]),
                    "do_reset": torch.stack(drs), "shift": shift}
        if syn and "syn" in kept:
            recs["synprev"] = torch.cat([state0[0].expand_as(h[0]).unsqueeze(0), kept["syn"][:-1]], 0)
        return recs


# ----------------------------------------------------------------------------------------------
# norse 1.1.0: LIF / LIFCell (current-based) and LIFBoxCell
# ----------------------------------------------------------------------------------------------


class NorseLIFFamily(Family):
    """norse lif_feed_forward_step. State (v, i); reset to v_reset, not detached.

    params (buffers): tau_syn_inv, tau_mem_inv, v_leak, v_th, v_reset. consts: dt.
    """

    name = "norse_lif"
    equations = "current_lif"
    public_state = ("v", "i")
    binary_spikes = True  # heaviside forward, whatever p.method's surrogate

    def init_state(self, spec, x0, P):
        return (torch.zeros_like(x0) + P["v_leak"], torch.zeros_like(x0))

    def step(self, spec, x, state, P, bits=None, autograd=False):
        dt = spec.consts["dt"]
        v, i = state
        i_new = i + x
        dv = dt * P["tau_mem_inv"] * ((P["v_leak"] - v) + i_new)
        v_decayed = v + dv
        di = -dt * P["tau_syn_inv"] * i_new
        i_decayed = i_new + di
        z = _spike(spec, v_decayed, P["v_th"], bits, autograd)
        v_new = (1 - z) * v_decayed + z * P["v_reset"]
        return z, (v_new, i_decayed), {"h": v_decayed, "s": z}, (z,)

    def vjp(self, spec, recs, g_spike, g_state, P, need_params):
        dt = spec.consts["dt"]
        h, z = recs["h"], recs["s"]
        sg = _sg(spec, recs, h, P["v_th"])
        dv_dh = torch.rsub(h, P["v_reset"]).mul_(sg).add_(1.0).sub_(z)  # (1 - z) + (v_reset - h) sg
        # the forward's float32 constants, combined in the sequence's precision
        k = (dt * P["tau_mem_inv"]).to(h.dtype)
        a = 1 - k
        c = 1 + (-dt * P["tau_syn_inv"]).to(h.dtype)
        g_v, g_i = (None, None) if g_state is None else g_state
        gx = torch.empty_like(g_spike)
        gh_all = sg.mul_(g_spike)
        for t in range(h.shape[0] - 1, -1, -1):
            gh = gh_all[t]
            if g_v is not None:
                gh.addcmul_(g_v, dv_dh[t])
            gi = gh * k if g_i is None else torch.addcmul(gh * k, g_i, c)
            gx[t] = gi
            g_i = gi
            g_v = gh * a
        return gx, (g_v, g_i), {}

    def recs_from_kept(self, spec, kept, state0, P):
        h = kept["h"]
        shift = h - P["v_th"]
        return {"h": h, "s": spec.surrogate.fire(shift), "shift": shift}


class NorseLIFBoxFamily(Family):
    """norse lif_box_feed_forward_step: state v only; reset to a value or by subtraction."""

    name = "norse_lif_box"
    equations = "lif_box"
    public_state = ("v",)
    binary_spikes = True

    def init_state(self, spec, x0, P):
        return (torch.zeros_like(x0) + P["v_leak"],)

    def step(self, spec, x, state, P, bits=None, autograd=False):
        dt = spec.consts["dt"]
        (v,) = state
        dv = dt * P["tau_mem_inv"] * (x + P["v_leak"] - v)
        v_decayed = v + dv
        z = _spike(spec, v_decayed, P["v_th"], bits, autograd)
        if spec.consts["reset"] == "value":
            v_new = (1 - z) * v_decayed + z * P["v_reset"]
        else:
            v_new = (1 - z) * v_decayed + z * (v_decayed - P["v_th"])
        return z, (v_new,), {"h": v_decayed, "s": z}, (z,)

    def vjp(self, spec, recs, g_spike, g_state, P, need_params):
        dt = spec.consts["dt"]
        h, z = recs["h"], recs["s"]
        sg = _sg(spec, recs, h, P["v_th"])
        if spec.consts["reset"] == "value":
            dv_dh = torch.rsub(h, P["v_reset"]).mul_(sg).add_(1.0).sub_(z)
        else:
            dv_dh = sg.mul(-P["v_th"]).add_(1.0)
        k = (dt * P["tau_mem_inv"]).to(h.dtype)
        g_v = None if g_state is None else g_state[0]
        gh, g_v0 = _sweep(sg.mul_(g_spike), dv_dh, 1 - k, g_v)
        return gh.mul_(k), (None if g_v0 is None else (g_v0,)), {}

    def recs_from_kept(self, spec, kept, state0, P):
        h = kept["h"]
        shift = h - P["v_th"]
        return {"h": h, "s": spec.surrogate.fire(shift), "shift": shift}


for _fam in (SpikingJellyFamily(), SnnTorchFamily(), NorseLIFFamily(), NorseLIFBoxFamily()):
    register_family(_fam)
