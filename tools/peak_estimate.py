"""The peak estimate (revpass.planning.peak.estimate_peak) against a measured peak, on the CPU or a GPU.

    python tools/peak_estimate.py [--device cpu|cuda] [--T 4 16] [--batch 4] [--models ...] [--out bench_out]

For spiking_resnet18, spiking_vgg11_bn and spiking_vgg16_bn (SpikingJelly zoo, 32x32) and the
snnTorch convolutional tutorial network: original, exact, reversible, recompute, planner "min"
and planner "min" with mode="exact",
converted on the device (the annotations measure what its kernels keep), the estimate of the
converted graph against the measured peak of one training step:

* cpu: revpass.memory.step_peak (MemTracker's peak less parameters, gradients, buffers and
  optimizer state; the nodes' kernels visible), what tests/test_plan.py holds within 10%;
* cuda: torch.cuda.max_memory_allocated over one step after a warm-up step, less what was
  allocated before it (parameters, buffers, the input) and the parameter gradients; it includes
  what the estimate does not model: cuDNN's convolution workspaces and the allocator's 512-byte
  rounding.

Prints a markdown table and writes it to OUT/peak_estimate_<device>.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import revpass  # noqa: E402
from revpass.memory import _loss, step_peak  # noqa: E402
from revpass.planning.peak import estimate_peak  # noqa: E402
from revpass.state import reset_states  # noqa: E402


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--T", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: 4 on the CPU, 16 on a GPU)")
    ap.add_argument("--models", nargs="+", default=None, help="a subset of the models")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)  # MODEL:T, its rows as JSON
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    batch = a.batch or (16 if dev.type == "cuda" else 4)
    if a.job:
        name, T = a.job.split(":")
        print(json.dumps(_rows(name, int(T), batch, dev)))
        return 0
    where = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU, MemTracker"
    lines = [f"# Peak estimate against a measured peak ({where}, torch {torch.__version__}, batch {batch})", "",
             "`python tools/peak_estimate.py --device " + dev.type + "`; snntorch_conv runs 4x the batch, "
             "as tools/bench_memory.py does.", "",
             "| model | T | variant | estimated | measured | estimate / measured | measured ratio |",
             "|---|---:|---|---:|---:|---:|---:|"]
    worst = 0.0
    for name in NETS:
        if a.models and name not in a.models:
            continue
        for T in a.T:
            # each model and T in a process of its own: what one leaves allocated does not pile up
            proc = subprocess.run([sys.executable, __file__, "--job", f"{name}:{T}", "--device", dev.type,
                                   "--batch", str(batch)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name} T={T}: FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}",
                      file=sys.stderr, flush=True)
                return 1
            rows = json.loads(proc.stdout.strip().splitlines()[-1])
            first = rows[0][2]
            for v, est, meas in rows:
                worst = max(worst, abs(est / meas - 1))
                lines.append(f"| {name} | {T} | {v} | {est / 2**20:.2f} MiB | {meas / 2**20:.2f} MiB | "
                             f"{est / meas:.2f} | {first / meas:.2f}x |")
                print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Largest disagreement: {100 * worst:.0f}%."]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"peak_estimate_{dev.type}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


VARIANTS = {"original": {"exclude": "*"}, "exact": {"mode": "exact"}, "reversible": {"mode": "reversible"},
            "recompute": {"mode": "recompute"}, "planner-min": {"budget": "min"},
            "exact-min": {"mode": "exact", "budget": "min"}}
NETS = ("spiking_resnet18", "spiking_vgg11_bn", "spiking_vgg16_bn", "snntorch_conv")


def _rows(name: str, T: int, batch: int, dev: torch.device):
    """[(variant, estimated bytes, measured bytes)] for one model at one T."""
    import models

    if name == "snntorch_conv":
        net, x = models.SnnTorchConv(num_steps=T, batch_size=batch * 4), torch.randn(batch * 4, 1, 28, 28) * 2
    else:
        net, x = models.sj_zoo(name), torch.randn(T, batch, 3, 32, 32)
    net, x = net.to(dev), x.to(dev)
    measure = cuda_peak if dev.type == "cuda" else step_peak
    rows = []
    for v, kw in VARIANTS.items():
        torch.manual_seed(0)
        gm = revpass.convert(net, x, **kw)  # annotated on the device: what its kernels keep
        rows.append((v, estimate_peak(gm), measure(gm, x)))
        del gm
        gc.collect()  # graph modules hold reference cycles: free each variant before the next
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
