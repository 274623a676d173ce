"""snnTorch's tutorial network (tutorial 5: two Leaky layers stepped in a Python time loop),
converted: the T calls of the hidden neuron are rolled into one sequence node; the output neuron,
whose membrane the loss reads, is left as it is, with the reason.

    .venv/bin/python examples/snntorch_tutorial.py [--quick] [--json]
"""

from __future__ import annotations

import argparse

import snntorch as snn
import torch
from _common import emit, summarize
from torch import nn


class Net(nn.Module):
    def __init__(self, num_inputs=784, num_hidden=1000, num_outputs=10, beta=0.95, num_steps=25):
        super().__init__()
        self.num_steps = num_steps
        self.fc1 = nn.Linear(num_inputs, num_hidden)
        self.lif1 = snn.Leaky(beta=beta)
        self.fc2 = nn.Linear(num_hidden, num_outputs)
        self.lif2 = snn.Leaky(beta=beta)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        spk2_rec, mem2_rec = [], []
        for _step in range(self.num_steps):  # the tutorial's time loop
            cur1 = self.fc1(x)
            spk1, mem1 = self.lif1(cur1, mem1)
            cur2 = self.fc2(spk1)
            spk2, mem2 = self.lif2(cur2, mem2)
            spk2_rec.append(spk2)
            mem2_rec.append(mem2)
        return torch.stack(spk2_rec, dim=0), torch.stack(mem2_rec, dim=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small network, 6 steps (CI)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    net = Net(num_inputs=64, num_hidden=32, num_steps=6) if a.quick else Net()
    x = torch.rand(8 if a.quick else 128, net.fc1.in_features) * 2
    result = summarize(net, x, show=not a.json)
    emit(result, a.json)
    return result


if __name__ == "__main__":
    main()
