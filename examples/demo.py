"""revpass demo: a SpikingJelly spiking ResNet-18 from the model zoo, its LIF neurons replaced by
reversible nodes, and what training keeps for backward before and after.

Runs on the CPU in well under a minute; needs no download (random weights, random input).

    make demo            # or: .venv/bin/python examples/demo.py [--T 4] [--batch 2] [--size 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import revpass
from revpass.memory import saved_bytes


def build(T: int):
    from spikingjelly.activation_based import functional, neuron
    from spikingjelly.activation_based.model import spiking_resnet

    torch.manual_seed(0)
    net = spiking_resnet.spiking_resnet18(spiking_neuron=neuron.LIFNode, num_classes=10)
    functional.set_step_mode(net, "m")
    return net


def swap_neurons(net: nn.Module, node_cls) -> int:
    """Replace every SpikingJelly LIFNode by ``node_cls.from_neuron`` (revpass.convert, step 2 of
    the roadmap, finds them in the traced graph; this demo swaps modules by hand)."""
    from spikingjelly.activation_based import functional, neuron

    n = 0
    for name, m in list(net.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, neuron.LIFNode):
                path = f"{name}.{child_name}" if name else child_name
                setattr(m, child_name, node_cls.from_neuron(child, name=path))
                n += 1
    functional.invalidate_reset_cache(net)
    return n


def measure(net: nn.Module, x: torch.Tensor, label: str):
    from spikingjelly.activation_based import functional

    functional.reset_net(net)
    xs = x.unsqueeze(0).repeat(net.T, 1, 1, 1, 1)  # direct encoding: the image at every step
    exclude = [*net.parameters(), *net.buffers(), xs]
    t0 = time.perf_counter()
    out, rep = saved_bytes(lambda: net(xs).mean(0), exclude=exclude)
    out.sum().backward()
    dt = time.perf_counter() - t0
    print(f"  {label:<28} kept for backward: {rep.total / 2**20:8.2f} MiB   (forward+backward {dt:.2f} s)")
    return rep.total, out.detach()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args(argv)

    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    print(f"revpass {revpass.__version__}: SpikingJelly spiking_resnet18 (LIFNode, multi-step), "
          f"T={args.T}, input {tuple(x.shape)}\n")

    results = {}
    for label, cls in (("original (LIFNode)", None), ("exact nodes", revpass.ExactNode),
                       ("reversible nodes", revpass.ReversibleNode)):
        net = build(args.T)
        net.T = args.T
        if cls is not None:
            n = swap_neurons(net, cls)
            if label.startswith("exact"):
                print(f"  replaced {n} LIFNode modules\n")
        results[label] = measure(net, x, label)

    base, y0 = results["original (LIFNode)"]
    ex, y1 = results["exact nodes"]
    rv, _ = results["reversible nodes"]
    print()
    print(f"  exact mode output identical to the original: {torch.equal(y0, y1)}")
    print(f"  whole model, activations kept for backward: original / exact = {base / ex:.2f}x, "
          f"original / reversible = {base / rv:.2f}x")

    # one neuron site in isolation, as METHOD.md section 3 counts it
    from spikingjelly.activation_based import neuron

    lif = neuron.LIFNode(step_mode="m")
    xs = torch.randn(args.T, args.batch, 64, args.size // 4, args.size // 4, requires_grad=True) + 0.5
    _, lib = saved_bytes(lambda: lif(xs), exclude=[xs])
    node = revpass.ReversibleNode.from_neuron(lif, carry_state=False)
    _, rev = saved_bytes(lambda: node(xs), exclude=[xs], output_of=lambda y: [y])
    print(f"  one LIFNode site {tuple(xs.shape)}: library keeps {lib.total / 2**10:.0f} KiB, "
          f"reversible node {rev.total_without_output / 2**10:.1f} KiB beyond its output "
          f"({lib.total / rev.total_without_output:.0f}x less)")


if __name__ == "__main__":
    main()
