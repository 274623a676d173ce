"""Spikes as bits: 8 per byte (a reversible node keeps F's spike decisions so, docs/method.md)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


def is_binary(t: Tensor) -> bool:
    """Every element is 0 or 1 (spikes): a floating-point tensor with data (not on meta)."""
    return (t.is_floating_point() and t.numel() > 0 and t.device.type != "meta"
            and bool(((t == 0) | (t == 1)).all()))


_WEIGHTS = {}


def pack_bits(b: Tensor) -> Tensor:
    """(T, ...) bool -> (T, ceil(n/8)) uint8, n = elements per step."""
    T = b.shape[0]
    flat = b.reshape(T, -1)
    n = flat.shape[1]
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(T, pad)], 1)
    weights = _WEIGHTS.get(b.device)
    if weights is None:
        weights = _WEIGHTS[b.device] = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=b.device)
    # each byte's bits are distinct powers of two: their sum is their or (at most 255)
    return (flat.view(T, -1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of pack_bits; ``shape`` is the (T, ...) shape of the bool tensor."""
    T = packed.shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(T, -1)[:, :n].reshape(shape).bool()


def pack_flat(x: Tensor) -> Tensor:
    """A tensor of 0s and 1s as one row of bits, (1, ceil(n / 8)) for its n elements (nonzero: 1):
    what a layer or segment keeps of spikes for its backward."""
    return pack_bits(x.detach().reshape(1, -1) != 0)


def unpack_flat(packed: Tensor, shape: Sequence[int], dtype: torch.dtype,
                rows: Optional[Tuple[int, int]] = None) -> Tensor:
    """:func:`pack_flat`'s tensor again, of ``shape`` and ``dtype``; with ``rows`` = (a, b), only
    its [a, b) along the first dim (a chunk need not start on a byte)."""
    if rows is None:
        return unpack_bits(packed, (1, math.prod(shape))).reshape(shape).to(dtype)
    a, b = rows
    row = math.prod(shape[1:])
    lo, hi = a * row, b * row
    first, last = lo // 8, (hi + 7) // 8
    flat = unpack_bits(packed[:, first:last], (1, (last - first) * 8))
    return flat[0, lo - first * 8: hi - first * 8].reshape((b - a, *shape[1:])).to(dtype)


def packed_planes_shape(shape: Sequence[int]) -> Tuple[int, int]:
    """The packed shape of (T, nb, ...) decisions: each of the nb planes of a step starts on a
    byte, so that a kernel writes whole bytes: (T, nb * ceil(n / 8)), n = elements per plane."""
    n = 1
    for s in shape[2:]:
        n *= s
    return (shape[0], shape[1] * ((n + 7) // 8))


def pack_planes(b: Tensor) -> Tensor:
    """(T, nb, ...) bool -> (T, nb * ceil(n/8)) uint8 (:func:`packed_planes_shape`)."""
    T, nb = b.shape[0], b.shape[1]
    return pack_bits(b.reshape(T * nb, -1)).reshape(packed_planes_shape(b.shape))


def unpack_planes(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_planes`; ``shape`` is the (T, nb, ...) shape of the decisions."""
    T, nb = shape[0], shape[1]
    return unpack_bits(packed.reshape(T * nb, -1), (T * nb,) + tuple(shape[2:])).reshape(shape)
