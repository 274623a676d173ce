"""A batch norm folded into a reversible node (revpass/nodes/batchnorm.py), in Triton.

The first pass is the node's own backward kernel with FOLD (revpass/nodes/kernels/reversible.py):
it gives dL/dz in the input gradient's buffer, G's decisions as bits, and per element the sums
over T of dL/dz and dL/dz * x^; the per-channel sums are those summed over the batch and spatial
dims (a fixed order: deterministic). The second pass, here, rebuilds x^ from z = Y - spikes (F's
stored bits for G's channels, G's for F's) and writes the batch norm's input gradient over dL/dz:

    gc = gamma / std * (gz - dbeta / M - x^ * dgamma / M)
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from revpass.neurons.spec import NeuronSpec, Params, State, family_of
from revpass.nodes.kernels import common, reversible
from revpass.nodes.kernels.surrogates import div

Tensor = torch.Tensor

_INTS = ["T", "NH", "NS", "CS", "CSH", "NBP", "S", "CH"]


@triton.jit
def _normalized(y_ptr_t, cin_t, plane_ptr, n, ch, mask, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, KEEP_INPUT: tl.constexpr):
    """x^ of one half at step t: from the kept input, or from z = Y - spikes."""
    if KEEP_INPUT:
        xh = (tl.load(cin_t, mask=mask, other=0.0) - tl.load(mean_ptr + ch, mask=mask, other=0.0)) \
            * tl.load(invstd_ptr + ch, mask=mask, other=1.0)
    else:
        byte = tl.load(plane_ptr + n // 8, mask=mask, other=0)
        spike = ((byte >> (n % 8).to(tl.uint8)) & 1)
        xh = tl.load(y_ptr_t, mask=mask, other=0.0)
        xh = xh - spike.to(xh.dtype)
        if HAS_BETA:
            xh = xh - tl.load(beta_ptr + ch, mask=mask, other=0.0)
        if HAS_GAMMA:
            xh = div(xh, tl.load(gamma_ptr + ch, mask=mask, other=1.0))
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
