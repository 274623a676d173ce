"""Train a spiking CNN on scikit-learn's digits (8x8 images, shipped inside scikit-learn: no
download): the original SpikingJelly network, its reversible conversion and its exact conversion,
with the same seeds, batches and epochs; prints test accuracy, bytes kept for backward and time
for each.

    .venv/bin/python examples/train_digits.py [--encoding direct|rate] [--epochs 15] [--T 4]
        [--seed 0] [--quick] [--json]

Direct encoding feeds the image at every step; rate encoding feeds Bernoulli spikes with the
pixel intensity as probability (drawn once, with a fixed seed). The reversible conversion changes
the network's function (each neuron's output is its input plus spikes), so it is trained from the
same initial weights as converted; the exact conversion is the original function with the
original's gradients (on the CPU bit for bit), so it trains to the same weights. ``--seed`` draws
other initial weights and another order of the batches (the data split stays the same).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Dict

import torch
from torch import nn

import revpass
from revpass.memory import kept_bytes, step_peak
from revpass.progress import Progress
from revpass.state import reset_states


def digits(encoding: str, T: int, limit: int = 0):
    """Train/test tensors (T, N, 1, 8, 8) and labels; a fixed split (the last 20% for test)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    if limit:
        x, y = x[:limit], y[:limit]
    if encoding == "direct":
        seq = x.unsqueeze(0).expand(T, *x.shape).contiguous()
    else:
        g = torch.Generator().manual_seed(1)
        seq = (torch.rand((T, *x.shape), generator=g) < x).float()
    n_test = len(y) // 5
    return (seq[:, :-n_test], y[:-n_test]), (seq[:, -n_test:], y[-n_test:])


class DigitsSNN(nn.Module):
    """conv-BN-LIF-pool, twice, then a linear readout averaged over time (multi-step SpikingJelly)."""

    def __init__(self, channels: int = 16):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron, surrogate

        c = channels
        self.features = nn.Sequential(
            layer.Conv2d(1, c, 3, padding=1, bias=False, step_mode="m"),
            layer.BatchNorm2d(c, step_mode="m"),
            neuron.LIFNode(surrogate_function=surrogate.ATan(), step_mode="m"),
            layer.MaxPool2d(2, step_mode="m"),
            layer.Conv2d(c, 2 * c, 3, padding=1, bias=False, step_mode="m"),
            layer.BatchNorm2d(2 * c, step_mode="m"),
            neuron.LIFNode(surrogate_function=surrogate.ATan(), step_mode="m"),
            layer.MaxPool2d(2, step_mode="m"),
        )
        self.fc = layer.Linear(2 * c * 4, 10, step_mode="m")

    def forward(self, x):
        h = self.features(x)
        return self.fc(h.flatten(2)).mean(0)  # (T, B, 10) -> (B, 10)


def train(model: nn.Module, data, epochs: int, batch: int, lr: float, bar: Progress, label: str,
          seed: int = 0) -> Dict:
    (xtr, ytr), (xte, yte) = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(ytr)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch + 1000 * seed))
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            reset_states(model)
            loss = nn.functional.cross_entropy(model(xtr[:, idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.step(f"{label}: epoch {epoch + 1}/{epochs}")
    seconds = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(yte), 256):
            reset_states(model)
            correct += int((model(xte[:, i:i + 256]).argmax(1) == yte[i:i + 256]).sum())
    model.train()
    reset_states(model)
    one = xtr[:, :batch].clone()  # a batch of its own: a slice would count the whole set's storage
    kept = kept_bytes(model, one)
    peak = step_peak(model, one)
    model.zero_grad(set_to_none=True)
    return {"accuracy": correct / len(yte), "kept_bytes": kept, "peak_bytes": peak, "train_s": seconds}


def main(argv=None) -> Dict[str, Dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoding", choices=("direct", "rate"), default="direct")
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="initial weights and order of the batches")
    ap.add_argument("--quick", action="store_true", help="reduced for CI: 5 epochs")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    a = ap.parse_args(argv)
    if a.quick:
        a.epochs = 5
    data = digits(a.encoding, a.T)
    print(f"digits ({a.encoding} encoding, T={a.T}): {len(data[0][1])} train, {len(data[1][1])} test images; "
          f"{a.epochs} epochs, batch {a.batch}", flush=True)
    torch.manual_seed(a.seed)
    original = DigitsSNN(a.channels)
    example = data[0][0][:, :a.batch]
    models = {
        "original": revpass.utils.safe_deepcopy(original),
        "reversible": revpass.convert(original, example),
        "exact": revpass.convert(original, example, mode="exact"),
        # the same exact nodes with the autograd backward (the reference the optimized one is tested against)
        "exact-autograd": revpass.convert(original, example, mode="exact", backward="autograd"),
        # the planner's least memory among strategies that keep the original function
        "exact-min": revpass.convert(original, example, mode="exact", budget="min"),
    }
    bar = Progress(a.epochs * len(models), enabled=not a.json)
    results = {}
    for name, model in models.items():
        torch.manual_seed(a.seed)  # same dropout-free training, same batches
        results[name] = train(model, data, a.epochs, a.batch, a.lr, bar, name, a.seed)
    bar.done()
    ref = models["original"].state_dict()
    for name, model in models.items():  # the trained weights themselves, bit for bit
        sd = model.state_dict()
        results[name]["weights_identical"] = sd.keys() == ref.keys() and all(
            torch.equal(v, ref[k]) for k, v in sd.items())
    base = results["original"]
    if a.json:
        print(json.dumps(results, indent=1))
        return results
    print(f"{'model':<15} {'test accuracy':>14} {'kept for backward':>18} {'train time':>11}")
    for name, r in results.items():
        print(f"{name:<15} {100 * r['accuracy']:>13.2f}% {r['kept_bytes'] / 2**10:>14.1f} KiB {r['train_s']:>10.1f}s"
              f"   ({base['kept_bytes'] / r['kept_bytes']:.2f}x less kept, {r['train_s'] / base['train_s']:.2f}x time)")
    gap = 100 * (results["reversible"]["accuracy"] - base["accuracy"])
    def same(name):
        r = results[name]
        acc = "identical" if r["accuracy"] == base["accuracy"] else "DIFFERENT"
        return f"{acc} accuracy, {'identical' if r['weights_identical'] else 'different'} trained weights"

    print(f"\nreversible - original: {gap:+.2f} percentage points (target: not more than 1 below)\n"
          f"exact vs original: {same('exact')} (target: identical)\n"
          f"exact-autograd vs original: {same('exact-autograd')}\n"
          f"exact-min vs original: {100 * (results['exact-min']['accuracy'] - base['accuracy']):+.2f} percentage "
          f"points (target: within 0.5), peak {base['peak_bytes'] / results['exact-min']['peak_bytes']:.2f}x lower "
          "(mode='exact', budget='min': the same forward, gradients within rounding)\n"
          "On the CPU the exact nodes' optimized backward repeats SpikingJelly's own backward op for op, "
          "so exact-mode training is the original's, bit for bit.")
    return results


if __name__ == "__main__":
    main()
