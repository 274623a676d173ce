"""Models nobody here wrote: the SpikingJelly zoo, the snnTorch tutorial networks, a norse
SequentialState model, and a hand-written LIF network; sized small for CPU tests."""

from __future__ import annotations

import os
import sys

import torch
from torch import nn
import torch.nn.functional as F


def sj_zoo(name: str):
    from spikingjelly.activation_based import functional, neuron
    from spikingjelly.activation_based.model import spiking_resnet, spiking_vgg

    torch.manual_seed(0)
    factory = {"spiking_resnet18": spiking_resnet.spiking_resnet18,
               "spiking_vgg11_bn": spiking_vgg.spiking_vgg11_bn,
               "spiking_vgg16_bn": spiking_vgg.spiking_vgg16_bn}[name]
    net = factory(spiking_neuron=neuron.LIFNode, num_classes=10)
    functional.set_step_mode(net, "m")
    return net


def sj_zoo_and_input(name: str, T: int, B: int):
    """A zoo network (:func:`sj_zoo`, seeded) and a (T, B, 3, 32, 32) input drawn after it."""
    net = sj_zoo(name)
    return net, torch.randn(T, B, 3, 32, 32)


# snnTorch tutorial 5: a fully connected network, explicit membrane (examples/snntorch_tutorial.py)
def SnnTorchFC(num_inputs=20, num_hidden=16, num_outputs=4, beta=0.95, num_steps=6):
    from snntorch_tutorial import Net

    return Net(num_inputs, num_hidden, num_outputs, beta, num_steps)


# snnTorch tutorial 6: a convolutional network, explicit membrane
class SnnTorchConv(nn.Module):
    def __init__(self, beta=0.5, num_steps=4, batch_size=2):
        super().__init__()
        import snntorch as snn
        from snntorch import surrogate

        spike_grad = surrogate.fast_sigmoid(slope=25)
        self.num_steps, self.batch_size = num_steps, batch_size
        self.conv1 = nn.Conv2d(1, 12, 5)
        self.lif1 = snn.Leaky(beta=beta, spike_grad=spike_grad)
        self.conv2 = nn.Conv2d(12, 64, 5)
        self.lif2 = snn.Leaky(beta=beta, spike_grad=spike_grad)
        self.fc1 = nn.Linear(64 * 4 * 4, 10)
        self.lif3 = snn.Leaky(beta=beta, spike_grad=spike_grad)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        mem3 = self.lif3.init_leaky()
        spk3_rec, mem3_rec = [], []
        for step in range(self.num_steps):
            cur1 = F.max_pool2d(self.conv1(x), 2)
            spk1, mem1 = self.lif1(cur1, mem1)
            cur2 = F.max_pool2d(self.conv2(spk1), 2)
            spk2, mem2 = self.lif2(cur2, mem2)
            cur3 = self.fc1(spk2.view(self.batch_size, -1))
            spk3, mem3 = self.lif3(cur3, mem3)
            spk3_rec.append(spk3)
            mem3_rec.append(mem3)
        return torch.stack(spk3_rec), torch.stack(mem3_rec)


def snntorch_init_hidden_conv(beta=0.5):
    """snnTorch tutorial 6's nn.Sequential with init_hidden=True (one time step per call)."""
    import snntorch as snn
    from snntorch import surrogate

    spike_grad = surrogate.fast_sigmoid(slope=25)
    return nn.Sequential(
        nn.Conv2d(1, 12, 5), nn.MaxPool2d(2), snn.Leaky(beta=beta, spike_grad=spike_grad, init_hidden=True),
        nn.Conv2d(12, 64, 5), nn.MaxPool2d(2), snn.Leaky(beta=beta, spike_grad=spike_grad, init_hidden=True),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 10),
        snn.Leaky(beta=beta, spike_grad=spike_grad, init_hidden=True, output=True),
    )


def snntorch_init_hidden_fc(beta=0.95):
    """snnTorch's fully connected network in the init_hidden=True style."""
    import snntorch as snn

    return nn.Sequential(
        nn.Linear(20, 16), snn.Leaky(beta=beta, init_hidden=True),
        nn.Linear(16, 4), snn.Leaky(beta=beta, init_hidden=True, output=True),
    )


class OverTime(nn.Module):
    """The tutorial's forward_pass loop, as a module: the same input at every step."""

    def __init__(self, net, num_steps=4):
        super().__init__()
        self.net, self.num_steps = net, num_steps

    def forward(self, x):
        spk_rec = []
        for step in range(self.num_steps):
            spk_out, mem_out = self.net(x)
            spk_rec.append(spk_out)
        return torch.stack(spk_rec)


def norse_sequential():
    import norse.torch as norse

    torch.manual_seed(0)
    return norse.SequentialState(nn.Linear(8, 6), norse.LIF(), nn.Linear(6, 2), norse.LIF())


class NorseCellLoop(nn.Module):
    """norse's documented single-step cell in a time loop."""

    def __init__(self, T=4):
        super().__init__()
        import norse.torch as norse

        self.T = T
        self.fc = nn.Linear(8, 6)
        self.cell = norse.LIFCell()
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        s = None
        outs = []
        for t in range(self.T):
            z, s = self.cell(self.fc(x[t]), s)
            outs.append(self.out(z))
        return torch.stack(outs)


# a user's own multi-step LIF (SpikingJelly-style hard reset, sigmoid surrogate) and its spike
# function: examples/custom_neuron.py (which registers it only when run); the examples folder is
# importable also where this file is loaded by path (the revpass command's tests)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from custom_neuron import MyLIF as HandLIF, Spike as _SigmoidSpike  # noqa: E402


class HandNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.sn1 = HandLIF()
        self.fc2 = nn.Linear(6, 4)
        self.sn2 = HandLIF(tau=3.0)

    def forward(self, x):
        return self.sn2(self.fc2(self.sn1(self.fc1(x))))


class RegisteredLIF(HandLIF):
    """The same neuron, registered with revpass (converted as kind a instead of by pattern)."""


class RegisteredHandNet(HandNet):
    def __init__(self):
        super().__init__()
        self.sn1, self.sn2 = RegisteredLIF(), RegisteredLIF(tau=3.0)


def register_hand_lif():
    import revpass

    revpass.register_neuron(
        RegisteredLIF,
        lambda m: revpass.lif_spec(tau=m.tau, v_threshold=m.v_threshold, v_reset=0.0, origin="HandLIF"),
    )


class SJSingleStepLoop(nn.Module):
    """SpikingJelly single-step neurons driven by a Python time loop, reset inside forward."""

    def __init__(self, T=4):
        super().__init__()
        from spikingjelly.activation_based import neuron

        self.T = T
        self.fc1 = nn.Linear(8, 6)
        self.sn1 = neuron.LIFNode()
        self.fc2 = nn.Linear(6, 3)
        self.sn2 = neuron.ParametricLIFNode()

    def forward(self, x):
        from spikingjelly.activation_based import functional

        functional.reset_net(self)
        out = []
        for t in range(self.T):
            out.append(self.sn2(self.fc2(self.sn1(self.fc1(x[t])))))
        return torch.stack(out)


class SnnTorchRecurrent(nn.Module):
    """snnTorch RLeaky feeds itself: its steps cannot be rolled into one sequence."""

    def __init__(self, T=4):
        super().__init__()
        import snntorch as snn

        self.T = T
        self.fc = nn.Linear(8, 6)
        self.rlif = snn.RLeaky(beta=0.9, linear_features=6)
        self.lif = snn.Leaky(beta=0.9)

    def forward(self, x):
        spk, mem = self.rlif.init_rleaky()
        mem2 = self.lif.init_leaky()
        out = []
        for t in range(self.T):
            spk, mem = self.rlif(self.fc(x[t]), spk, mem)
            s2, mem2 = self.lif(spk, mem2)
            out.append(s2)
        return torch.stack(out)


class SnnTorchStyleHandNet(nn.Module):
    """A hand-written snnTorch-style LIF inline in the model's time loop: mem = beta mem + cur,
    spike with the user's own autograd.Function, subtract reset."""

    def __init__(self, T=5, beta=0.9, threshold=1.0):
        super().__init__()
        self.T, self.beta, self.threshold = T, beta, threshold
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        mem = torch.zeros_like(self.fc1(x[0]))
        out = []
        for t in range(self.T):
            cur = self.fc1(x[t])
            mem = self.beta * mem + cur
            spk = _SigmoidSpike.apply(mem - self.threshold)
            mem = mem - spk * self.threshold
            out.append(self.fc2(spk))
        return torch.stack(out)


class LeakyLoop(nn.Module):
    """An snnTorch Leaky stepped in a loop of T steps behind a linear layer (one kind b site);
    ``seed`` fixes the layer's weights."""

    def __init__(self, T=3, seed=None, **kw):
        super().__init__()
        import snntorch as snn

        if seed is not None:
            torch.manual_seed(seed)
        self.T = T
        self.fc, self.lif = nn.Linear(4, 3), snn.Leaky(beta=0.5, **kw)

    def forward(self, x):
        mem, out = self.lif.init_leaky(), []
        for t in range(self.T):
            spk, mem = self.lif(self.fc(x[t]), mem)
            out.append(spk)
        return torch.stack(out)
