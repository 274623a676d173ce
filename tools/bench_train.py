"""Training speed through revpass.convert, side by side in one run (the CPU targets of the fused
kernels' issue):

1. a 4-layer Linear(512) + LIFNode(detach_reset=True) network, T=16, batch 64: the backward time
   of the model converted with backward="optimized", "recompute" and "autograd", and of the
   original (target: recompute / optimized >= 2);
2. spiking_resnet18 (T=4, batch 4, 32x32): training-step time and measured peak (MemTracker,
   activations and temporaries) of the original and the reversible conversion (targets: step
   time <= 1.25x the original's; peak ratio no more than 5% below the 2.96x that fine slices
   everywhere gave, i.e. >= 2.82x);
3. neuron-dominated small networks: the digits example's network (batch 64, 8x8, T=4) and
   SpikingJelly's parametric_lif_net.FashionMNISTNet at 8 channels (batch 16, 28x28, T=4):
   training-step time of the reversible conversion against the original (target <= 2.5x).

Each time is the median of --repeat runs after a warm-up, the variants interleaved run by run.
Writes bench_out/bench_train.{json,md}; targets are printed, not asserted.

    .venv/bin/python tools/bench_train.py [--repeat 15] [--out bench_out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]

import revpass  # noqa: E402
from revpass.memory import step_peak  # noqa: E402
from revpass.state import reset_states  # noqa: E402


def _mlp() -> nn.Module:
    from spikingjelly.activation_based import layer, neuron

    mods = []
    for _ in range(4):
        mods += [layer.Linear(512, 512, step_mode="m"), neuron.LIFNode(detach_reset=True, step_mode="m")]
    return nn.Sequential(*mods)


def _fmnist() -> nn.Module:
    from spikingjelly.activation_based import functional, neuron, surrogate
    from spikingjelly.activation_based.model import parametric_lif_net

    net = parametric_lif_net.FashionMNISTNet(channels=8, spiking_neuron=neuron.ParametricLIFNode,
                                             surrogate_function=surrogate.ATan(), detach_reset=True)
    functional.set_step_mode(net, "m")
    return net


def _digits() -> nn.Module:
    from train_digits import DigitsSNN

    return DigitsSNN()


def _backward_s(m: nn.Module, x: torch.Tensor) -> float:
    reset_states(m)
    m.zero_grad(set_to_none=True)
    y = m(x).sum()
    t0 = time.perf_counter()
    y.backward()
    return time.perf_counter() - t0


def _step_s(m: nn.Module, x: torch.Tensor) -> float:
    reset_states(m)
    m.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    m(x).float().sum().backward()
    return time.perf_counter() - t0


def _interleaved(models: Dict[str, nn.Module], x: torch.Tensor, timer: Callable, repeat: int) -> Dict[str, float]:
    runs: Dict[str, list] = {k: [] for k in models}
    for r in range(repeat + 1):
        for k, m in models.items():
            dt = timer(m, x)
            if r:
                runs[k].append(dt)
    return {k: statistics.median(v) for k, v in runs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    res: Dict[str, Dict] = {}

    net, x = _mlp(), torch.randn(16, 64, 512)
    models = {"original": net, **{b: revpass.convert(net, x, backward=b) for b in ("optimized", "recompute",
                                                                                    "autograd")}}
    t = _interleaved(models, x, _backward_s, a.repeat)
    res["mlp"] = {"backward_s": t, "recompute_over_optimized": t["recompute"] / t["optimized"]}
    print(f"mlp backward ms: {({k: round(v * 1e3, 1) for k, v in t.items()})}", file=sys.stderr)

    from models import sj_zoo

    net, x = sj_zoo("spiking_resnet18"), torch.randn(4, 4, 3, 32, 32)
    models = {"original": net, "reversible": revpass.convert(net, x)}
    t = _interleaved(models, x, _step_s, max(3, a.repeat // 3))
    peaks = {k: step_peak(m, x) for k, m in models.items()}
    res["spiking_resnet18"] = {"step_s": t, "peak_bytes": peaks, "time_ratio": t["reversible"] / t["original"],
                               "peak_ratio": peaks["original"] / peaks["reversible"],
                               "sliced": {n: m.slice_min_elems for n, m in models["reversible"].named_modules()
                                          if getattr(m, "slice_min_elems", None)}}
    print(f"resnet18: {res['spiking_resnet18']['time_ratio']:.2f}x time, "
          f"{res['spiking_resnet18']['peak_ratio']:.2f}x lower peak", file=sys.stderr)

    for name, make, x in (("digits", _digits, torch.rand(4, 64, 1, 8, 8)),
                          ("fashion_mnist_8ch", _fmnist, torch.rand(4, 16, 1, 28, 28))):
        net = make()
        models = {"original": net, "reversible": revpass.convert(net, x)}
        t = _interleaved(models, x, _step_s, a.repeat)
        res[name] = {"step_s": t, "time_ratio": t["reversible"] / t["original"]}
        print(f"{name}: {res[name]['time_ratio']:.2f}x time", file=sys.stderr)

    targets = [
        ("4-layer Linear(512) LIF MLP, T=16, batch 64: backward recompute / optimized >= 2x",
         res["mlp"]["recompute_over_optimized"], res["mlp"]["recompute_over_optimized"] >= 2),
        ("spiking_resnet18 reversible step time <= 1.25x the original's", res["spiking_resnet18"]["time_ratio"],
         res["spiking_resnet18"]["time_ratio"] <= 1.25),
        ("spiking_resnet18 reversible peak ratio >= 2.82x (2.96x less 5%)", res["spiking_resnet18"]["peak_ratio"],
         res["spiking_resnet18"]["peak_ratio"] >= 2.96 / 1.05),
        ("digits network: reversible step time <= 2.5x the original's", res["digits"]["time_ratio"],
         res["digits"]["time_ratio"] <= 2.5),
        ("FashionMNISTNet (8 channels): reversible step time <= 2.5x the original's",
         res["fashion_mnist_8ch"]["time_ratio"], res["fashion_mnist_8ch"]["time_ratio"] <= 2.5),
    ]
    md = ["# Training speed through convert (CPU)", "",
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {a.repeat} runs "
          f"(resnet18: {max(3, a.repeat // 3)}) after a warm-up, variants interleaved; "
          f"{time.strftime('%Y-%m-%dT%H:%M:%S')}.", "",
          "| model | figure | value |", "|---|---|---:|"]
    m = res["mlp"]["backward_s"]
    md += [f"| MLP | backward ms: original / optimized / recompute / autograd | {m['original'] * 1e3:.1f} / "
           f"{m['optimized'] * 1e3:.1f} / {m['recompute'] * 1e3:.1f} / {m['autograd'] * 1e3:.1f} |",
           f"| spiking_resnet18 | step ms: original / reversible | "
           f"{res['spiking_resnet18']['step_s']['original'] * 1e3:.0f} / "
           f"{res['spiking_resnet18']['step_s']['reversible'] * 1e3:.0f} |",
           f"| spiking_resnet18 | measured peak MiB: original / reversible | "
           f"{res['spiking_resnet18']['peak_bytes']['original'] / 2**20:.2f} / "
           f"{res['spiking_resnet18']['peak_bytes']['reversible'] / 2**20:.2f} |",
           f"| spiking_resnet18 | nodes given backward slices | {', '.join(res['spiking_resnet18']['sliced'])} |"]
    for name in ("digits", "fashion_mnist_8ch"):
        s = res[name]["step_s"]
        md.append(f"| {name} | step ms: original / reversible | {s['original'] * 1e3:.1f} / "
                  f"{s['reversible'] * 1e3:.1f} |")
    md += ["", "## Targets (reported, not asserted)", ""]
    md += [f"- {'PASS' if ok else 'MISS'} {what}: {value:.2f}x" for what, value, ok in targets]
    text = "\n".join(md) + "\n"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_train.json").write_text(json.dumps({"results": res, "targets": [
        {"target": w, "value": v, "pass": bool(ok)} for w, v, ok in targets]}, indent=1))
    (a.out / "bench_train.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
