"""Benchmark revpass's spiking nodes against the library neurons they replace.

For every supported neuron family and configuration (SpikingJelly LIFNode hard/soft/detached
reset, IFNode, ParametricLIFNode; snnTorch Leaky subtract/zero reset, Synaptic; norse LIF and
LIFBoxCell) and every T, on an input X of shape (T, B, C, H, W), it measures side by side:

1. bytes kept for backward (``revpass.memory.saved_bytes``: storage-deduplicated, the input X and
   the parameters excluded) by the library neuron, the exact node and the reversible node. The
   reversible node is reported with and without its output Y: Y is kept by its consumer (the next
   conv or linear layer) anyway, so it costs nothing extra in a network (docs/method.md section 3).
2. backward time of the reversible node with its three backwards (optimized, recompute,
   autograd): forward untimed, then ``y.backward(g)`` timed; and forward+backward time of the
   reversible node (optimized), the exact node and the library neuron. Each figure is the median
   of ``--repeat`` runs after one warm-up; the variants are interleaved run by run so that drift in
   the machine's speed hits them alike; on CUDA every timing is synchronized.
3. checks, from the same runs: the three reversible backwards give bit-identical forward outputs,
   their gradients agree (docs/method.md section 7's float32 tolerance, and the looser reconstruction
   bound that large inputs need), the exact node's spikes equal the library neuron's, and
   ``saved_bytes`` agrees with the bytes the graph still holds when the forward returns (it does
   not where a library saves tensors in graph branches it then drops, e.g. snnTorch's detached
   reset or norse's unused final state: those are listed in the report).

Where the Triton kernels can run (CUDA; or the CPU under TRITON_INTERPRET=1, where they are
checked, not timed meaningfully), the reversible and exact nodes run twice, with the PyTorch path
(REVPASS_KERNELS=torch, the variants above) and with the kernels ("reversible_triton",
"exact_triton"), timed and checked side by side. On CUDA, SpikingJelly's neurons run their own
Triton kernels (SJ_*_CUDA_IMPLEMENTATION=triton, set before SpikingJelly loads; ``--sj-impl``),
which is the baseline of the GPU targets: reversible forward+backward <= 1.25x and exact <= 1.1x
SpikingJelly's Triton neuron.

It writes ``<out>/bench_nodes.json`` (every raw figure, the configuration, versions, device,
date) and ``<out>/bench_nodes.md`` (the tables), prints the markdown to stdout and one progress
line per finished configuration to stderr, then evaluates the project's targets for every
SpikingJelly configuration and T (reversible keeps >= 64x fewer bytes than the library neuron,
output excluded; optimized backward >= 2x faster than recompute; reversible forward+backward
<= 1.5x the library neuron's) and prints PASS/MISS for each. Targets are reported, not asserted:
the script exits 0 whatever they say.

Run::

    .venv/bin/python tools/bench_nodes.py                 # (T, 16, 64, 16, 16), T in {4, 16}
    .venv/bin/python tools/bench_nodes.py --quick         # tiny shape, seconds (used by the tests)
    .venv/bin/python tools/bench_nodes.py --device cuda --T 4 16 64 --repeat 10
    .venv/bin/python tools/bench_nodes.py --only spikingjelly/LIFNode --out /tmp/bench
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import revpass
from revpass.memory import saved_bytes
from revpass.neurons import run_library

Tensor = torch.Tensor
Runner = Callable[[Tensor], Tensor]

BACKWARDS = ("optimized", "recompute", "autograd")
TARGET_MEMORY = 64.0  # library bytes / reversible bytes (output excluded), at least
TARGET_BACKWARD = 2.0  # recompute backward time / optimized backward time, at least
TARGET_FWD_BWD = 1.5  # reversible fwd+bwd time / library fwd+bwd time, at most
TARGET_TRITON_REV = 1.25  # on CUDA: reversible (Triton) fwd+bwd / SpikingJelly's Triton neuron, at most
TARGET_TRITON_EXACT = 1.1  # on CUDA: exact (Triton) fwd+bwd / SpikingJelly's Triton neuron, at most
TRITON_VARIANTS = ("reversible_triton", "exact_triton")
NOISY_SPREAD = 1.5  # slowest / fastest timed run above this: flagged in the report
INPUT_SCALE, INPUT_SHIFT = 1.0, 0.5  # X = randn * scale + shift: neurons fire a realistic fraction


# ---------------------------------------------------------------------------------------------
# the neuron configurations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeuronConfig:
    """One library neuron configuration: how to build it and how to run it over a sequence."""

    id: str  # "family/Constructor(args)": stable key in the JSON
    family: str  # "spikingjelly" | "snntorch" | "norse"
    make: Callable[[], nn.Module]
    runner: Callable[[nn.Module], Runner]  # library baseline: X (T, ...) -> spikes (T, ...)


def _library_runner(m: nn.Module) -> Runner:
    """The library neuron over a sequence from its reset state (revpass.neurons.run_library)."""

    def run(x: Tensor) -> Tensor:
        return run_library(m, x)

    return run


def _kwargs_repr(kwargs: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def neuron_configs() -> List[NeuronConfig]:
    """Every configuration of the issue, for the frameworks that import (others are skipped)."""
    configs: List[NeuronConfig] = []
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.script in SpikingJelly

    def add(
        family: str, cls: Callable[..., nn.Module], runner: Callable[[nn.Module], Runner], **kw: Any
    ) -> None:
        shown = {k: v for k, v in kw.items() if k != "step_mode"}
        name = cls.__name__ + (f"({_kwargs_repr(shown)})" if shown or family != "spikingjelly" else "")
        configs.append(NeuronConfig(f"{family}/{name}", family, lambda: cls(**kw), runner))

    try:
        from spikingjelly.activation_based import neuron as sj
    except ImportError as e:  # pragma: no cover - the Makefile installs all three
        print(f"bench_nodes: SpikingJelly not importable ({e}); skipping it", file=sys.stderr)
    else:
        add("spikingjelly", sj.LIFNode, _library_runner, step_mode="m")
        add("spikingjelly", sj.LIFNode, _library_runner, v_reset=None, step_mode="m")
        add("spikingjelly", sj.LIFNode, _library_runner, detach_reset=True, step_mode="m")
        add("spikingjelly", sj.IFNode, _library_runner, step_mode="m")
        add("spikingjelly", sj.ParametricLIFNode, _library_runner, step_mode="m")
    try:
        import snntorch as snn
    except ImportError as e:  # pragma: no cover
        print(f"bench_nodes: snnTorch not importable ({e}); skipping it", file=sys.stderr)
    else:
        add("snntorch", snn.Leaky, _library_runner, beta=0.9)
        add("snntorch", snn.Leaky, _library_runner, beta=0.9, reset_mechanism="zero")
        add("snntorch", snn.Synaptic, _library_runner, alpha=0.8, beta=0.9)
    try:
        import norse.torch as norse
    except ImportError as e:  # pragma: no cover
        print(f"bench_nodes: norse not importable ({e}); skipping it", file=sys.stderr)
    else:
        add("norse", norse.LIF, _library_runner)
        add("norse", norse.LIFBoxCell, _library_runner)
    return configs


@contextlib.contextmanager
def _kernels(backend: str):
    """REVPASS_KERNELS for one node call: the forward chooses, and its backward follows."""
    old = os.environ.get("REVPASS_KERNELS")
    os.environ["REVPASS_KERNELS"] = backend
    try:
        yield
    finally:
        if old is None:
            del os.environ["REVPASS_KERNELS"]
        else:
            os.environ["REVPASS_KERNELS"] = old


def _node_runner(node: nn.Module, backend: str = "torch") -> Runner:
    def run(x: Tensor) -> Tensor:
        node.reset()
        with _kernels(backend):
            return node(x)

    return run


def triton_runs(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device`` here (CUDA, or the CPU interpreter)."""
    from revpass.nodes import kernels

    return kernels.triton_available() and (device.type == "cuda" or kernels.interpreting())


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _zero_grads(x: Tensor, params: Sequence[Tensor]) -> None:
    x.grad = None
    for p in params:
        p.grad = None


def _tensors_of(m: nn.Module) -> List[Tensor]:
    return [*m.parameters(), *m.buffers()]


def _kept(run: Runner, x: Tensor, module: nn.Module) -> Tuple[Tensor, Dict[str, int]]:
    """Bytes ``run(x)`` keeps for backward, input and module tensors excluded."""
    y, rep = saved_bytes(lambda: run(x), exclude=[x, *_tensors_of(module)], output_of=lambda out: [out])
    return y.detach(), {
        "total": rep.total,
        "shared_with_output": rep.shared_with_output,
        "without_output": rep.total_without_output,
    }


CUDA_VARIANTS = ("library", "exact", "reversible_optimized")  # and the Triton variants, where they ran


def _cuda_peak(run: Runner, x: Tensor, g: Tensor, params: Sequence[Tensor]) -> Dict[str, int]:
    """On CUDA: bytes allocated above what existed before the forward (input, parameters, the
    incoming gradient): held at the end of the forward, and the peak over forward and backward
    (activations, backward temporaries and the input's gradient buffer)."""
    _zero_grads(x, params)
    torch.cuda.synchronize(x.device)
    base = torch.cuda.memory_allocated(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    y = run(x)
    torch.cuda.synchronize(x.device)
    after_forward = torch.cuda.memory_allocated(x.device) - base
    y.backward(g)
    torch.cuda.synchronize(x.device)
    peak = torch.cuda.max_memory_allocated(x.device) - base
    del y
    _zero_grads(x, params)
    return {"after_forward": after_forward, "peak_fwd_bwd": peak}


def _time_backward(run: Runner, x: Tensor, g: Tensor, params: Sequence[Tensor]) -> float:
    _zero_grads(x, params)
    y = run(x)
    _sync(x.device)
    t0 = time.perf_counter()
    y.backward(g)
    _sync(x.device)
    return time.perf_counter() - t0


def _time_fwd_bwd(run: Runner, x: Tensor, g: Tensor, params: Sequence[Tensor]) -> float:
    _zero_grads(x, params)
    _sync(x.device)
    t0 = time.perf_counter()
    y = run(x)
    y.backward(g)
    _sync(x.device)
    return time.perf_counter() - t0


def _grads(x: Tensor, params: Sequence[Tensor]) -> List[Optional[Tensor]]:
    return [None if t.grad is None else t.grad.detach().clone() for t in (x, *params)]


def _grad_agreement(grads: List[Optional[Tensor]], ref: List[Optional[Tensor]]) -> Dict[str, float]:
    """How far ``grads`` are from ``ref`` (input and parameter gradients), in three figures:

    - ``section7``: max |g - g_ref| / (1e-6 + 1e-5 |g_ref|), docs/method.md section 7's float32
      tolerance (<= 1 is within);
    - ``bound``: the same against 100x that tolerance (1e-4 + 1e-3 |g_ref|), and ``normwise``:
      ||g - g_ref|| / ||g_ref||: the float32 reconstruction bound (within: bound <= 1 and
      normwise <= 1e-5), which allows for the one rounding step per element that rebuilding X2 =
      Y2 - S^G costs (docs/method.md section 4.1).
    """
    out = {"section7": 0.0, "bound": 0.0, "normwise": 0.0}
    for g, r in zip(grads, ref):
        if g is None and r is None:
            continue
        if g is None or r is None:
            return {k: math.inf for k in out}
        err = (g - r).abs()
        out["section7"] = max(out["section7"], float((err / (1e-6 + 1e-5 * r.abs())).max()))
        out["bound"] = max(out["bound"], float((err / (1e-4 + 1e-3 * r.abs())).max()))
        out["normwise"] = max(out["normwise"], float((g - r).norm() / r.norm().clamp_min(1e-30)))
    return out


def _build(cfg: NeuronConfig, device: torch.device, triton: bool) -> Tuple[nn.Module, Dict[str, nn.Module]]:
    """The library neuron and the nodes made from it: reversible with each backward, exact, and,
    where the kernels run, the reversible and exact nodes again for them."""
    lib = cfg.make()
    nodes: Dict[str, nn.Module] = {
        f"reversible_{b}": revpass.ReversibleNode.from_neuron(lib, backward=b, step_mode="m")
        for b in BACKWARDS
    }
    nodes["exact"] = revpass.ExactNode.from_neuron(lib, backward="optimized", step_mode="m")
    if triton:
        nodes["reversible_triton"] = revpass.ReversibleNode.from_neuron(lib, step_mode="m")
        nodes["exact_triton"] = revpass.ExactNode.from_neuron(lib, step_mode="m")
    # converted on the CPU, then moved, as a model usually is; the parameters stay shared
    for m in (lib, *nodes.values()):
        m.to(device)
    shared = {id(p) for p in lib.parameters()}
    assert all(id(p) in shared for n in nodes.values() for p in n.parameters()), "parameters not shared"
    return lib, nodes


def _measure_times(
    runs: Dict[str, Runner], x: Tensor, g: Tensor, params: Sequence[Tensor], repeat: int
) -> Tuple[Dict[str, Dict[str, List[float]]], Dict[str, List[Optional[Tensor]]]]:
    """Raw timings {"backward"|"fwd_bwd": {variant: [seconds]}} and each backward's last gradients.
    The variants are interleaved run by run; the first round is the warm-up."""
    triton = [n for n in TRITON_VARIANTS if n in runs]
    plan: List[Tuple[str, str, Callable[[Runner, Tensor, Tensor, Sequence[Tensor]], float]]] = [
        ("backward", f"reversible_{b}", _time_backward) for b in BACKWARDS
    ] + [("backward", n, _time_backward) for n in triton[:1]] + [
        ("fwd_bwd", name, _time_fwd_bwd) for name in ("reversible_optimized", "exact", "library", *triton)]
    raw: Dict[str, Dict[str, List[float]]] = {"backward": {}, "fwd_bwd": {}}
    last_grads: Dict[str, List[Optional[Tensor]]] = {}
    for r in range(repeat + 1):
        for kind, name, timer in plan:
            dt = timer(runs[name], x, g, params)
            if r:
                raw[kind].setdefault(name, []).append(dt)
            if kind == "backward":
                last_grads[name] = _grads(x, params)
    return raw, last_grads


def _checks(outputs: Dict[str, Tensor], grads: Dict[str, List[Optional[Tensor]]]) -> Dict[str, Any]:
    ref = grads["reversible_autograd"]
    checks: Dict[str, Any] = {
        "reversible_forward_identical": all(
            torch.equal(outputs[f"reversible_{b}"], outputs["reversible_autograd"]) for b in BACKWARDS
        ),
        "grads_optimized_vs_autograd": _grad_agreement(grads["reversible_optimized"], ref),
        "grads_recompute_vs_autograd": _grad_agreement(grads["reversible_recompute"], ref),
        "exact_spikes_equal_library": torch.equal(outputs["exact"], outputs["library"]),
        "library_spike_rate": float(outputs["library"].float().mean()),
    }
    if "reversible_triton" in outputs:
        checks["triton_forward_identical"] = torch.equal(outputs["reversible_triton"],
                                                         outputs["reversible_optimized"])
        checks["exact_triton_spikes_equal_library"] = torch.equal(outputs["exact_triton"], outputs["library"])
        checks["grads_triton_vs_autograd"] = _grad_agreement(grads["reversible_triton"], ref)
    agree = (checks["grads_optimized_vs_autograd"], checks["grads_recompute_vs_autograd"])
    checks["grads_within_section7"] = all(a["section7"] <= 1 for a in agree)
    checks["grads_within_reconstruction_bound"] = all(
        a["bound"] <= 1 and a["normwise"] <= 1e-5 for a in agree
    )
    return checks


def bench_one(
    cfg: NeuronConfig, shape: Sequence[int], device: torch.device, repeat: int, seed: int
) -> Dict[str, Any]:
    """Every figure for one neuron configuration at one input shape."""
    torch.manual_seed(seed)
    triton = triton_runs(device)
    lib, nodes = _build(cfg, device, triton)
    params = [p for p in lib.parameters() if p.requires_grad]
    x = (torch.randn(*shape, device=device) * INPUT_SCALE + INPUT_SHIFT).requires_grad_(True)
    runs: Dict[str, Runner] = {"library": cfg.runner(lib), **{
        k: _node_runner(n, "triton" if k in TRITON_VARIANTS else "torch") for k, n in nodes.items()}}

    # bytes kept for backward, and the forward outputs for the checks
    kept: Dict[str, Dict[str, int]] = {}
    outputs: Dict[str, Tensor] = {}
    for name, run in runs.items():
        module = lib if name == "library" else nodes[name]
        outputs[name], kept[name] = _kept(run, x, module)
    lib_b, ex_b, rev = kept["library"]["total"], kept["exact"]["total"], kept["reversible_optimized"]

    g = torch.randn_like(outputs["library"])
    cuda_mem = (
        {n: _cuda_peak(runs[n], x, g, params) for n in (*CUDA_VARIANTS, *TRITON_VARIANTS) if n in runs}
        if device.type == "cuda"
        else None
    )
    raw, last_grads = _measure_times(runs, x, g, params, repeat)
    med = {kind: {name: statistics.median(v) for name, v in d.items()} for kind, d in raw.items()}
    bwd, fb = med["backward"], med["fwd_bwd"]

    return {
        "id": cfg.id,
        "family": cfg.family,
        "T": shape[0],
        "shape": list(shape),
        "input_bytes": x.numel() * x.element_size(),
        "bytes": {
            "library": lib_b,
            "exact": ex_b,
            "reversible": rev["total"],
            "reversible_without_output": rev["without_output"],
            "reversible_output_shared": rev["shared_with_output"],
            "detail": kept,
        },
        "ratios": {
            "library_over_reversible_without_output": _div(lib_b, rev["without_output"]),
            "library_over_reversible": _div(lib_b, rev["total"]),
            "library_over_exact": _div(lib_b, ex_b),
        },
        "time_s": {"backward": bwd, "fwd_bwd": fb, "raw": raw},
        "speed": {
            "recompute_over_optimized_backward": bwd["reversible_recompute"] / bwd["reversible_optimized"],
            "autograd_over_optimized_backward": bwd["reversible_autograd"] / bwd["reversible_optimized"],
            "reversible_over_library_fwd_bwd": fb["reversible_optimized"] / fb["library"],
            "exact_over_library_fwd_bwd": fb["exact"] / fb["library"],
            **({"triton_reversible_over_library_fwd_bwd": fb["reversible_triton"] / fb["library"],
                "triton_exact_over_library_fwd_bwd": fb["exact_triton"] / fb["library"],
                "torch_over_triton_reversible_fwd_bwd": fb["reversible_optimized"] / fb["reversible_triton"]}
               if triton else {}),
        },
        "checks": _checks(outputs, last_grads),
        "cuda_memory": cuda_mem,
    }


def _div(a: float, b: float) -> float:
    return a / b if b else math.inf


# ---------------------------------------------------------------------------------------------
# targets and reports
# ---------------------------------------------------------------------------------------------


def evaluate_targets(results: List[Dict[str, Any]], device: str = "cpu") -> List[Dict[str, Any]]:
    """The node targets, for every SpikingJelly configuration and T; on CUDA with the kernels,
    the GPU targets against SpikingJelly's Triton neuron too."""
    out = []
    for r in results:
        if r["family"] != "spikingjelly":
            continue
        sp = r["speed"]
        if device.startswith("cuda") and "triton_reversible_over_library_fwd_bwd" in sp:
            for name, key, goal in (
                ("fwd+bwd: reversible (Triton) / SpikingJelly Triton", "triton_reversible_over_library_fwd_bwd",
                 TARGET_TRITON_REV),
                ("fwd+bwd: exact (Triton) / SpikingJelly Triton", "triton_exact_over_library_fwd_bwd",
                 TARGET_TRITON_EXACT),
            ):
                out.append({"id": r["id"], "T": r["T"], "target": name, "goal": f"<= {goal:g}x", "value": sp[key],
                            "pass": bool(sp[key] <= goal)})
        for name, value, goal, ok in (
            (
                "memory: library / reversible (excl. Y)",
                r["ratios"]["library_over_reversible_without_output"],
                f">= {TARGET_MEMORY:g}x",
                r["ratios"]["library_over_reversible_without_output"] >= TARGET_MEMORY,
            ),
            (
                "backward: recompute / optimized",
                r["speed"]["recompute_over_optimized_backward"],
                f">= {TARGET_BACKWARD:g}x",
                r["speed"]["recompute_over_optimized_backward"] >= TARGET_BACKWARD,
            ),
            (
                "fwd+bwd: reversible / library",
                r["speed"]["reversible_over_library_fwd_bwd"],
                f"<= {TARGET_FWD_BWD:g}x",
                r["speed"]["reversible_over_library_fwd_bwd"] <= TARGET_FWD_BWD,
            ),
        ):
            out.append(
                {"id": r["id"], "T": r["T"], "target": name, "goal": goal, "value": value, "pass": bool(ok)}
            )
    return out


def _mib(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


def _bytes_cell(n: int, input_bytes: int) -> str:
    return f"{_mib(n)} ({n / input_bytes:.3g}x)"


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}" if s >= 0.01 else f"{s * 1e3:.2f}"


def _ratio(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.3g}x"


def render_markdown(
    meta: Dict[str, Any], results: List[Dict[str, Any]], targets: List[Dict[str, Any]]
) -> str:
    cfg = meta["config"]
    lines = [
        "# revpass node benchmark",
        "",
        f"Input X: (T, {cfg['batch']}, {cfg['channels']}, {cfg['hw']}, {cfg['hw']}) float32, "
        f"randn * {INPUT_SCALE:g} + {INPUT_SHIFT:g}; T in {cfg['T']}; device {meta['device']} "
        f"({meta['device_name']}); torch {meta['torch']}; median of {cfg['repeat']} runs after one "
        f"warm-up; {meta['date']}.",
        "",
        "## Bytes kept for backward",
        "",
        "| neuron | T | library | exact | reversible (incl. Y) | reversible (excl. Y) | "
        "library / reversible (excl. Y) | library / exact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        b, ib = r["bytes"], r["input_bytes"]
        lines.append(
            f"| {r['id']} | {r['T']} | {_bytes_cell(b['library'], ib)} | {_bytes_cell(b['exact'], ib)} | "
            f"{_bytes_cell(b['reversible'], ib)} | {_bytes_cell(b['reversible_without_output'], ib)} | "
            f"{_ratio(r['ratios']['library_over_reversible_without_output'])} | "
            f"{_ratio(r['ratios']['library_over_exact'])} |"
        )
    lines += [
        "",
        "Bytes are storage-deduplicated (`revpass.memory.saved_bytes`); the input X and the parameters "
        "are not counted (they exist anyway); (Nx) is the multiple of the input's bytes. "
        "\"excl. Y\" leaves out the reversible node's output Y, which it keeps for its reconstruction: "
        "Y's consumer (the next conv or linear layer) keeps Y anyway, so in a network the storage is "
        "shared and costs nothing extra (docs/method.md section 3); the library neuron's output is likewise "
        "kept by its consumer and is not in its figure either."
        + (
            f" C = {cfg['channels']} is odd: the reversible node pairs {cfg['channels'] - 1} channels "
            "and runs the unpaired one through the exact node (ReversibleNode.report)."
            if cfg["channels"] % 2
            else ""
        ),
        "",
        "## Time (ms)",
        "",
        "| neuron | T | bwd optimized | bwd recompute | bwd autograd | recompute / optimized | "
        "fwd+bwd reversible | fwd+bwd exact | fwd+bwd library | reversible / library | exact / library |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        bw, fb, sp = r["time_s"]["backward"], r["time_s"]["fwd_bwd"], r["speed"]
        lines.append(
            f"| {r['id']} | {r['T']} | {_ms(bw['reversible_optimized'])} | "
            f"{_ms(bw['reversible_recompute'])} | "
            f"{_ms(bw['reversible_autograd'])} | {_ratio(sp['recompute_over_optimized_backward'])} | "
            f"{_ms(fb['reversible_optimized'])} | {_ms(fb['exact'])} | {_ms(fb['library'])} | "
            f"{_ratio(sp['reversible_over_library_fwd_bwd'])} | {_ratio(sp['exact_over_library_fwd_bwd'])} |"
        )
    lines += [
        "",
        "bwd: the reversible node's backward alone (`y.backward(g)` after an untimed forward) with each "
        "of its three backward implementations. fwd+bwd: forward and backward together; reversible is "
        "the optimized backward. The library baseline for snnTorch and norse's LIFBoxCell is a Python "
        "loop over their single-step modules; SpikingJelly runs its own multi-step forward"
        + (
            " (on CUDA, SpikingJelly 2.0.0 dispatches it to its fused CUDA/Triton kernels: docs/method.md "
            "section 1's figures are its CPU path)."
            if meta["device"].startswith("cuda")
            else "."
        ),
        "",
    ]
    if any("reversible_triton" in r["time_s"]["fwd_bwd"] for r in results):
        lines += [
            "## The Triton kernels",
            "",
            "| neuron | T | bwd: PyTorch | bwd: Triton | fwd+bwd reversible: PyTorch | Triton | "
            "fwd+bwd exact: PyTorch | Triton | library | reversible Triton / library | exact Triton / library |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results:
            bw, fb, sp = r["time_s"]["backward"], r["time_s"]["fwd_bwd"], r["speed"]
            if "reversible_triton" not in fb:
                continue
            lines.append(
                f"| {r['id']} | {r['T']} | {_ms(bw['reversible_optimized'])} | {_ms(bw['reversible_triton'])} | "
                f"{_ms(fb['reversible_optimized'])} | {_ms(fb['reversible_triton'])} | {_ms(fb['exact'])} | "
                f"{_ms(fb['exact_triton'])} | {_ms(fb['library'])} | "
                f"{_ratio(sp['triton_reversible_over_library_fwd_bwd'])} | "
                f"{_ratio(sp['triton_exact_over_library_fwd_bwd'])} |"
            )
        lines += [
            "",
            "PyTorch: the nodes' PyTorch path (REVPASS_KERNELS=torch); Triton: revpass's fused kernels "
            "(one launch per node and direction). "
            + ("Under triton's CPU interpreter these times measure numpy, not the kernels: the rows "
               "check that the kernels run and agree." if not meta["device"].startswith("cuda") else
               "The library is SpikingJelly's own CUDA neuron (" + meta.get("sj_impl", "auto") + ")."),
            "",
        ]
    if any(r.get("cuda_memory") for r in results):
        lines += [
            "## CUDA memory (torch.cuda allocator)",
            "",
            "| neuron | T | held after forward: library | exact | reversible | "
            "peak fwd+bwd: library | exact | reversible | library / reversible (held) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results:
            m, ib = r["cuda_memory"], r["input_bytes"]
            lines.append(
                f"| {r['id']} | {r['T']} | "
                + " | ".join(_bytes_cell(m[n]["after_forward"], ib) for n in CUDA_VARIANTS)
                + " | "
                + " | ".join(_bytes_cell(m[n]["peak_fwd_bwd"], ib) for n in CUDA_VARIANTS)
                + f" | {_ratio(_div(m['library']['after_forward'], m['reversible_optimized']['after_forward']))} |"
            )
        lines += [
            "",
            "Bytes above what existed before the forward (input, parameters, incoming gradient). "
            "Held after forward includes each module's output (for the reversible node, Y is the "
            "output); the peak includes the backward's temporaries and the input's gradient buffer.",
            "",
        ]
    lines += ["## Checks", ""] + _checks_markdown(results)
    lines += ["", "## Targets (SpikingJelly configurations; reported, not asserted)", ""]
    for t in targets:
        lines.append(
            f"- {'PASS' if t['pass'] else 'MISS'} {t['id']} T={t['T']}: {t['target']} = "
            f"{t['value']:.{1 if t['value'] >= 10 else 3}f}x (target {t['goal']})"
        )
    if targets:
        lines += ["", f"{sum(t['pass'] for t in targets)}/{len(targets)} targets met."]
    else:
        lines.append("No SpikingJelly configuration ran: no target to evaluate.")
    return "\n".join(lines) + "\n"


def _checks_markdown(results: List[Dict[str, Any]]) -> List[str]:
    lines: List[str] = []
    broken = [
        r
        for r in results
        if not (r["checks"]["reversible_forward_identical"] and r["checks"]["exact_spikes_equal_library"])
    ]
    if not broken:
        lines.append(
            "- Outputs: the three reversible backwards' forward outputs are bit-identical and the exact "
            "node's spikes equal the library neuron's, in every configuration."
        )
    for r in broken:
        c = r["checks"]
        lines.append(
            f"- FAIL {r['id']} T={r['T']}: reversible outputs identical {c['reversible_forward_identical']}, "
            f"exact spikes equal library {c['exact_spikes_equal_library']}"
        )
    def figure(r: Dict[str, Any], key: str) -> float:
        c = r["checks"]
        return max(c["grads_optimized_vs_autograd"][key], c["grads_recompute_vs_autograd"][key])

    over = [r for r in results if not r["checks"]["grads_within_section7"]]
    beyond = [r for r in results if not r["checks"]["grads_within_reconstruction_bound"]]
    line = (
        "- Gradients (input and parameters) of the optimized and recompute backwards against the "
        "autograd backward, as max |g - g_ref| / (1e-6 + 1e-5 |g_ref|) (docs/method.md section 7's float32 "
        "tolerance, <= 1 is within): "
    )
    if not over:
        line += "within everywhere"
    else:
        line += "over 1 in " + ", ".join(f"{r['id']} T={r['T']} ({figure(r, 'section7'):.3g})" for r in over)
        line += (
            "; float32 rounding from rebuilding X2 = Y2 - S^G "
            "(docs/method.md, 'Accuracy of reconstruction'): "
            + (
                "all within the reconstruction bound (normwise <= 1e-5, elementwise <= 100x the tolerance)"
                if not beyond
                else "OUTSIDE the reconstruction bound (normwise <= 1e-5, elementwise <= 100x the "
                "tolerance) in " + ", ".join(f"{r['id']} T={r['T']}" for r in beyond)
            )
        )
    if results:
        line += f". Largest normwise relative error: {max(figure(r, 'normwise') for r in results):.2g}."
    lines.append(line)
    tri = [r for r in results if "triton_forward_identical" in r["checks"]]
    if tri:
        same = sum(r["checks"]["triton_forward_identical"] for r in tri)
        lib = sum(r["checks"]["exact_triton_spikes_equal_library"] for r in tri)
        worst7 = max(r["checks"]["grads_triton_vs_autograd"]["section7"] for r in tri)
        bound = all(r["checks"]["grads_triton_vs_autograd"]["bound"] <= 1
                    and r["checks"]["grads_triton_vs_autograd"]["normwise"] <= 1e-5 for r in tri)
        lines.append(
            f"- Triton kernels: the reversible node's forward is bit-identical to the PyTorch path's in "
            f"{same}/{len(tri)} configurations, the exact node's spikes equal the library neuron's in "
            f"{lib}/{len(tri)}; the reversible gradients against the autograd backward: worst "
            f"{worst7:.3g} of section 7's tolerance, {'all' if bound else 'NOT all'} within the "
            "reconstruction bound.")
    spreads = sorted(
        (
            (max(v) / min(v), f"{r['id']} T={r['T']} {kind} {name}")
            for r in results
            for kind, d in r["time_s"]["raw"].items()
            for name, v in d.items()
            if len(v) > 1 and min(v) > 0
        ),
        reverse=True,
    )
    noisy = [(x, what) for x, what in spreads if x > NOISY_SPREAD]
    if noisy:
        lines.append(
            f"- Timing spread (slowest / fastest timed run) over {NOISY_SPREAD:g}x in {len(noisy)} of "
            f"{len(spreads)} figures; the largest: "
            + ", ".join(f"{what} ({x:.2g}x)" for x, what in noisy[:5])
            + ". Medians resist a few slow runs; the raw runs are in the JSON."
        )
    return lines


def _progress(i: int, n: int, r: Dict[str, Any], seconds: float) -> None:
    sp = r["speed"]
    print(
        f"[{i}/{n}] {r['id']} T={r['T']}: library/reversible "
        f"{_ratio(r['ratios']['library_over_reversible_without_output'])}, backward recompute/optimized "
        f"{_ratio(sp['recompute_over_optimized_backward'])}, fwd+bwd reversible/library "
        f"{_ratio(sp['reversible_over_library_fwd_bwd'])} ({seconds:.1f} s)",
        file=sys.stderr,
        flush=True,
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f", {torch.get_num_threads()} threads"
    except OSError:
        pass
    return (platform.processor() or platform.machine()) + f", {torch.get_num_threads()} threads"


def _version(mod: str) -> Optional[str]:
    try:
        return getattr(importlib.import_module(mod), "__version__", None)
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=16, help="batch size B (default 16)")
    p.add_argument("--channels", type=int, default=64, help="channels C (default 64)")
    p.add_argument("--hw", type=int, default=16, help="height = width (default 16)")
    p.add_argument("--T", type=int, nargs="+", default=[4, 16], help="time steps (default 4 16)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per figure, after a warm-up (default 5)")
    p.add_argument("--quick", action="store_true", help="tiny run: (4, 2, 8, 4, 4), T=4, repeat 1")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default bench_out/)")
    p.add_argument(
        "--only", nargs="+", metavar="SUBSTR", help="only the configurations whose id contains one of these"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sj-impl", choices=("triton", "cuda", "torch", "auto"), default="triton",
                   help="on CUDA, SpikingJelly's neuron implementation (default triton: the baseline of the "
                        "GPU targets)")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.channels, a.hw, a.T, a.repeat = 2, 8, 4, [4], 1
    if a.repeat < 1 or min(a.T) < 1 or min(a.batch, a.channels, a.hw) < 1:
        p.error("--repeat, --T, --batch, --channels and --hw must be positive")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and args.sj_impl != "auto":  # read by SpikingJelly when it loads
        for op in ("LIF", "IF", "PLIF"):
            os.environ.setdefault(f"SJ_{op}_CUDA_IMPLEMENTATION", args.sj_impl)
    configs = neuron_configs()
    if args.only:
        configs = [c for c in configs if any(s in c.id for s in args.only)]
    jobs = [(c, T) for c in configs for T in args.T]
    results: List[Dict[str, Any]] = []
    started = time.perf_counter()
    for i, (cfg, T) in enumerate(jobs, 1):
        t0 = time.perf_counter()
        shape = (T, args.batch, args.channels, args.hw, args.hw)
        r = bench_one(cfg, shape, device, args.repeat, args.seed)
        results.append(r)
        _progress(i, len(jobs), r, time.perf_counter() - t0)
    targets = evaluate_targets(results, str(device))
    meta = {
        "config": {
            "batch": args.batch,
            "channels": args.channels,
            "hw": args.hw,
            "T": list(args.T),
            "repeat": args.repeat,
            "quick": args.quick,
            "seed": args.seed,
            "dtype": "float32",
            "input": f"randn * {INPUT_SCALE:g} + {INPUT_SHIFT:g}",
            "only": args.only,
        },
        "torch": torch.__version__,
        "versions": {m: _version(m) for m in ("revpass", "spikingjelly", "snntorch", "norse")},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": _device_name(device),
        "sj_impl": args.sj_impl if device.type == "cuda" else "cpu",
        "kernels": "triton and torch" if triton_runs(device) else "torch",
        "torch_threads": torch.get_num_threads(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "targets_spec": {
            "memory_min": TARGET_MEMORY,
            "backward_speedup_min": TARGET_BACKWARD,
            "fwd_bwd_ratio_max": TARGET_FWD_BWD,
        },
    }
    md = render_markdown(meta, results, targets)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_nodes.json").write_text(
        json.dumps({**meta, "results": results, "targets": targets}, indent=1, default=_json_default) + "\n"
    )
    (args.out / "bench_nodes.md").write_text(md)
    print(md, end="")
    print(f"wrote {args.out / 'bench_nodes.json'} and {args.out / 'bench_nodes.md'} "
          f"({meta['wall_s']:.0f} s)", file=sys.stderr)
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


if __name__ == "__main__":
    sys.exit(main())
