"""The peak estimate against torch.cuda's measured peak, on a lent GPU (never part of CI).

    python tools/gpu_peak.py [--T 4 16] [--out bench_out]

For spiking_resnet18 and spiking_vgg11_bn (batch 16, 32x32), original, exact, reversible,
recompute and planner "min", converted on the GPU (the annotations measure what the CUDA kernels
keep): revpass.plan.estimate_peak of the converted graph against torch.cuda.max_memory_allocated over one
training step after a warm-up step, less what was allocated before it (parameters, buffers, the
input) and the parameter gradients. The measured figure includes what the estimate does not model:
cuDNN's convolution workspaces and the allocator's 512-byte rounding. Prints a markdown table and
writes it to OUT/gpu_peak.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import revpass  # noqa: E402
from revpass.memory import _loss  # noqa: E402
from revpass.plan import estimate_peak  # noqa: E402
from revpass.trace import reset_states  # noqa: E402


def cuda_peak(model, x) -> int:
    _loss(model(x)).backward()  # warm-up: the CUDA context, cuDNN handles and the allocator's pools
    reset_states(model)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _loss(model(x)).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    reset_states(model)
    return peak - grads


def main(argv=None) -> int:
    import models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    a = ap.parse_args(argv)
    variants = {"original": {"exclude": "*"}, "exact": {"mode": "exact"}, "reversible": {"mode": "reversible"},
                "recompute": {"mode": "recompute"}, "planner-min": {"budget": "min"}}
    lines = [f"# Peak estimate against torch.cuda ({torch.cuda.get_device_name(0)}, torch {torch.__version__})", "",
             "| model | T | variant | estimated | measured (torch.cuda) | estimate / measured | measured ratio |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for name in ("spiking_resnet18", "spiking_vgg11_bn"):
        for T in a.T:
            net = models.sj_zoo(name).cuda()
            x = torch.randn(T, a.batch, 3, 32, 32, device="cuda")
            first = None
            for v, kw in variants.items():
                gm = revpass.convert(net, x, **kw)  # annotated on the GPU: what CUDA kernels keep
                est = estimate_peak(gm)
                meas = cuda_peak(gm, x)
                first = first or meas
                lines.append(f"| {name} | {T} | {v} | {est / 2**20:.2f} MiB | {meas / 2**20:.2f} MiB | "
                             f"{est / meas:.2f} | {first / meas:.2f}x |")
                print(lines[-1], flush=True)
                del gm
                torch.cuda.empty_cache()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_peak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
