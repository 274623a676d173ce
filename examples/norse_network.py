"""A norse network: SequentialState with multi-step LIF layers over a (T, B, ...) input.

    .venv/bin/python examples/norse_network.py [--quick] [--json]
"""

from __future__ import annotations

import argparse

import norse.torch as norse
import torch
from _common import emit, summarize
from torch import nn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T=8, 16 features (CI)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    T, F, H = (8, 16, 32) if a.quick else (50, 128, 256)
    torch.manual_seed(0)
    net = norse.SequentialState(nn.Linear(F, H), norse.LIF(), nn.Linear(H, H), norse.LIF(), nn.Linear(H, 10))
    x = torch.randn(T, 4, F) * 4 + 2      # norse integrates with dt/tau = 0.1: a strong input spikes
    result = summarize(net, x, show=not a.json)
    emit(result, a.json)
    return result


if __name__ == "__main__":
    main()
