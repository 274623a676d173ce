"""Layers that read spikes keep them as bits (docs/method.md, "Spike inputs kept as bits").

A convolution, a linear layer or a max pool keeps its input for backward, as float32 (or the
model's dtype): 32 bits for a value that is 0 or 1 when the input is the output of an exact node.
These functions compute the layer's own forward (the same torch call, so bit for bit the same
output) and keep that input packed 8 per byte; the backward unpacks it (the same values) and runs
the operation autograd would have run on it, so the gradients are the original's bit for bit:

* convolution: ``aten.convolution_backward`` with the arguments autograd's ConvolutionBackward
  passes;
* linear: autograd's own backward of ``F.linear`` on the unpacked input (``linear`` is
  composite, and the products its backward runs depend on the input's shape), its graph recorded
  with the forward's product left uncomputed (:class:`_ProductsUncomputed`);
* max pool: its indices are found again from the unpacked input (``max_pool_with_indices``, the
  first maximum of each window: the same indices), then ``max_poolNd_with_indices_backward``, a
  chunk of samples at a time (:data:`POOL_CHUNK_ELEMS`: the unpacked input and the indices are a
  chunk's); no int64 index is kept.

``folds_time``: the layer runs over (T, B, ...) by folding T into the batch and back (SpikingJelly's
multi-step layers, ``seq_to_ann_forward``). Without gradients (inference, export) each is the
plain torch call. ``checked``: the input was 0 or 1 on the example inputs without being spikes by
construction; each call keeps it as bits only where it is.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from revpass.nodes.bits import is_binary, pack_flat, unpack_flat

Tensor = torch.Tensor

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_POOL = {1: torch.ops.aten.max_pool1d_with_indices, 2: torch.ops.aten.max_pool2d_with_indices,
         3: torch.ops.aten.max_pool3d_with_indices}
_POOL_BACKWARD = {2: torch.ops.aten.max_pool2d_with_indices_backward,
                  3: torch.ops.aten.max_pool3d_with_indices_backward}
_PLAIN_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
#: a max pool's backward over spikes runs over about this many input elements at a time
POOL_CHUNK_ELEMS = 1 << 16


def _needs_grad(*ts: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _as_bits(x: Tensor, checked: bool, *ts: Optional[Tensor]) -> bool:
    """Whether the call keeps ``x`` as bits: gradients are wanted and, where ``checked`` (``x``
    was 0 or 1 on the example inputs, not by construction), every element of ``x`` is 0 or 1 now
    (else the plain torch call, which keeps ``x`` as it is; also while torch.export or
    torch.compile traces, where a check on values cannot be)."""
    return _needs_grad(x, *ts) and (not checked or not torch.compiler.is_compiling() and is_binary(x))


def _pack(x: Tensor) -> Tuple[Tensor, tuple]:
    return pack_flat(x), tuple(x.shape)


def _folded(fn, x: Tensor, folds_time: bool, *args) -> Tensor:
    if not folds_time:
        return fn(x, *args)
    y = fn(x.flatten(0, 1), *args)
    return y.view(x.shape[0], x.shape[1], *y.shape[1:])


# -- convolution ----------------------------------------------------------------------------------
class _ConvOnSpikes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dims, stride, padding, dilation, groups):
        y = _CONV[dims](x, weight, bias, stride, padding, dilation, groups)
        bits, ctx.shape = _pack(x)
        ctx.dtype, ctx.conf = x.dtype, (dims, stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(bits, weight)
        return y

    @staticmethod
    def backward(ctx, gy):
        bits, weight = ctx.saved_tensors
        dims, stride, padding, dilation, groups = ctx.conf
        x = unpack_flat(bits, ctx.shape, ctx.dtype)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy, x, weight, [weight.shape[0]] if ctx.has_bias else None, list(stride), list(padding), list(dilation),
            False, [0] * dims, groups, mask)
        return gx, gw, gb, None, None, None, None, None


def conv_on_spikes(x: Tensor, weight: Tensor, bias: Optional[Tensor], dims: int, stride: tuple, padding: tuple,
                   dilation: tuple, groups: int, folds_time: bool, checked: bool = False) -> Tensor:
    """``F.convNd(x, weight, bias, ...)`` (over (T, B, ...) with ``folds_time``), keeping ``x``
    as bits for backward (module docstring); ``x`` must be 0 or 1, or with ``checked`` is
    kept as it is where it is not."""
    if not _as_bits(x, checked, weight, bias):
        return _folded(_CONV[dims], x, folds_time, weight, bias, stride, padding, dilation, groups)
    return _folded(_ConvOnSpikes.apply, x, folds_time, weight, bias, dims, stride, padding, dilation, groups)


# -- linear ---------------------------------------------------------------------------------------
class _LinearOnSpikes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        y = F.linear(x, weight, bias)
        bits, ctx.shape = _pack(x)
        ctx.dtype = x.dtype
        ctx.save_for_backward(bits, weight, bias)
        return y

    @staticmethod
    def backward(ctx, gy):
        bits, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.enable_grad():
            x = unpack_flat(bits, ctx.shape, ctx.dtype).requires_grad_(need[0])
            w = weight.detach().requires_grad_(need[1])
            b = bias.detach().requires_grad_(need[2]) if bias is not None else None
            inputs = [t for t, n in zip((x, w, b), need) if t is not None and n]
            with _ProductsUncomputed():  # autograd's graph of F.linear, its products' values not computed
                y = F.linear(x, w, b)
            grads = iter(torch.autograd.grad(y, inputs, gy))
        return tuple(next(grads) if t is not None and n else None for t, n in zip((x, w, b), need))


class _ProductsUncomputed(TorchDispatchMode):
    """Runs every operation as it is but the matrix products, whose outputs come back with their
    shape and dtype and no values computed (no meta tensor made either: a memory tracker would
    count its bytes). Under it, ``F.linear`` records autograd's
    own graph (the products its backward runs depend on the input's shape, so this graph is the one
    way to be bit for bit) at the cost of its cheap operations: the backward of a product reads its
    inputs, never its output, and nothing else reads that output. On a classifier's
    25088 x 4096 layer the product is most of the forward's time."""

    #: each product's output shape from its operands' (the last two arguments: the self of addmm,
    #: baddbmm and addmv comes first and is only added)
    SHAPES = {torch.ops.aten.mm.default: lambda a, b: (a[0], b[1]),
              torch.ops.aten.addmm.default: lambda a, b: (a[0], b[1]),
              torch.ops.aten.bmm.default: lambda a, b: (a[0], a[1], b[2]),
              torch.ops.aten.baddbmm.default: lambda a, b: (a[0], a[1], b[2]),
              torch.ops.aten.mv.default: lambda a, b: (a[0],),
              torch.ops.aten.addmv.default: lambda a, b: (a[0],),
              torch.ops.aten.dot.default: lambda a, b: ()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        shape = self.SHAPES.get(func)
        if shape is None:
            return func(*args, **kwargs)
        a, b = args[-2], args[-1]
        return torch.empty(shape(a.shape, b.shape), dtype=torch.result_type(a, b), device=a.device)


def linear_on_spikes(x: Tensor, weight: Tensor, bias: Optional[Tensor], checked: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``, keeping ``x`` as bits for backward; ``x`` must be 0 or 1,
    or with ``checked`` is kept as it is where it is not."""
    if not _as_bits(x, checked, weight, bias):
        return F.linear(x, weight, bias)
    return _LinearOnSpikes.apply(x, weight, bias)


# -- max pool -------------------------------------------------------------------------------------
class _MaxPoolOnSpikes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dims, kernel_size, stride, padding, dilation, ceil_mode):
        ctx.conf = (dims, kernel_size, stride, padding, dilation, ceil_mode)
        y, _ = _POOL[dims](x, kernel_size, stride, padding, dilation, ceil_mode)
        bits, ctx.shape = _pack(x)
        ctx.dtype = x.dtype
        ctx.save_for_backward(bits)
        return y

    @staticmethod
    def backward(ctx, gy):
        (bits,) = ctx.saved_tensors
        dims, kernel_size, stride, padding, dilation, ceil_mode = ctx.conf
        shape = ctx.shape
        row = math.prod(shape[1:])  # elements per sample; samples pool independently
        # samples at a time, about POOL_CHUNK_ELEMS elements, starting on a whole byte of bits:
        # the unpacked input and the indices are a chunk's, not the whole input's
        step = 8 // math.gcd(row, 8)
        rows = max(step, POOL_CHUNK_ELEMS // max(1, row) // step * step)
        gx = gy.new_empty(shape)
        for a in range(0, shape[0], rows):
            b = min(shape[0], a + rows)
            x = unpack_flat(bits, shape, ctx.dtype, (a, b))
            _, indices = _POOL[dims](x, kernel_size, stride, padding, dilation, ceil_mode)
            gx[a:b] = _POOL_BACKWARD[dims](gy[a:b], x, kernel_size, stride, padding, dilation, ceil_mode, indices)
            del x, indices
        return gx, None, None, None, None, None, None


def max_pool_on_spikes(x: Tensor, dims: int, kernel_size: tuple, stride: tuple, padding: tuple, dilation: tuple,
                       ceil_mode: bool, folds_time: bool, checked: bool = False) -> Tensor:
    """``F.max_poolNd(x, ...)`` (over (T, B, ...) with ``folds_time``), keeping ``x`` as bits for
    backward (its indices are found again there); ``x`` must be 0 or 1, or with ``checked`` is
    kept as it is where it is not."""
    if not _as_bits(x, checked) or dims not in _POOL_BACKWARD:
        return _folded(_PLAIN_POOL[dims], x, folds_time, kernel_size, stride, padding, dilation, ceil_mode)
    return _folded(_MaxPoolOnSpikes.apply, x, folds_time, dims, kernel_size, stride, padding, dilation, ceil_mode)


class LayerOnSpikes(nn.Module):
    """A convolution, linear layer or max pool whose input is spikes, at the layer's place in the
    model: the layer's very parameters under their names (so its state_dict keys, and a
    parameter shared elsewhere, stay), its forward one of the functions above. A module, not a bare
    call in the graph, so that what wraps modules (FSDP's ``fully_shard``, hooks added after
    conversion) finds it; hooks the layer had are not carried over. ``checked``: its input is 0
    or 1 on the example inputs but not spikes by construction (an adaptive average pool that
    repeats its spikes, say): each call checks, and keeps a call's input as it is where it is not."""

    checked = False

    def __init__(self, layer: nn.Module, fn: Callable, param_names: Sequence[str], consts: tuple,
                 checked: bool = False):
        super().__init__()
        for name in param_names:
            self.register_parameter(name, getattr(layer, name, None))
        self.fn, self.param_names, self.consts = fn, tuple(param_names), tuple(consts)
        self.layer = type(layer).__name__
        self.checked = checked

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x, *(getattr(self, n) for n in self.param_names), *self.consts, checked=self.checked)

    def extra_repr(self) -> str:
        return f"{self.layer}, {self.fn.__name__}" + (", checked" if self.checked else "")
