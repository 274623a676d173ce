"""revpass demo: convert a SpikingJelly spiking ResNet-18 from the model zoo, print the neuron
sites found, the memory plan, the gradient verification and the measured saving.

Runs on the CPU in well under a minute; needs no download (random weights, random input).

    make demo            # or: .venv/bin/python examples/demo.py [--T 4] [--batch 2] [--size 32]
"""

from __future__ import annotations

import argparse

import torch

import revpass


def build():
    from spikingjelly.activation_based import functional, neuron
    from spikingjelly.activation_based.model import spiking_resnet

    torch.manual_seed(0)
    net = spiking_resnet.spiking_resnet18(spiking_neuron=neuron.LIFNode, num_classes=10)
    functional.set_step_mode(net, "m")
    return net


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args(argv)

    net = build()
    img = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    x = img.unsqueeze(0).repeat(args.T, 1, 1, 1, 1)  # direct encoding: the image at every step
    print(f"revpass {revpass.__version__}: SpikingJelly spiking_resnet18 (LIFNode, multi-step), "
          f"input {tuple(x.shape)}\n")

    exact = revpass.convert(net, x, mode="exact")
    reversible = revpass.convert(net, x, mode="reversible")
    print(reversible.revpass_report, "\n")

    from revpass.planning.memory_plan import plan_of

    plan = plan_of(reversible, "reversible")
    print(str(plan).split("\n")[0])
    print("\n".join(str(plan).split("\n")[1:9]), "\n  ...\n")

    print(revpass.verify(net, exact, x).__str__().split("\n")[0])
    print(revpass.verify(net, reversible, x).__str__().split("\n")[0], "\n")

    with torch.no_grad():
        from revpass.state import reset_states

        reset_states(net)
        same = torch.equal(exact(x), net(x))
    ex_plan = plan_of(exact, "exact")
    print(f"exact mode: output identical to the original: {same}; keeps {ex_plan.kept_after / 2**20:.2f} MiB "
          f"for backward instead of {ex_plan.kept_before / 2**20:.2f} MiB ({ex_plan.ratio:.2f}x less)")
    print(f"reversible mode: keeps {plan.kept_after / 2**20:.2f} MiB instead of {plan.kept_before / 2**20:.2f} MiB "
          f"({plan.ratio:.2f}x less); the neurons themselves keep 1/64 of a float per element beyond "
          "their output")

    # the measured peak of one training step (MemTracker on the CPU: activations and temporaries)
    from revpass.memory import step_peak

    variants = {"original": net, "exact": exact, "reversible": reversible,
                "recompute": revpass.convert(net, x, mode="recompute"),
                "planner min": revpass.convert(net, x, budget="min"),
                # the planner keeping the original function: exact and recomputed sites only
                "exact, min": revpass.convert(net, x, mode="exact", budget="min")}
    peaks = {name: step_peak(m, x) for name, m in variants.items()}
    print("\nmeasured peak of a training step (MemTracker, activations and temporaries):")
    for name, p in peaks.items():
        print(f"  {name:<12} {p / 2**20:8.2f} MiB  ({peaks['original'] / p:.2f}x less than the original)")


if __name__ == "__main__":
    main()
