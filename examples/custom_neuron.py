"""Your own neuron, two ways: a module class registered with revpass.register_neuron, and a
LIF written inline in the model's forward, which revpass recognises from its operations.

    .venv/bin/python examples/custom_neuron.py [--quick] [--json]
"""

from __future__ import annotations

import argparse

import torch
from _common import emit, summarize
from torch import nn

import revpass


class Spike(torch.autograd.Function):
    """Heaviside forward, sigmoid-derivative backward (alpha = 4)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(4.0 * x)
        return g * 4.0 * s * (1 - s)


class MyLIF(nn.Module):
    """A multi-step LIF with hard reset: H = V + (X - V) / tau, S = H >= theta,
    V = S v_reset + (1 - S) H."""

    def __init__(self, tau=2.0, v_threshold=1.0, v_reset=0.0):
        super().__init__()
        self.tau, self.v_threshold, self.v_reset = tau, v_threshold, v_reset

    def forward(self, x_seq):
        v = torch.zeros_like(x_seq[0])
        out = []
        for x in x_seq:
            h = v + (x - v) / self.tau
            s = Spike.apply(h - self.v_threshold)
            v = s * self.v_reset + (1.0 - s) * h
            out.append(s)
        return torch.stack(out)


def register():
    """Tell revpass what MyLIF computes: the spec of a LIF with its constants (sigmoid surrogate,
    alpha 4, the default of lif_spec)."""
    revpass.register_neuron(MyLIF, lambda m: revpass.lif_spec(tau=m.tau, v_threshold=m.v_threshold,
                                                              v_reset=m.v_reset, origin="MyLIF"))


class RegisteredNet(nn.Module):
    def __init__(self, n=32):
        super().__init__()
        self.fc1, self.sn1 = nn.Linear(n, n), MyLIF()
        self.fc2, self.sn2 = nn.Linear(n, 10), MyLIF(tau=3.0)

    def forward(self, x):
        return self.sn2(self.fc2(self.sn1(self.fc1(x))))


class InlineNet(nn.Module):
    """The same neuron written inline, snnTorch style: mem = beta * mem + cur; subtract reset."""

    def __init__(self, n=32, beta=0.9):
        super().__init__()
        self.fc1, self.fc2, self.beta = nn.Linear(n, n), nn.Linear(n, 10), beta

    def forward(self, x_seq):
        mem = x_seq.new_zeros(x_seq.shape[1], self.fc1.out_features)  # (torch.zeros cannot take a traced shape)
        out = []
        for x in x_seq:
            mem = self.beta * mem + self.fc1(x)
            s = Spike.apply(mem - 1.0)
            mem = mem - s * 1.0
            out.append(s)
        return self.fc2(torch.stack(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T=6 (CI)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    T = 6 if a.quick else 32
    register()
    torch.manual_seed(0)
    x = torch.randn(T, 4, 32) + 0.5
    result = {"registered": summarize(RegisteredNet(), x, show=not a.json),
              "inline": summarize(InlineNet(), x, show=not a.json)}
    emit(result, a.json)
    return result


if __name__ == "__main__":
    main()
