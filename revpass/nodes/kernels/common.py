"""What the kernels' host side shares: a neuron's constants as one small tensor, its options as
compile-time constants, its state tensors' slots, element windows and launching."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from revpass.neurons.spec import NeuronSpec, State
from revpass.nodes.kernels import family_id, interpreting

Tensor = torch.Tensor

#: elements per program: a GPU runs many small programs; the interpreter runs programs one at a
#: time in numpy, so fewer, larger ones. A multiple of 8 (programs write whole bytes of bits).
BLOCK_GPU = 256
BLOCK_INTERPRETER = 1024

_SJ_KINDS = {"lif": 0, "if": 1, "plif": 2, "beta": 3}
_SNN_RESETS = {"subtract": 0, "zero": 1, "none": 2}


def block() -> int:
    return BLOCK_INTERPRETER if interpreting() else BLOCK_GPU


def options(spec: NeuronSpec) -> Dict[str, int]:
    """The neuron's compile-time options (revpass/nodes/kernels/neuron.py)."""
    c = spec.consts
    fam = family_id(spec)
    o = dict(FAM=fam, KIND=0, RESET=0, DECAY=0, DETACH=0, DELAY=0, FIRE_GE=int(spec.surrogate.fires_at_zero),
             SURR=spec.surrogate.kernel_id)
    if fam == 0:
        o.update(KIND=_SJ_KINDS[c["kind"]], RESET=int(c["v_reset"] is None), DECAY=int(bool(c["decay_input"])),
                 DETACH=int(bool(c["detach_reset"])))
    elif fam == 1:
        o.update(KIND=int(c["kind"] == "synaptic"), RESET=_SNN_RESETS[c["reset"]], DELAY=int(bool(c["reset_delay"])))
    elif fam == 3:
        o.update(RESET=int(c["reset"] == "subtract"))
    return o


def slots(spec: NeuronSpec) -> Tuple[int, ...]:
    """Where each of the node's state tensors sits among the kernels' three state slots."""
    fam = family_id(spec)
    if fam == 1:
        return (0, 1, 2) if spec.consts["kind"] == "synaptic" else (1, 2)
    if fam == 2:
        return (0, 1)
    return (0,)


_CONST_CACHE: Dict[tuple, Tensor] = {}


def consts(spec: NeuronSpec, P: Dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """(c0, ..., c5) in the compute dtype (revpass/nodes/kernels/neuron.py says which is which),
    each rounded as the PyTorch path rounds it: a Python constant to the dtype, a parameter
    prepared with the same tensor operations (the family's ``prepare``) and then cast."""
    c = spec.consts
    alpha = spec.surrogate.key[1]
    fam = family_id(spec)
    vals: List[object]
    if fam == 0:
        kind = c["kind"]
        k = {"lif": c["tau"], "if": 1.0, "beta": c.get("beta")}.get(kind)
        if kind == "plif":
            with torch.no_grad():
                k = P["w"].sigmoid()
        vals = [k, c["v_threshold"], 0.0 if c["v_reset"] is None else c["v_reset"], 0.0, 0.0, alpha]
    elif fam == 1:
        with torch.no_grad():
            vals = [P["beta"].clamp(0, 1), P["threshold"], P["graded"],
                    P["alpha"].clamp(0, 1) if "alpha" in P else 0.0, 0.0, alpha]
    else:
        dt = c["dt"]
        with torch.no_grad():
            vals = [dt * P["tau_mem_inv"], (-dt * P["tau_syn_inv"]) if "tau_syn_inv" in P else 0.0,
                    P["v_leak"], P["v_th"], P["v_reset"], alpha]
    if not any(isinstance(v, Tensor) for v in vals):
        key = (tuple(vals), dtype, str(device))
        t = _CONST_CACHE.get(key)
        if t is None:
            t = _CONST_CACHE[key] = torch.tensor(vals, dtype=dtype, device=device)
        return t
    with torch.no_grad():
        return torch.stack([v.detach().reshape(()).to(device=device, dtype=dtype) if isinstance(v, Tensor)
                            else torch.tensor(v, dtype=dtype, device=device) for v in vals])


def state_slots(spec: NeuronSpec, state: Optional[State], like: Tensor) -> List[Tensor]:
    """The three state slots as contiguous (B, C, ...) tensors (``like`` where a slot is unused
    or no state is given: the kernel does not read it then)."""
    out = [like, like, like]
    if state is not None:
        for i, s in zip(slots(spec), state):
            out[i] = s.expand(like.shape).contiguous() if s.shape != like.shape else s.contiguous()
    return out


def new_state(spec: NeuronSpec, like: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
    """Fresh (B, C, ...) tensors for the node's states, and the three slots pointing at them."""
    states = [torch.empty_like(like) for _ in slots(spec)]
    out = [like, like, like]
    for i, s in zip(slots(spec), states):
        out[i] = s
    return states, out


def window(step_shape: Sequence[int], lo: int, width: int) -> Tuple[int, int, int, int]:
    """Elements n of channels [lo, lo + width) of a contiguous (B, C, S...) step, as the kernels
    address them: offset = b * CS + LO + (n - b * WS), b = n // WS. Returns (CS, LO, WS, NW)."""
    if len(step_shape) < 2:  # (B,): no channel dim
        n = int(step_shape[0]) if step_shape else 1
        return n, 0, n, n
    B, C = int(step_shape[0]), int(step_shape[1])
    S = 1
    for d in step_shape[2:]:
        S *= int(d)
    return C * S, lo * S, width * S, B * width * S


def grid(n: int, blk: int) -> Tuple[int]:
    return ((n + blk - 1) // blk,)


def launch(kernel, n: int, *args, **meta) -> None:
    """Run ``kernel`` over ``n`` elements, one program per block, rounding as PyTorch does."""
    if n == 0:
        return
    blk = block()
    kernel[grid(n, blk)](*args, BLOCK=blk, enable_fp_fusion=False, **meta)
