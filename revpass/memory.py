"""Measuring what autograd keeps for backward.

:func:`saved_bytes` runs a function under ``torch.autograd.graph.saved_tensors_hooks`` and counts
the bytes of every tensor saved for backward that is still held when the function returns
(a branch of the graph that died during the forward, such as a detached reset computed with a
surrogate, frees what it saved), deduplicated by storage, excluding the storages of parameters,
buffers and the inputs (they exist anyway). Tensors stashed on ``ctx`` outside
``save_for_backward`` are invisible to the hooks, which is why revpass's nodes save everything
through it.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from revpass.nodes.ops import visible_internals
from revpass.state import reset_states
from revpass.utils import flatten

Tensor = torch.Tensor


@dataclass
class SavedReport:
    """Bytes kept for backward, by storage."""

    storages: Dict[int, int] = field(default_factory=dict)  # data_ptr -> nbytes
    excluded: Dict[int, int] = field(default_factory=dict)
    shared_with_output: int = 0  # bytes of kept storages that are also the output's

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    @property
    def total_without_output(self) -> int:
        return self.total - self.shared_with_output


def _key(t: Tensor):
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def saved_bytes(
    fn: Callable[[], object],
    exclude: Iterable[Tensor] = (),
    output_of: Optional[Callable[[object], Iterable[Tensor]]] = None,
) -> tuple:
    """Run ``fn()`` and measure what it keeps for backward.

    Args:
        fn: the computation (its result is returned unchanged).
        exclude: tensors whose storages are not counted (parameters, inputs).
        output_of: maps the result to the output tensors; kept storages shared with them are
            reported in ``shared_with_output`` (a consumer such as a conv keeps them anyway).

    Returns:
        (result, SavedReport)
    """
    excluded = {}
    for t in exclude:
        if isinstance(t, Tensor) and t.numel():
            p, n = _key(t)
            excluded[p] = n
    rep = SavedReport(excluded=excluded)
    seen = []  # (weak reference to what autograd holds, storage address, bytes)

    def pack(t: Tensor):
        if t.numel() == 0 or t.device.type == "meta":
            return t
        p, n = _key(t)
        if p not in excluded:
            seen.append((weakref.ref(t), p, n))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    for ref, p, n in seen:
        if ref() is not None:  # still held by the graph (freed branches are not kept)
            rep.storages[p] = max(n, rep.storages.get(p, 0))
    if output_of is not None:
        for t in output_of(out):
            if isinstance(t, Tensor) and t.numel():
                p, _ = _key(t)
                if p in rep.storages:
                    rep.shared_with_output += rep.storages[p]
    return out, rep


# ----------------------------------------------------------------------------------------------
# whole training steps (tools/bench_memory.py and `revpass bench`)
# ----------------------------------------------------------------------------------------------


def _loss(out) -> Tensor:
    """The sum of every tensor in ``out`` (nested tuples, lists, dicts)."""
    return sum((t.float().sum() for t in flatten(out)), torch.zeros(()))


def kept_bytes(model: torch.nn.Module, *inputs) -> int:
    """Bytes ``model`` keeps for backward at the end of its forward (storage-deduplicated; its
    parameters, buffers and the inputs excluded), from the reset state."""
    reset_states(model)
    _, rep = saved_bytes(lambda: model(*inputs), exclude=[*inputs, *model.parameters(), *model.buffers()])
    reset_states(model)
    return rep.total


def step_peak(model: torch.nn.Module, *inputs) -> int:
    """The peak of one training step (forward, sum of the outputs, backward) measured by
    torch's MemTracker, less parameters, gradients, buffers and optimizer state: activations and
    temporaries, recompute buffers and the revpass nodes' forward temporaries and backward
    workspaces included (:func:`revpass.nodes.ops.visible_internals`)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    reset_states(model)
    model.zero_grad(set_to_none=True)
    mt = MemTracker()
    mt.track_external(model)
    with warnings.catch_warnings():
        # MemTracker warns where its tracking is handed None instead of a tensor (a gradient hook):
        # it counts nothing there, and it is nothing a user can act on
        warnings.filterwarnings("ignore", "Expected a tensor or a traceable wrapper-subclass", UserWarning)
        with visible_internals(), mt:  # the nodes' forward temporaries and backward workspaces count too
            _loss(model(*inputs)).backward()
    snap = mt.get_tracker_snapshot("peak")
    model.zero_grad(set_to_none=True)
    reset_states(model)
    return tracker_bytes(snap, less=("PARAM", "GRAD", "BUFFER", "OPT"))


def cuda_step_peak(model: torch.nn.Module, *inputs) -> int:
    """On CUDA: the peak of one training step from torch.cuda's allocator, less what existed
    before it (parameters, inputs) and the parameters' gradients: activations and temporaries,
    as :func:`step_peak` measures them on the CPU."""
    device = next(t.device for t in inputs if isinstance(t, torch.Tensor))
    reset_states(model)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _loss(model(*inputs)).backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    reset_states(model)
    return peak - grads


#: the CUDA caching allocator's smallest block, as torch's MemTracker counts it
_CUDA_BLOCK = 1 if int(os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", 0)) else 2**9


class StorageTracker(TorchDispatchMode):
    """The bytes of the tensor storages alive, and their peak, over what runs inside it (a
    dispatch mode): every storage an operation returns is counted from then until it is freed
    (a weak reference's callback), once however many tensors view it; ``tensors`` given are
    counted from the start, so that a view of one made inside does not count it as new. On CUDA
    a storage counts as the caching allocator's 512-byte blocks it takes, as torch's MemTracker
    counts it (torch.distributed._tools.mem_tracker), whose running total and peak these are,
    without its module and category bookkeeping: that took three quarters of the time of a
    measurement of a layer's backward, for the same figures. ``peak`` is the most after any
    operation; set it back to ``total`` to measure from a point on."""

    def __init__(self, *tensors: Tensor):
        super().__init__()
        self._counted: Dict[int, tuple] = {}  # id(storage) -> (its weak reference, bytes counted)
        self.total = 0
        for t in tensors:
            self._count(t)
        self.peak = self.total

    def _count(self, t: Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage (sparse, a wrapper subclass)
            return
        key = id(st)
        if key not in self._counted:
            self._counted[key] = (weakref.ref(st, functools.partial(self._freed, key)), 0)
        self._recount(st)

    def _recount(self, st: torch.UntypedStorage) -> None:
        """A counted storage's bytes as they are now (it may have been resized)."""
        had = self._counted.get(id(st))
        if had is None:
            return
        n = st.nbytes()
        if st.device.type == "cuda" and _CUDA_BLOCK > 1:
            n = -(-n // _CUDA_BLOCK) * _CUDA_BLOCK
        self._counted[id(st)] = (had[0], n)
        self.total += n - had[1]

    def _freed(self, key: int, _ref) -> None:
        had = self._counted.pop(key, None)
        if had is not None:
            self.total -= had[1]

    def __enter__(self):
        # a storage resized in Python (a rebuilt output freed early with resize_(0)) is no
        # operation the mode sees: it is counted at its new size at once
        self._resize = resize = torch.UntypedStorage.resize_

        @functools.wraps(resize)
        def resized(st, size):
            out = resize(st, size)
            self._recount(st)
            return out

        torch.UntypedStorage.resize_ = resized
        return super().__enter__()

    def __exit__(self, *args):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, Tensor):
                self._count(t)
        if self.total > self.peak:
            self.peak = self.total
        return out


def tracker_bytes(snapshot, less=()) -> int:
    """Bytes in a MemTracker snapshot, over every device: its Total, less the named categories
    (PARAM, GRAD, BUFFER, OPT, ACT, TEMP)."""
    total = 0
    for dev in snapshot.values():
        parts = {str(k).split(".")[-1]: v for k, v in dev.items()}
        total += parts["Total"] - sum(parts.get(k, 0) for k in less)
    return total


def step_time(model: torch.nn.Module, *inputs, repeat: int = 3) -> float:
    """Median seconds of a training step over ``repeat`` runs, after one warm-up run."""
    import statistics
    import time

    cuda = [t.device for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda]

    def sync():
        for d in cuda[:1]:
            torch.cuda.synchronize(d)

    times = []
    for i in range(repeat + 1):
        reset_states(model)
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        _loss(model(*inputs)).backward()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    reset_states(model)
    return statistics.median(times)
