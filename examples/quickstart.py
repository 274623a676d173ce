"""Quickstart: a spiking network from the SpikingJelly model zoo, converted three ways.

    .venv/bin/python examples/quickstart.py [--model spiking_resnet18|spiking_vgg11_bn] [--quick] [--json]
"""

from __future__ import annotations

import argparse

import torch
from _common import emit, summarize
from spikingjelly.activation_based import functional, neuron
from spikingjelly.activation_based.model import spiking_resnet, spiking_vgg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="spiking_resnet18", choices=("spiking_resnet18", "spiking_vgg11_bn"))
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="T=2, batch 1 (CI)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    T, B = (2, 1) if a.quick else (a.T, 4)
    factory = {"spiking_resnet18": spiking_resnet.spiking_resnet18, "spiking_vgg11_bn": spiking_vgg.spiking_vgg11_bn}
    torch.manual_seed(0)
    net = factory[a.model](spiking_neuron=neuron.LIFNode, num_classes=10)
    functional.set_step_mode(net, "m")              # multi-step: each neuron sees (T, B, ...)
    x = torch.randn(T, B, 3, 32, 32)
    result = summarize(net, x, modes=("reversible", "exact", "recompute"), show=not a.json)
    emit(result, a.json)
    return result


if __name__ == "__main__":
    main()
