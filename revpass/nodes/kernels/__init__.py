"""Fused Triton kernels for the nodes, and the choice of backend.

One sequence kernel per node and direction (revpass/nodes/kernels/exact.py, reversible.py,
batchnorm.py): the state lives in registers and the kernel loops over T itself, so the number of
launches per node call does not grow with T. The PyTorch path (revpass/nodes/reversible.py,
exact.py) stays the reference and the CPU implementation.

``REVPASS_KERNELS`` selects the backend, read at each node's forward (its backward uses the
backend its forward used):

* ``auto`` (default): Triton for CUDA tensors when triton imports, PyTorch otherwise;
* ``triton``: Triton wherever it can run: CUDA tensors, and CPU tensors when triton runs its
  interpreter (``TRITON_INTERPRET=1``, set before triton is imported), which is how CI tests the
  kernels; elsewhere PyTorch, with a warning;
* ``torch``: PyTorch everywhere.

A node whose neuron the kernels do not cover (a surrogate that is the user's own function,
per-neuron parameter tensors) runs the PyTorch path on every device; :func:`unsupported` says why,
and convert's report says so for that site. Importing this package does not import triton.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Dict, Optional

import torch

from revpass.neurons.spec import NeuronSpec, family_of

Tensor = torch.Tensor

SETTINGS = ("auto", "triton", "torch")


def setting() -> str:
    """The ``REVPASS_KERNELS`` setting (``auto`` when unset)."""
    value = os.environ.get("REVPASS_KERNELS", "auto").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"REVPASS_KERNELS={value!r}: choose one of {', '.join(SETTINGS)}")
    return value


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton imports (it comes with torch's CUDA builds)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to import means no kernels
        return False
    return True


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unsupported(spec: NeuronSpec, P: Optional[Dict[str, Tensor]] = None) -> Optional[str]:
    """Why the kernels cannot run this neuron, or None when they can."""
    if spec.surrogate.kernel_id is None:
        return (f"its surrogate {spec.surrogate.name} is not one the fused kernels know, so the PyTorch path "
                "runs on every device")
    if family_id(spec) is None:
        return f"the fused kernels do not cover the {spec.family} family; the PyTorch path runs on every device"
    for k, v in (P if P is not None else spec.params).items():
        if isinstance(v, Tensor) and v.numel() != 1:
            return (f"its parameter {k!r} has {v.numel()} values (one per neuron); the fused kernels take one "
                    "value per parameter, so the PyTorch path runs on every device")
    return None


_warned = set()


def choose(x: Tensor, spec: NeuronSpec, P: Dict[str, Tensor]) -> str:
    """The backend ("triton" or "torch") a node's forward on ``x`` runs, under the setting."""
    mode = setting()
    if mode == "torch" or x.dtype not in (torch.float32, torch.float64):
        return "torch"
    on_device = x.device.type == "cuda" or (x.device.type == "cpu" and mode == "triton" and interpreting())
    if not on_device or unsupported(spec, P) is not None or not triton_available():
        if mode == "triton" and x.device.type != "meta":
            why = unsupported(spec, P) or ("triton does not import" if not triton_available() else
                                           f"{x.device.type} tensors run Triton kernels only under TRITON_INTERPRET=1")
            key = (spec.origin, why)
            if key not in _warned:
                _warned.add(key)
                warnings.warn(f"REVPASS_KERNELS=triton: {spec.origin} runs the PyTorch path: {why}", stacklevel=3)
        return "torch"
    return "triton"


#: the kernels' family ids (``FAM`` in revpass/nodes/kernels/neuron.py), by the form of the equations
LIF, LEAKY_SYNAPTIC, CURRENT_LIF, LIF_BOX = 0, 1, 2, 3
FAMILY_IDS = {"lif": LIF, "leaky_synaptic": LEAKY_SYNAPTIC, "current_lif": CURRENT_LIF, "lif_box": LIF_BOX}


def family_id(spec: NeuronSpec) -> Optional[int]:
    """The kernels' id of the spec's family (its form of equations), or None if not covered."""
    return FAMILY_IDS.get(family_of(spec).equations)


def reversible_forward(backend: str, spec: NeuronSpec, x: Tensor, state0, P: Dict[str, Tensor], need):
    """The reversible node's forward on ``backend`` ("triton" or "torch"): (Y, F's packed bits,
    the unpaired channel's kept tensors, final state)."""
    if backend == "triton":
        from revpass.nodes.kernels.reversible import forward
    else:
        from revpass.nodes.reversible import reversible_forward as forward
    return forward(spec, x, state0, P, need)


def exact_forward(backend: str, spec: NeuronSpec, x: Tensor, state0, P: Dict[str, Tensor], need):
    """The exact node's forward on ``backend``: (spikes, kept records (K, T, ...), final state)."""
    if backend == "triton":
        from revpass.nodes.kernels.exact import forward
    else:
        from revpass.nodes.exact import exact_forward as forward
    return forward(spec, x, state0, P, need)


def exact_backward(backend: str, spec: NeuronSpec, gs: Tensor, g_state, kept: Tensor, state0,
                   P: Dict[str, Tensor], need, min_elems: Optional[int] = None):
    """The exact node's backward on ``backend``: (input gradient, initial state's gradient or
    None, parameters' gradients by name)."""
    if backend == "triton":
        from revpass.nodes.kernels.exact import backward

        return backward(spec, gs, g_state, kept, state0, P, need)
    from revpass.nodes.exact import exact_backward as backward

    return backward(spec, gs, g_state, kept, state0, P, need, min_elems=min_elems)
