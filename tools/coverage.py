"""A coverage corpus: models of SpikingJelly 2.0.0, snnTorch 1.0.0, norse 1.1.0 and hand-written
neurons, built small and converted; one row per model in a table.

    .venv/bin/python tools/coverage.py [--quick] [--only NAME] [--planner] [--json PATH] [--md PATH]
                                       [--threads 1]

For each model: the neuron sites convert found, how many it converted in each mode (reversible,
exact) out of the sites of a supported family, whether the exact conversion's output equals the
original's (torch.equal, from the reset state, same seed), whether revpass.verify passes for
each mode, whether one training step (forward, sum, backward, SGD step) runs on each converted
model, and the time convert took; with --planner, the same checks of mode="recompute",
mode="exact" with budget="min", budget="min", and mode="exact" with a revpass.Peak budget of 0.8x
the estimated peak (met, or refused with the smallest figure) in a second table. A model whose build,
conversion or check raises is a row with the error's first line: the tool never stops on a
model. Neurons left unchanged are listed with their (shortened) reason, and neuron modules the
report does not list at all are named too.

Progress goes to stderr, one line per model; the table is printed and written as markdown
(--md; the full corpus writes docs/results/coverage_cpu.md, --quick and --only write
bench_out/coverage.md unless --md says otherwise) and, with --json, as JSON.
--quick runs a few small models across the frameworks (CI); --only NAME runs the models whose
name contains NAME (comma-separated for several); --list lists them. torch runs on one thread
unless --threads says otherwise; a model running past --model-timeout seconds is a row with that
error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import time
import traceback
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
T = 2  # time steps everywhere
MODES = ("reversible", "exact")
#: --planner: convert's other ways, each checked as the modes are (label: convert's keyword arguments);
#: the first two keep the original function, so their forward is compared with the original's bit for bit
PLANNED = {"recompute": {"mode": "recompute"}, "exact min": {"mode": "exact", "budget": "min"},
           "min": {"budget": "min"}, "exact peak": {"mode": "exact", "budget": "Peak(0.8 x the estimate before)"}}
KEEPS_FUNCTION = ("recompute", "exact min", "exact peak")
#: "exact peak": a revpass.Peak budget of this share of the model's estimated peak before conversion
#: (convert's revpass_peak_before): met by the conversion's estimate, or refused with BudgetError
PEAK_SHARE = 0.8

#: the neuron classes revpass converts (docs/frameworks/*.md), as the report's ``framework`` column
#: names them; hand-written neurons recognised from their operations (kind c) count as supported
SUPPORTED = {
    "spikingjelly.LIFNode", "spikingjelly.IFNode", "spikingjelly.ParametricLIFNode",
    "snntorch.Leaky", "snntorch.Synaptic",
    "norse.LIF", "norse.LIFCell", "norse.LIFBoxCell",
}


# ----------------------------------------------------------------------------------------------
# the corpus
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    framework: str  # spikingjelly | snntorch | norse | hand-written
    form: str  # how the model steps through time
    build: Optional[Callable[[], Tuple[nn.Module, tuple]]]  # -> (model, example inputs)
    quick: bool = False
    expect: Optional[int] = None  # neurons that are not modules (written inline): how many there are
    note: str = ""
    skip: str = ""  # why the model is listed but not built


def _seed(s: int = 0) -> torch.Generator:
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def _randn(*shape, scale=1.0, shift=0.0, s=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(s)) * scale + shift


# ---------------------------------------------------------------------------------- SpikingJelly


def _sj():
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    return functional, layer, neuron, surrogate


def _multi(net):
    functional = _sj()[0]
    functional.set_step_mode(net, "m")
    return net


class LoopOverT(nn.Module):
    """A single-step SpikingJelly network driven by a Python loop over T, reset first."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x_seq):
        from spikingjelly.activation_based import functional

        functional.reset_net(self.net)
        out = []
        for x in x_seq:
            out.append(self.net(x))
        return torch.stack(out)


def sj_spiking_resnet18(single_step=False):
    functional, layer, neuron, surrogate = _sj()
    from spikingjelly.activation_based.model import spiking_resnet

    _seed()
    net = spiking_resnet.spiking_resnet18(spiking_neuron=neuron.LIFNode, num_classes=10)
    x = _randn(T, 2, 3, 32, 32)
    return (LoopOverT(net), (x,)) if single_step else (_multi(net), (x,))


def sj_sew_resnet18(cnf, single_step=False, spiking_neuron="LIFNode"):
    functional, layer, neuron, surrogate = _sj()
    from spikingjelly.activation_based.model import sew_resnet

    _seed()
    net = sew_resnet.sew_resnet18(cnf=cnf, spiking_neuron=getattr(neuron, spiking_neuron), num_classes=10)
    x = _randn(T, 2, 3, 32, 32)
    return (LoopOverT(net), (x,)) if single_step else (_multi(net), (x,))


HIDDEN = 64  # the VGG classifiers' hidden width here (their constructors fix it at 4096)


def sj_spiking_vgg(bn: bool):
    """The zoo's SpikingVGG with a small feature config; its classifier (Linear, neuron, Dropout,
    Linear, neuron, Dropout, Linear: 512 x 7 x 7 -> 4096 -> 4096 -> 10, 120 M parameters, which
    the constructor does not let one change) with its linear layers narrowed to HIDDEN."""
    functional, layer, neuron, surrogate = _sj()
    from spikingjelly.activation_based.model import spiking_vgg

    _seed()
    cfg = [16, "M", 32, "M", 512]
    net = spiking_vgg.SpikingVGG(cfg, batch_norm=bn, num_classes=10,
                                 spiking_neuron=neuron.LIFNode if bn else neuron.IFNode,
                                 surrogate_function=surrogate.ATan())
    c = net.classifier
    c[0], c[3], c[6] = layer.Linear(512 * 7 * 7, HIDDEN), layer.Linear(HIDDEN, HIDDEN), layer.Linear(HIDDEN, 10)
    return _multi(net), (_randn(T, 2, 3, 16, 16),)


def sj_ms_resnet(cls="MSResNet"):
    from spikingjelly.activation_based.model import ms_resnet

    _seed()
    net = getattr(ms_resnet, cls)(T=T, num_classes=10, layers=(1, 1, 1, 1), base_channels=8)
    return _multi(net), (_randn(T, 2, 3, 32, 32),)


def sj_plif_net(cls, channels, shape):
    functional, layer, neuron, surrogate = _sj()
    from spikingjelly.activation_based.model import parametric_lif_net

    _seed()
    net = getattr(parametric_lif_net, cls)(channels=channels, spiking_neuron=neuron.ParametricLIFNode,
                                           surrogate_function=surrogate.ATan(), detach_reset=True)
    return _multi(net), (_randn(T, 2, *shape),)


def sj_spikformer():
    from spikingjelly.activation_based.model import spikformer

    _seed()
    net = spikformer.Spikformer(T=T, img_size_h=32, img_size_w=32, patch_size=4, num_classes=10, embed_dims=32,
                                num_heads=2, mlp_ratio=2, depths=1)
    return _multi(net), (_randn(T, 2, 3, 32, 32),)


def sj_sdt():
    from spikingjelly.activation_based.model import spike_driven_transformer

    _seed()
    net = spike_driven_transformer.SpikeDrivenTransformer(T=T, num_classes=10, embed_dims=32, num_heads=2, depths=1,
                                                          mlp_ratio=2)
    return _multi(net), (_randn(T, 2, 3, 32, 32),)


def sj_qkformer():
    from spikingjelly.activation_based.model import qkformer

    _seed()
    net = qkformer.QKFormer(T=T, num_classes=10, embed_dims=32, num_heads=(1, 2, 2), depths=(1, 1, 1), mlp_ratio=2)
    return _multi(net), (_randn(T, 2, 3, 32, 32),)


def sj_maxformer():
    from spikingjelly.activation_based.model import maxformer

    _seed()
    net = maxformer.MaxFormer(T=T, num_classes=10, embed_dims=32, depths=(1, 1, 1), mlp_ratio=2, cifar=True)
    return _multi(net), (_randn(T, 2, 3, 32, 32),)


def sj_masnn():
    from spikingjelly.activation_based.model import masnn

    _seed()
    net = masnn.MASNN(T=T, in_channels=2, num_classes=10, input_size=(16, 16), channels=(8, 8, 8), fc_hidden=16,
                      reduction_t=1, reduction_c=4)
    return _multi(net), (_randn(T, 2, 2, 16, 16),)


def sj_att_ms_resnet():
    from spikingjelly.activation_based.model import masnn

    _seed()
    net = masnn.AttMSResNet(T=T, num_classes=10, layers=(1, 1, 1, 1), base_channels=8, reduction_c=4)
    return _multi(net), (_randn(T, 2, 3, 32, 32),)


def sj_snas_net():
    """SNASNet: single-step neurons in the model's own loop over its ``timestep`` (input (B, C, H, W));
    the CIFAR-100 configuration (128 channels), a connection matrix using every operation."""
    from spikingjelly.activation_based.model import snas_net

    _seed()
    args = types.SimpleNamespace(timestep=T, second_avgpooling=4, dataset="cifar100", celltype="forward",
                                 threshold=1.0, tau=2.0)
    con_mat = torch.zeros(4, 4, dtype=torch.long)
    # edges (row -> col): 0->1 conv3x3, 0->2 skip, 1->2 conv1x1, 0->3 zero, 1->3 avgpool, 2->3 conv3x3
    con_mat[0, 1], con_mat[0, 2], con_mat[1, 2], con_mat[0, 3], con_mat[1, 3], con_mat[2, 3] = 3, 1, 2, 0, 4, 3
    net = snas_net.SNASNet(args, con_mat)
    return net, (_randn(1, 3, 32, 32),)


def sj_spike_dhs():
    """SpikeDHS: its channel counts are fixed by the classifier (576); time steps set to T."""
    from spikingjelly.activation_based.model import spike_dhs

    _seed()
    args = types.SimpleNamespace(fea_step=3, fea_num_layers=8, fea_block_multiplier=3, fea_filter_multiplier=48)
    net = spike_dhs.SpikeDHS(init_channels=3, args=args)
    net._time_step = T
    return _multi(net), (_randn(1, 3, 32, 32),)


def sj_ottt(spiking_neuron="OTTTLIFNode", single_step=False):
    """OTTTSpikingVGG (light classifier) with a small config; OTTT's own neuron is OTTTLIFNode,
    trained online: one step per call."""
    functional, layer, neuron, surrogate = _sj()
    from spikingjelly.activation_based.model import spiking_vggws_ottt

    _seed()
    net = spiking_vggws_ottt.OTTTSpikingVGG(cfg=[16, "M", 32, "A", 512], num_classes=10,
                                            spiking_neuron=getattr(neuron, spiking_neuron))
    x = _randn(T, 2, 3, 16, 16)
    return (LoopOverT(net), (x,)) if single_step else (_multi(net), (x,))


# --------------------------------------------------------------------------------------- snnTorch


def _snn():
    import snntorch as snn

    return snn


class SnnTorchFC(nn.Module):
    """snnTorch tutorial 5: two Leaky layers, explicit membrane, the time loop in forward."""

    def __init__(self, n_in=20, n_hidden=16, n_out=4, beta=0.95, num_steps=T):
        super().__init__()
        snn = _snn()
        self.num_steps = num_steps
        self.fc1, self.lif1 = nn.Linear(n_in, n_hidden), snn.Leaky(beta=beta)
        self.fc2, self.lif2 = nn.Linear(n_hidden, n_out), snn.Leaky(beta=beta)

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        spk2_rec, mem2_rec = [], []
        for _step in range(self.num_steps):
            spk1, mem1 = self.lif1(self.fc1(x), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spk2_rec.append(spk2)
            mem2_rec.append(mem2)
        return torch.stack(spk2_rec, dim=0), torch.stack(mem2_rec, dim=0)


class SnnTorchConv(nn.Module):
    """snnTorch tutorial 6: conv-pool-Leaky twice, then fc-Leaky; explicit membranes."""

    def __init__(self, beta=0.5, num_steps=T):
        super().__init__()
        snn = _snn()
        from snntorch import surrogate

        grad = surrogate.fast_sigmoid(slope=25)
        self.num_steps = num_steps
        self.conv1, self.lif1 = nn.Conv2d(1, 4, 5), snn.Leaky(beta=beta, spike_grad=grad)
        self.conv2, self.lif2 = nn.Conv2d(4, 8, 5), snn.Leaky(beta=beta, spike_grad=grad)
        self.fc1, self.lif3 = nn.Linear(8 * 4 * 4, 10), snn.Leaky(beta=beta, spike_grad=grad)

    def forward(self, x):
        mem1, mem2, mem3 = self.lif1.init_leaky(), self.lif2.init_leaky(), self.lif3.init_leaky()
        spk_rec, mem_rec = [], []
        for _step in range(self.num_steps):
            spk1, mem1 = self.lif1(nn.functional.max_pool2d(self.conv1(x), 2), mem1)
            spk2, mem2 = self.lif2(nn.functional.max_pool2d(self.conv2(spk1), 2), mem2)
            spk3, mem3 = self.lif3(self.fc1(spk2.flatten(1)), mem3)
            spk_rec.append(spk3)
            mem_rec.append(mem3)
        return torch.stack(spk_rec), torch.stack(mem_rec)


class SnnTorchSynapticFC(nn.Module):
    """snnTorch's Synaptic tutorial network: explicit (syn, mem)."""

    def __init__(self, n_in=20, n_hidden=16, n_out=4, alpha=0.9, beta=0.8, num_steps=T):
        super().__init__()
        snn = _snn()
        self.num_steps = num_steps
        self.fc1, self.lif1 = nn.Linear(n_in, n_hidden), snn.Synaptic(alpha=alpha, beta=beta)
        self.fc2, self.lif2 = nn.Linear(n_hidden, n_out), snn.Synaptic(alpha=alpha, beta=beta)

    def forward(self, x):
        syn1, mem1 = self.lif1.init_synaptic()
        syn2, mem2 = self.lif2.init_synaptic()
        spk_rec, mem_rec = [], []
        for _step in range(self.num_steps):
            spk1, syn1, mem1 = self.lif1(self.fc1(x), syn1, mem1)
            spk2, syn2, mem2 = self.lif2(self.fc2(spk1), syn2, mem2)
            spk_rec.append(spk2)
            mem_rec.append(mem2)
        return torch.stack(spk_rec), torch.stack(mem_rec)


def snntorch_sequential(num_steps=T):
    """snnTorch tutorial's nn.Sequential with init_hidden=True (one time step per call)."""
    snn = _snn()
    from snntorch import surrogate

    grad = surrogate.fast_sigmoid(slope=25)
    return nn.Sequential(
        nn.Conv2d(1, 4, 5), nn.MaxPool2d(2), snn.Leaky(beta=0.5, spike_grad=grad, init_hidden=True),
        nn.Conv2d(4, 8, 5), nn.MaxPool2d(2), snn.Leaky(beta=0.5, spike_grad=grad, init_hidden=True),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
        snn.Leaky(beta=0.5, spike_grad=grad, init_hidden=True, output=True),
    )


class SnnTorchStepped(nn.Module):
    """The tutorial's forward_pass: ``utils.reset(net)``, then the init_hidden=True nn.Sequential
    stepped once per time step."""

    def __init__(self, net: nn.Module, num_steps=T):
        super().__init__()
        self.net, self.num_steps = net, num_steps

    def forward(self, x):
        from snntorch import utils

        utils.reset(self.net)
        spk_rec = []
        for _step in range(self.num_steps):
            spk_out, _mem_out = self.net(x)
            spk_rec.append(spk_out)
        return torch.stack(spk_rec)


class SnnTorchOneClass(nn.Module):
    """fc -> neuron -> fc -> Leaky over T steps, the neuron of one snnTorch class with its own
    call convention and explicit state (snnTorch's documented form for that class)."""

    def __init__(self, kind: str, n_in=12, n=8, n_out=4, num_steps=T):
        super().__init__()
        snn = _snn()
        self.kind, self.num_steps = kind, num_steps
        self.fc1 = nn.Linear(n_in, n)
        self.fc2 = nn.Linear(n, n_out)
        self.out = snn.Leaky(beta=0.9)
        make = {
            "Leaky": lambda: snn.Leaky(beta=0.9),
            "Synaptic": lambda: snn.Synaptic(alpha=0.8, beta=0.9),
            "Alpha": lambda: snn.Alpha(alpha=0.9, beta=0.8),
            "Lapicque": lambda: snn.Lapicque(beta=0.9),
            "DeltaLeaky": lambda: snn.DeltaLeaky(beta=0.9),
            "RLeaky": lambda: snn.RLeaky(beta=0.9, linear_features=n),
            "RSynaptic": lambda: snn.RSynaptic(alpha=0.8, beta=0.9, linear_features=n),
            "SLSTM": lambda: snn.SLSTM(n, n),
            "LeakyParallel": lambda: snn.LeakyParallel(n, n, beta=0.9),
            "StateLeaky": lambda: snn.StateLeaky(beta=0.9, channels=n),
            "LinearLeaky": lambda: snn.LinearLeaky(beta=0.9, in_features=n, out_features=n),
            "AssociativeLeaky": lambda: snn.AssociativeLeaky(in_dim=n, d_value=2, d_key=4, num_spiking_neurons=n,
                                                             use_q_projection=False),
        }[kind]
        self.lif = make()

    def forward(self, x_seq):
        k, lif = self.kind, self.lif
        mem_out = self.out.init_leaky()
        cur = self.fc1(x_seq)
        if k in ("LeakyParallel", "StateLeaky", "LinearLeaky", "AssociativeLeaky"):  # whole sequence at once
            spk = lif(cur)
            spk = spk[0] if isinstance(spk, tuple) else spk
            steps = list(spk)
        else:
            state = {"Leaky": lambda: (lif.init_leaky(),), "DeltaLeaky": lambda: (lif.init_leaky(),),
                     "Lapicque": lambda: (lif.init_lapicque(),), "Synaptic": lambda: lif.init_synaptic(),
                     "Alpha": lambda: lif.init_alpha(), "RLeaky": lambda: lif.init_rleaky(),
                     "RSynaptic": lambda: lif.init_rsynaptic(), "SLSTM": lambda: lif.init_slstm()}[k]()
            state = state if isinstance(state, tuple) else (state,)
            steps = []
            for t in range(self.num_steps):
                if k in ("RLeaky", "RSynaptic"):  # (input, spk, *state) -> (spk, *state)
                    spk, *rest = lif(cur[t], *state)
                    state = (spk, *rest)
                else:
                    spk, *state = lif(cur[t], *state)
                steps.append(spk)
        out = []
        for s in steps:
            spk2, mem_out = self.out(self.fc2(s), mem_out)
            out.append(spk2)
        return torch.stack(out)


class SnnTorchConvLSTM(nn.Module):
    """SConv2dLSTM over T steps, explicit (syn, mem), then a Leaky readout."""

    def __init__(self, num_steps=T):
        super().__init__()
        snn = _snn()
        self.num_steps = num_steps
        self.lstm = snn.SConv2dLSTM(1, 4, 3, max_pool=2)
        self.fc = nn.Linear(4 * 4 * 4, 4)
        self.out = snn.Leaky(beta=0.9)

    def forward(self, x_seq):
        syn, mem = self.lstm.init_sconv2dlstm()
        mem_out = self.out.init_leaky()
        out = []
        for t in range(self.num_steps):
            spk, syn, mem = self.lstm(x_seq[t], syn, mem)
            spk2, mem_out = self.out(self.fc(spk.flatten(1)), mem_out)
            out.append(spk2)
        return torch.stack(out)


class SnnTorchLeakyVariants(nn.Module):
    """Leaky's settings in one network: zero reset, learnable beta and threshold, reset_delay=False,
    graded spikes; a Synaptic with reset_mechanism="none"."""

    def __init__(self, n_in=12, n=8, num_steps=T):
        super().__init__()
        snn = _snn()
        from snntorch import surrogate

        self.num_steps = num_steps
        self.fc = nn.ModuleList([nn.Linear(n_in, n)] + [nn.Linear(n, n) for _ in range(4)])
        self.lifs = nn.ModuleList([
            snn.Leaky(beta=0.8, reset_mechanism="zero", spike_grad=surrogate.fast_sigmoid()),
            snn.Leaky(beta=torch.full((n,), 0.7), learn_beta=True, learn_threshold=True),
            snn.Leaky(beta=0.9, reset_delay=False),
            snn.Leaky(beta=0.9, graded_spikes_factor=0.5),
            snn.Synaptic(alpha=0.7, beta=0.9, reset_mechanism="none"),
        ])
        self.synaptic = [False, False, False, False, True]

    def forward(self, x):
        states = [lif.init_synaptic() if syn else (lif.init_leaky(),) for lif, syn in zip(self.lifs, self.synaptic)]
        out = []
        for _step in range(self.num_steps):
            h = x
            for i, (fc, lif) in enumerate(zip(self.fc, self.lifs)):
                h, *st = lif(fc(h), *states[i])
                states[i] = tuple(st)
            out.append(h)
        return torch.stack(out)


# ------------------------------------------------------------------------------------------ norse


def norse_convnet(cls):
    from norse.torch.models import conv

    _seed()
    net = getattr(conv, cls)(num_channels=1, feature_size=28)
    return net, (_randn(T, 2, 1, 28, 28, scale=2.0),)


def norse_vgg():
    """norse's VGG with a small feature config (make_layers); its classifier's linear layers narrowed
    to HIDDEN as SpikingVGG's above."""
    from norse.torch.models import vgg
    from norse.torch.module.lift import Lift

    _seed()
    net = vgg.VGG(vgg.make_layers([8, "M", 16, "M", 512]), num_classes=10)
    c = net.classifier
    c[0], c[3], c[6] = (Lift(nn.Linear(512 * 7 * 7, HIDDEN)), Lift(nn.Linear(HIDDEN, HIDDEN)),
                        Lift(nn.Linear(HIDDEN, 10)))
    return net, (_randn(T, 2, 3, 16, 16, scale=4.0),)


def norse_mobilenet(residual=False):
    """MobileNetV2 at width 0.25, three blocks; with ``residual`` one of them keeps its input's shape
    (stride 1), so that it adds its input (norse 1.1.0's InvertedResidual adds the tuple its LIF
    returns: the original raises)."""
    from norse.torch.models import mobilenet

    _seed()
    first = [1, 16, 1, 1] if residual else [1, 16, 1, 2]
    net = mobilenet.MobileNetV2(num_classes=10, width_mult=0.25,
                                inverted_residual_setting=[first, [2, 24, 1, 2], [2, 32, 1, 2]])
    return net, (_randn(T, 2, 3, 32, 32, scale=4.0),)


def norse_sequential_lif():
    import norse.torch as norse

    _seed()
    net = norse.SequentialState(nn.Linear(8, 6), norse.LIF(), nn.Linear(6, 4), norse.LIF())
    return net, (_randn(T, 2, 8, scale=4.0, shift=2.0),)


class NorseStepped(nn.Module):
    """A SequentialState of single-step cells stepped in a Python loop with its state."""

    def __init__(self, seq: nn.Module):
        super().__init__()
        self.seq = seq

    def forward(self, x_seq):
        s = None
        out = []
        for x in x_seq:
            z, s = self.seq(x, s)
            out.append(z)
        return torch.stack(out)


def norse_sequential_lifbox():
    import norse.torch as norse
    from norse.torch.functional.lif_box import LIFBoxParameters
    from norse.torch.functional.reset import reset_subtract

    _seed()
    seq = norse.SequentialState(nn.Linear(8, 6), norse.LIFBoxCell(),
                                nn.Linear(6, 4), norse.LIFBoxCell(LIFBoxParameters(reset_method=reset_subtract)))
    return NorseStepped(seq), (_randn(T, 2, 8, scale=8.0, shift=4.0),)


class NorseCellLoop(nn.Module):
    """norse's documented single-step cell in a time loop."""

    def __init__(self):
        super().__init__()
        import norse.torch as norse

        self.fc1, self.cell1 = nn.Linear(8, 6), norse.LIFCell()
        self.fc2, self.cell2 = nn.Linear(6, 4), norse.LIFCell()

    def forward(self, x_seq):
        s1 = s2 = None
        out = []
        for t in range(x_seq.shape[0]):
            z, s1 = self.cell1(self.fc1(x_seq[t]), s1)
            z, s2 = self.cell2(self.fc2(z), s2)
            out.append(z)
        return torch.stack(out)


def norse_other_neurons():
    """norse's other multi-step neurons in one SequentialState (LIFAdEx, LIFEx, LSNN, Izhikevich,
    LIFRecurrent, LIFRefrac is cell-only in 1.1.0)."""
    import norse.torch as norse
    from norse.torch.functional.izhikevich import tonic_spiking

    _seed()
    net = norse.SequentialState(
        nn.Linear(8, 6), norse.LIFAdEx(), nn.Linear(6, 6), norse.LIFEx(), nn.Linear(6, 6), norse.LSNN(),
        nn.Linear(6, 6), norse.Izhikevich(tonic_spiking), nn.Linear(6, 6), norse.LIFRecurrent(6, 4))
    return net, (_randn(T, 2, 8, scale=4.0, shift=2.0),)


# ----------------------------------------------------------------------------------- hand-written


sys.path.insert(0, str(ROOT / "examples"))
from custom_neuron import MyLIF as HandLIF  # noqa: E402  (a multi-step LIF module, hard reset to 0)
from custom_neuron import Spike  # noqa: E402  (Heaviside forward, sigmoid-derivative backward, alpha 4)


class InlineNet(nn.Module):
    """Two layers, each neuron written inline in forward over ``for x in x_seq``:
    ``lif`` SpikingJelly-style LIF, hard reset; ``if`` IF, soft reset; ``plif`` a LIF whose decay
    sigmoid(w) is a learnable parameter, hard reset; ``snntorch`` mem = beta * mem + cur, subtract."""

    def __init__(self, kind: str, n_in=8, n=6, n_out=4, tau=2.0):
        super().__init__()
        self.kind, self.tau = kind, tau
        self.fc1, self.fc2 = nn.Linear(n_in, n), nn.Linear(n, n_out)
        if kind == "plif":
            self.w1 = nn.Parameter(torch.tensor(0.0))
            self.w2 = nn.Parameter(torch.tensor(-0.5))

    def _charge(self, v, x, i):
        if self.kind == "lif":
            return v + (x - v) / self.tau
        if self.kind == "if":
            return v + x
        if self.kind == "plif":
            return v + (x - v) * torch.sigmoid(self.w1 if i == 1 else self.w2)
        return 0.9 * v + x  # snntorch style

    def _reset(self, h, s):
        if self.kind in ("lif", "plif"):
            return s * 0.0 + (1.0 - s) * h
        return h - s * 1.0

    def forward(self, x_seq):
        v1 = x_seq.new_zeros(x_seq.shape[1], self.fc1.out_features)
        v2 = x_seq.new_zeros(x_seq.shape[1], self.fc2.out_features)
        out = []
        for x in x_seq:
            h1 = self._charge(v1, self.fc1(x), 1)
            s1 = Spike.apply(h1 - 1.0)
            v1 = self._reset(h1, s1)
            h2 = self._charge(v2, self.fc2(s1), 2)
            s2 = Spike.apply(h2 - 1.0)
            v2 = self._reset(h2, s2)
            out.append(s2)
        return torch.stack(out)


class HandIF(nn.Module):
    """A multi-step IF module of one's own (soft reset)."""

    def __init__(self, v_threshold=1.0):
        super().__init__()
        self.v_threshold = v_threshold

    def forward(self, x_seq):
        v = torch.zeros_like(x_seq[0])
        out = []
        for x in x_seq:
            h = v + x
            s = Spike.apply(h - self.v_threshold)
            v = h - s * self.v_threshold
            out.append(s)
        return torch.stack(out)


class HandPLIF(nn.Module):
    """A multi-step PLIF module of one's own: the decay sigmoid(w) is learnable."""

    def __init__(self, init_tau=2.0, v_threshold=1.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))
        self.v_threshold = v_threshold

    def forward(self, x_seq):
        v = torch.zeros_like(x_seq[0])
        out = []
        for x in x_seq:
            h = v + (x - v) * self.w.sigmoid()
            s = Spike.apply(h - self.v_threshold)
            v = (1.0 - s) * h
            out.append(s)
        return torch.stack(out)


class RegisteredLIF(HandLIF):
    """HandLIF registered with revpass.register_neuron (converted as a module, kind a)."""


def _register_lif():
    import revpass

    revpass.register_neuron(RegisteredLIF, lambda m: revpass.lif_spec(tau=m.tau, v_threshold=m.v_threshold,
                                                                      v_reset=0.0, origin="RegisteredLIF"))


class ModuleNet(nn.Module):
    def __init__(self, neuron_cls, n_in=8, n=6, n_out=4):
        super().__init__()
        self.fc1, self.sn1 = nn.Linear(n_in, n), neuron_cls()
        self.fc2, self.sn2 = nn.Linear(n, n_out), neuron_cls()

    def forward(self, x_seq):
        return self.sn2(self.fc2(self.sn1(self.fc1(x_seq))))


def hand(kind):
    _seed()
    x = (_randn(T, 2, 8, scale=1.0, shift=0.8),)
    if kind.startswith("inline_"):
        return InlineNet(kind[len("inline_"):]), x
    if kind == "registered_lif":
        _register_lif()
        return ModuleNet(RegisteredLIF), x
    return ModuleNet({"module_lif": HandLIF, "module_if": HandIF, "module_plif": HandPLIF}[kind]), x


# ------------------------------------------------------------------------------------- the cases


CASES: List[Case] = [
    # SpikingJelly zoo, multi-step
    Case("sj.spiking_resnet18", "spikingjelly", "multi-step", sj_spiking_resnet18, note="LIFNode, 32x32"),
    Case("sj.sew_resnet18_add", "spikingjelly", "multi-step", lambda: sj_sew_resnet18("ADD"), note="cnf ADD, LIFNode"),
    Case("sj.sew_resnet18_and", "spikingjelly", "multi-step", lambda: sj_sew_resnet18("AND", spiking_neuron="IFNode"),
         note="cnf AND, IFNode"),
    Case("sj.sew_resnet18_iand", "spikingjelly", "multi-step",
         lambda: sj_sew_resnet18("IAND", spiking_neuron="ParametricLIFNode"), note="cnf IAND, ParametricLIFNode"),
    Case("sj.spiking_vgg", "spikingjelly", "multi-step", lambda: sj_spiking_vgg(False),
         note="SpikingVGG cfg [16,M,32,M,512], no BN, IFNode, classifier 64 wide"),
    Case("sj.spiking_vgg_bn", "spikingjelly", "multi-step", lambda: sj_spiking_vgg(True),
         note="SpikingVGG cfg [16,M,32,M,512], BN, LIFNode, classifier 64 wide"),
    Case("sj.ms_resnet", "spikingjelly", "multi-step", sj_ms_resnet, note="MSResNet layers (1,1,1,1), 8 channels"),
    Case("sj.max_resnet", "spikingjelly", "multi-step", lambda: sj_ms_resnet("MaxResNet"),
         note="MaxResNet layers (1,1,1,1), 8 channels"),
    Case("sj.plif_net.mnist", "spikingjelly", "multi-step", lambda: sj_plif_net("MNISTNet", 8, (1, 28, 28)),
         note="parametric_lif_net, 8 channels", quick=True),
    Case("sj.plif_net.fashion_mnist", "spikingjelly", "multi-step",
         lambda: sj_plif_net("FashionMNISTNet", 8, (1, 28, 28)), note="8 channels"),
    Case("sj.plif_net.nmnist", "spikingjelly", "multi-step", lambda: sj_plif_net("NMNISTNet", 8, (2, 34, 34)),
         note="8 channels"),
    Case("sj.plif_net.cifar10", "spikingjelly", "multi-step", lambda: sj_plif_net("CIFAR10Net", 8, (3, 32, 32)),
         note="8 channels"),
    Case("sj.plif_net.cifar10_dvs", "spikingjelly", "multi-step",
         lambda: sj_plif_net("CIFAR10DVSNet", 4, (2, 128, 128)), note="4 channels, 128x128"),
    Case("sj.plif_net.dvs_gesture", "spikingjelly", "multi-step",
         lambda: sj_plif_net("DVSGestureNet", 4, (2, 128, 128)), note="4 channels, 128x128"),
    Case("sj.spikformer", "spikingjelly", "multi-step", sj_spikformer, note="dim 32, depth 1, patch 4"),
    Case("sj.spike_driven_transformer", "spikingjelly", "multi-step", sj_sdt, note="dim 32, depth 1"),
    Case("sj.qkformer", "spikingjelly", "multi-step", sj_qkformer, note="dim 32, depths (1,1,1)"),
    Case("sj.maxformer", "spikingjelly", "multi-step", sj_maxformer, note="cifar, dim 32, depths (1,1,1)"),
    Case("sj.masnn", "spikingjelly", "multi-step", sj_masnn, note="MASNN 8 channels, 16x16"),
    Case("sj.att_ms_resnet", "spikingjelly", "multi-step", sj_att_ms_resnet,
         note="AttMSResNet layers (1,1,1,1), 8 channels"),
    Case("sj.snas_net", "spikingjelly", "single-step, own loop", sj_snas_net,
         note="CIFAR-100 config (128 channels fixed), input (B,C,H,W)"),
    Case("sj.spike_dhs", "spikingjelly", "multi-step", sj_spike_dhs, note="channels fixed (144-576), 32x32, B=1"),
    Case("sj.ottt_vgg", "spikingjelly", "multi-step", sj_ottt, note="OTTTSpikingVGG small cfg, OTTTLIFNode"),
    Case("sj.ottt_vgg_lif", "spikingjelly", "multi-step", lambda: sj_ottt("LIFNode"),
         note="OTTTSpikingVGG small cfg, LIFNode"),
    Case("sj.loop.ottt_vgg", "spikingjelly", "single-step, loop over T", lambda: sj_ottt(single_step=True),
         note="OTTTSpikingVGG small cfg, OTTTLIFNode, reset_net in forward"),
    # SpikingJelly, single-step driven by a Python loop over T
    Case("sj.loop.spiking_resnet18", "spikingjelly", "single-step, loop over T", lambda: sj_spiking_resnet18(True),
         note="LIFNode, reset_net in forward"),
    Case("sj.loop.sew_resnet18_add", "spikingjelly", "single-step, loop over T",
         lambda: sj_sew_resnet18("ADD", single_step=True), note="cnf ADD, LIFNode, reset_net in forward"),
    # snnTorch
    Case("snntorch.tutorial_fc", "snntorch", "loop, explicit mem", lambda: (SnnTorchFC(), (_randn(2, 20, scale=2.0),)),
         quick=True, note="tutorial 5"),
    Case("snntorch.tutorial_conv", "snntorch", "loop, explicit mem",
         lambda: (SnnTorchConv(), (_randn(2, 1, 28, 28, scale=2.0),)), note="tutorial 6, 4/8 channels"),
    Case("snntorch.tutorial_synaptic", "snntorch", "loop, explicit syn/mem",
         lambda: (SnnTorchSynapticFC(), (_randn(2, 20, scale=2.0),))),
    Case("snntorch.sequential_init_hidden", "snntorch", "one step per call",
         lambda: (snntorch_sequential(), (_randn(2, 1, 28, 28, scale=2.0),)), note="init_hidden=True nn.Sequential"),
    Case("snntorch.sequential_stepped", "snntorch", "loop, utils.reset",
         lambda: (SnnTorchStepped(snntorch_sequential()), (_randn(2, 1, 28, 28, scale=2.0),)),
         note="the init_hidden nn.Sequential stepped after utils.reset"),
    Case("snntorch.leaky_variants", "snntorch", "loop, explicit state",
         lambda: (SnnTorchLeakyVariants(), (_randn(2, 12, scale=2.0),))),
] + [
    Case(f"snntorch.class.{k}", "snntorch", "sequence at once" if k in ("LeakyParallel", "StateLeaky", "LinearLeaky",
                                                                      "AssociativeLeaky") else "loop, explicit state",
         (lambda k=k: (SnnTorchOneClass(k), (_randn(T, 2, 12, scale=2.0),))), note=f"{k}, then a Leaky readout",
         quick=k == "Alpha")
    for k in ("Leaky", "Synaptic", "Alpha", "Lapicque", "DeltaLeaky", "RLeaky", "RSynaptic", "SLSTM",
              "LeakyParallel", "StateLeaky", "LinearLeaky", "AssociativeLeaky")
] + [
    Case("snntorch.class.SConv2dLSTM", "snntorch", "loop, explicit state",
         lambda: (SnnTorchConvLSTM(), (_randn(T, 2, 1, 8, 8, scale=2.0),)), note="SConv2dLSTM, then a Leaky readout"),
    # norse
    Case("norse.conv.ConvNet", "norse", "cell loop in forward", lambda: norse_convnet("ConvNet"), note="28x28"),
    Case("norse.conv.ConvNet4", "norse", "cell loop in forward", lambda: norse_convnet("ConvNet4"), note="28x28"),
    Case("norse.vgg", "norse", "multi-step (Lift)", norse_vgg,
         note="VGG(make_layers([8,M,16,M,512])), classifier 64 wide, 16x16"),
    Case("norse.mobilenet", "norse", "multi-step (Lift)", norse_mobilenet,
         note="MobileNetV2 width 0.25, 3 blocks of stride 2 (no residual)"),
    Case("norse.mobilenet_residual", "norse", "multi-step (Lift)", lambda: norse_mobilenet(True),
         note="MobileNetV2 width 0.25, a residual block"),
    Case("norse.sequential_lif", "norse", "multi-step", norse_sequential_lif, quick=True,
         note="SequentialState, LIF"),
    Case("norse.sequential_lifbox", "norse", "cells stepped in a loop", norse_sequential_lifbox,
         note="SequentialState of LIFBoxCell (value and subtract reset)"),
    Case("norse.cell_loop", "norse", "cell loop in forward", lambda: (NorseCellLoop(), (_randn(T, 2, 8, scale=4.0,
                                                                                                shift=2.0),)),
         note="LIFCell"),
    Case("norse.other_neurons", "norse", "multi-step", norse_other_neurons,
         note="LIFAdEx, LIFEx, LSNN, Izhikevich, LIFRecurrent"),
    # hand-written
    Case("hand.inline_lif", "hand-written", "inline, for x in x_seq", lambda: hand("inline_lif"), expect=2, quick=True),
    Case("hand.inline_if", "hand-written", "inline, for x in x_seq", lambda: hand("inline_if"), expect=2),
    Case("hand.inline_plif", "hand-written", "inline, for x in x_seq", lambda: hand("inline_plif"), expect=2,
         note="decay sigmoid(w), w learnable"),
    Case("hand.inline_snntorch_style", "hand-written", "inline, for x in x_seq", lambda: hand("inline_snntorch"),
         expect=2, note="mem = 0.9 mem + cur, subtract reset"),
    Case("hand.module_lif", "hand-written", "own module, multi-step", lambda: hand("module_lif"), expect=2),
    Case("hand.module_if", "hand-written", "own module, multi-step", lambda: hand("module_if"), expect=2),
    Case("hand.module_plif", "hand-written", "own module, multi-step", lambda: hand("module_plif"), expect=2,
         note="decay sigmoid(w), w learnable"),
    Case("hand.registered_lif", "hand-written", "own module, registered", lambda: hand("registered_lif"), expect=2,
         note="revpass.register_neuron"),
]


# ----------------------------------------------------------------------------------------------
# measuring one model
# ----------------------------------------------------------------------------------------------


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


class ModelTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: Optional[int]):
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise ModelTimeout(f"model took longer than {seconds} s (--model-timeout)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def neuron_modules(model: nn.Module) -> Dict[str, str]:
    """{path: class} of every spiking-neuron module in ``model`` (the frameworks' neuron base
    classes, revpass's registered classes and this file's own neuron modules)."""
    bases: List[type] = [HandLIF, HandIF, HandPLIF]
    with contextlib.suppress(Exception):
        from spikingjelly.activation_based.neuron import BaseNode

        bases.append(BaseNode)
    with contextlib.suppress(Exception):
        import snntorch as snn

        bases += [snn.SpikingNeuron, snn.LeakyParallel]
    with contextlib.suppress(Exception):
        from norse.torch.module import snn as nsnn

        bases += [c for c in (getattr(nsnn, n, None) for n in ("SNNCell", "SNN", "SNNRecurrentCell", "SNNRecurrent"))
                  if isinstance(c, type)]
    found = {}
    for path, m in model.named_modules():
        if path and isinstance(m, tuple(bases)):
            found[path] = f"{type(m).__module__.split('.')[0]}.{type(m).__name__}"
    # a neuron inside another neuron (snnTorch's RLeaky holds its recurrent layer, not a neuron) is not
    # counted twice
    return {p: c for p, c in found.items() if not any(p.startswith(q + ".") for q in found)}


def outputs(out: Any) -> List[torch.Tensor]:
    from revpass.utils import flatten

    return [t for t in flatten(out) if isinstance(t, torch.Tensor)]


RESET_ERRORS: List[str] = []  # what revpass.state.reset_states raised, for the current model


def reset_states(model: nn.Module) -> None:
    """revpass.state.reset_states; an error is noted (RESET_ERRORS) and the model used as it is
    (every model here is fresh, or was last run by this file from its reset state)."""
    from revpass.state import reset_states as reset

    try:
        reset(model)
    except Exception as exc:  # noqa: BLE001
        RESET_ERRORS.append(first_line(exc))


def run_from_reset(model: nn.Module, inputs: tuple, seed: int = 0, watch=()) -> List[torch.Tensor]:
    """The outputs of one forward from the reset state with ``seed``; the paths in ``watch``
    (modules of ``model``) that this forward called are added to ``watch.called``."""
    hooks = []
    called = getattr(watch, "called", None)
    for path, m in model.named_modules():
        if path in watch and called is not None:
            hooks.append(m.register_forward_hook(lambda mod, args, out, path=path: called.add(path)))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            reset_states(model)
            with torch.no_grad():
                out = model(*inputs)
        reset_states(model)
    finally:
        for h in hooks:
            h.remove()
    return [t.detach().clone() for t in outputs(out)]


class Inventory(dict):
    """{path: class} of a model's neuron modules, and the paths a forward called."""

    def __init__(self, found: Dict[str, str]):
        super().__init__(found)
        self.called: set = set()


def training_step(model: nn.Module, inputs: tuple) -> str:
    """forward, sum of the float outputs, backward, one SGD step; 'ok' or what went wrong."""
    reset_states(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2)
    opt.zero_grad()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        loss = sum(o.float().sum() for o in outputs(model(*inputs)) if o.is_floating_point())
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return "error: the loss does not depend on any parameter"
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    opt.step()
    reset_states(model)
    if not torch.isfinite(loss):
        return "error: non-finite loss"
    if bad:
        return f"error: non-finite gradient of {bad[0]}"
    return "ok"


def shorten(reason: str, path: str, width: int = 90) -> str:
    r = reason
    for prefix in (f"{path}: ", f"'{path}': "):
        if r.startswith(prefix):
            r = r[len(prefix):]
    cut = min([i for i in (r.find("; "), r.find(". ")) if i > 0] or [len(r)])
    r = r[:cut].rstrip(".")
    return r if len(r) <= width else r[: width - 3] + "..."


def measure(case: Case, timeout: Optional[int], planner: bool = False) -> Dict[str, Any]:
    import gc
    import resource

    import revpass

    row: Dict[str, Any] = {"name": case.name, "framework": case.framework, "form": case.form, "note": case.note,
                           "errors": {}, "convert_s": {}, "decisions": {}, "verify": {}, "verify_detail": {},
                           "train": {}, "exact_equal": None, "sites": None, "supported": None, "converted": {},
                           "unchanged": [], "not_found": [], "sites_detail": [], "planned": {}}
    if case.skip:
        row["status"] = "not built"
        row["errors"]["build"] = case.skip
        return row
    t_start = time.perf_counter()
    RESET_ERRORS.clear()
    try:
        with time_limit(timeout):
            _measure_into(row, case, revpass, planner)
    except ModelTimeout as exc:
        row["errors"]["timeout"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - a row, never a crash
        row["errors"]["tool"] = first_line(exc)
        row["traceback"] = traceback.format_exc(limit=8)
    if RESET_ERRORS:
        row["errors"]["reset_states"] = RESET_ERRORS[0]
    row["total_s"] = time.perf_counter() - t_start
    gc.collect()
    row["max_rss_mib_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["status"] = "ok" if not row["errors"] else ("not built" if "build" in row["errors"] else "errors")
    return row


def _measure_into(row: Dict[str, Any], case: Case, revpass, planner: bool = False) -> None:
    try:
        model, inputs = case.build()
    except Exception as exc:  # noqa: BLE001
        row["errors"]["build"] = first_line(exc)
        return
    model.train()
    row["params"] = sum(p.numel() for p in model.parameters())
    row["input_shapes"] = [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
    inventory = Inventory(neuron_modules(model))
    try:
        reference = run_from_reset(model, inputs, watch=inventory)
    except Exception as exc:  # noqa: BLE001
        row["errors"]["original"] = first_line(exc)
        return

    converted: Dict[str, nn.Module] = {}
    for mode in MODES:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted[mode] = revpass.convert(model, inputs, mode=mode)
        except Exception as exc:  # noqa: BLE001
            row["errors"][f"convert {mode}"] = first_line(exc)
            continue
        row["convert_s"][mode] = time.perf_counter() - t0
        rep = converted[mode].revpass_report
        rows = list(rep)
        counts: Dict[str, int] = {}
        for r in rows:
            counts[r.decision] = counts.get(r.decision, 0) + 1
        row["decisions"][mode] = counts
        # a supported family: the classes above, hand-written neurons, and whatever convert converted
        # (a registered neuron)
        supported = [r for r in rows if r.framework in SUPPORTED or r.kind == "c" or r.decision != "unchanged"]
        row["converted"][mode] = sum(r.decision != "unchanged" for r in supported)
        if row["sites"] is None or mode == "reversible":
            row["sites"] = len(rows)
            row["supported"] = len(supported)
            row["sites_detail"] = [{"path": r.path, "framework": r.framework, "kind": r.kind, "calls": r.calls,
                                    "decision": {}, "reason": {}} for r in rows]
        for d in row["sites_detail"]:
            with contextlib.suppress(KeyError):
                r = rep.by_path(d["path"])
                d["decision"][mode], d["reason"][mode] = r.decision, r.reason
        if mode == "reversible" or "reversible" not in converted:
            found = {r.path for r in rows}
            groups: Dict[Tuple[str, str], int] = {}
            for r in rows:
                if r.decision == "unchanged":
                    key = (r.framework, shorten(r.reason, r.path))
                    groups[key] = groups.get(key, 0) + 1
            row["unchanged"] = [{"count": n, "neuron": k[0], "reason": k[1]} for k, n in groups.items()]
            missing: Dict[str, int] = {}
            idle: Dict[str, int] = {}
            for p, cls in inventory.items():
                if p not in found and not any(p.startswith(f + ".") for f in found):
                    into = missing if p in inventory.called else idle
                    into[cls] = into.get(cls, 0) + 1
            # a neuron module the forward called that no report row names: convert did not see it
            row["not_found"] = [{"count": n, "neuron": c} for c, n in missing.items()]
            row["never_called"] = [{"count": n, "neuron": c} for c, n in idle.items()]
            if case.expect is not None:
                recognised = sum(r.kind == "c" or r.framework in SUPPORTED or r.path in inventory for r in rows)
                if recognised < case.expect:
                    row["not_found"].append({"count": case.expect - recognised,
                                             "neuron": "hand-written (inline or own module)"})
            row["supported"] = max(row["supported"] or 0,
                                   (case.expect if case.expect is not None else 0))

    if "exact" in converted:
        try:
            row["exact_equal"] = _same_outputs(run_from_reset(converted["exact"], inputs), reference)
        except Exception as exc:  # noqa: BLE001
            row["errors"]["exact run"] = first_line(exc)

    for mode, conv in converted.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ver = revpass.verify(model, conv, inputs)
            row["verify"][mode] = bool(ver.passed)
            if not ver.passed:
                row["verify_detail"][mode] = _verify_detail(ver)
        except Exception as exc:  # noqa: BLE001
            row["verify"][mode] = None
            row["errors"][f"verify {mode}"] = first_line(exc)

    from revpass.utils import safe_deepcopy

    for mode, conv in [("original", model)] + list(converted.items()):
        try:
            res = training_step(safe_deepcopy(model) if mode == "original" else conv, inputs)
            row["train"][mode] = res == "ok"
            if res != "ok":
                row["errors"][f"train {mode}"] = res
        except Exception as exc:  # noqa: BLE001
            row["train"][mode] = False
            row["errors"][f"train {mode}"] = first_line(exc)
    if planner:
        _plan_into(row, model, inputs, reference, revpass)


def _same_outputs(got: List[torch.Tensor], reference: List[torch.Tensor]) -> bool:
    """The outputs are the reference's bit for bit (shapes, dtypes, values)."""
    return len(got) == len(reference) and all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, reference))


def _verify_detail(ver) -> str:
    """A failed revpass.verify in one line: its problems, the tensors out of tolerance, the first
    site that differs."""
    detail = list(ver.problems)
    fails = ver.failures()
    if fails:
        detail.append(f"{len(fails)} tensors out of tolerance, first {fails[0].name} "
                      f"(max abs err {fails[0].max_abs:.2e}, max rel err {fails[0].max_rel:.2e}, in {ver.precision})")
    if ver.first_site:
        detail.append(f"first differing site {ver.first_site}")
    return "; ".join(d.splitlines()[0] for d in detail)[:300]


def _plan_into(row: Dict[str, Any], model: nn.Module, inputs: tuple, reference: List[torch.Tensor],
               revpass) -> None:
    """--planner: each of :data:`PLANNED` converted and checked as the modes are: its decisions,
    the forward bit for bit where it keeps the function, verify, a training step; for the Peak
    budget, whether the conversion's estimate fits it, or the BudgetError's smallest figure."""
    before = None  # the estimated peak before conversion, from the first conversion
    for label, kwargs in PLANNED.items():
        out: Dict[str, Any] = {"decisions": {}, "convert_s": None, "same_forward": None, "verify": None,
                               "train": None}
        row["planned"][label] = out
        t0 = time.perf_counter()
        try:
            if label == "exact peak":
                if before is None:
                    raise RuntimeError("no estimated peak before conversion: no earlier conversion ran")
                kwargs = {**kwargs, "budget": revpass.Peak(int(PEAK_SHARE * before))}
                out["budget"] = kwargs["budget"].bytes
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                conv = revpass.convert(model, inputs, **kwargs)
            out["convert_s"] = time.perf_counter() - t0
            before = conv.revpass_peak_before if before is None else before
            if label == "exact peak":
                out["fits"] = conv.revpass_budget["estimated_peak"] <= out["budget"]
            for r in conv.revpass_report:
                out["decisions"][r.decision] = out["decisions"].get(r.decision, 0) + 1
            if label in KEEPS_FUNCTION:
                out["same_forward"] = _same_outputs(run_from_reset(conv, inputs), reference)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ver = revpass.verify(model, conv, inputs)
            out["verify"] = bool(ver.passed)
            if not ver.passed:
                row["verify_detail"][label] = _verify_detail(ver)
            res = training_step(conv, inputs)
            out["train"] = res == "ok"
            if res != "ok":
                row["errors"][f"train {label}"] = res
        except revpass.BudgetError as exc:  # the budget cannot be met: the answer it must give
            out["refused"] = first_line(exc)
        except Exception as exc:  # noqa: BLE001 - a row, never a crash
            row["errors"][f"plan {label}"] = first_line(exc)


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------


def _flag(v: Optional[bool]) -> str:
    return "-" if v is None else ("yes" if v else "**no**")


def _verdict(v: Optional[bool], err: bool) -> str:
    if err:
        return "**error**"
    return "-" if v is None else ("pass" if v else "**FAIL**")


def _conv_cell(r: Dict[str, Any], mode: str) -> str:
    if f"convert {mode}" in r["errors"]:
        return "**error**"
    if mode not in r["converted"]:
        return "-"
    n, m = r["converted"][mode], r["supported"]
    cell = f"{n}/{m}"
    other = {k: v for k, v in r["decisions"].get(mode, {}).items() if k not in (mode, "unchanged")}
    if other:
        cell += " (" + ", ".join(f"{v} {k}" for k, v in other.items()) + ")"
    return cell if n >= m else f"**{cell}**"


def target_met(r: Dict[str, Any]) -> Optional[bool]:
    if r["status"] == "not built" or r["sites"] is None:
        return None
    return all(r["converted"].get(m, -1) >= (r["supported"] or 0) for m in MODES)


def _by_mode(items: Dict[str, str]) -> List[Tuple[str, str]]:
    """[(label, text)] with a stage's two modes merged when they say the same ('convert (both)')."""
    out: List[Tuple[str, str]] = []
    done = set()
    for k, v in items.items():
        stage, _, mode = k.partition(" ")
        if k in done:
            continue
        others = [f"{stage} {m}" for m in MODES if m != mode]
        if mode in MODES and all(items.get(o) == v for o in others):
            out.append((f"{stage} (both modes)", v))
            done.update(others)
        else:
            out.append((k, v))
        done.add(k)
    return out


def notes_cell(r: Dict[str, Any]) -> str:
    parts = []
    for k, v in _by_mode(r["errors"]):
        parts.append(f"{k}: `{_md(v)[:160]}`")
    for k, d in _by_mode({f"verify {m}": d for m, d in r["verify_detail"].items()}):
        parts.append(f"{k}: {_md(d)[:160]}")
    for u in r["unchanged"]:
        parts.append(f"unchanged {u['count']}x {u['neuron']}: {_md(u['reason'])}")
    for nf in r["not_found"]:
        parts.append(f"not in the report {nf['count']}x {nf['neuron']}")
    idle = sum(d["calls"] == 0 for d in r["sites_detail"])
    if idle:
        parts.append(f"{idle} sites with 0 calls in the traced graph")
    return "; ".join(parts)


def _md(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def table(rows: List[Dict[str, Any]]) -> str:
    head = ("model", "form", "sites", "converted rev", "converted exact", "exact == orig", "verify rev",
            "verify exact", "train rev", "train exact", "convert s (rev / exact)", "notes")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e = r["errors"]
        cs = r["convert_s"]
        secs = " / ".join(f"{cs[m]:.2f}" if m in cs else "-" for m in MODES)
        cells = (f"{r['name']}", r["form"], "-" if r["sites"] is None else str(r["sites"]),
                 _conv_cell(r, "reversible"), _conv_cell(r, "exact"),
                 "**error**" if "exact run" in e else _flag(r["exact_equal"]),
                 _verdict(r["verify"].get("reversible"), "verify reversible" in e),
                 _verdict(r["verify"].get("exact"), "verify exact" in e),
                 _flag(r["train"].get("reversible")), _flag(r["train"].get("exact")), secs, notes_cell(r))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failures(rows: List[Dict[str, Any]]) -> str:
    """Every error and failed check, grouped by its first line."""
    groups: Dict[str, List[str]] = {}
    for r in rows:
        for stage, msg in r["errors"].items():
            groups.setdefault(f"{stage.split()[0]}: {msg}", []).append(r["name"] + (
                f" ({stage.split()[1]})" if len(stage.split()) > 1 else ""))
        for mode, d in r["verify_detail"].items():
            groups.setdefault(f"verify: {d}", []).append(f"{r['name']} ({mode})")
        if r["exact_equal"] is False:
            groups.setdefault("exact output differs from the original's", []).append(r["name"])
        for label, p in r.get("planned", {}).items():
            if p["same_forward"] is False:
                groups.setdefault("output differs from the original's", []).append(f"{r['name']} ({label})")
    if not groups:
        return "None."
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    return "\n".join(f"- `{_md(k)[:300]}`: {', '.join(v)}" for k, v in ordered)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {n} CPU cores available, {platform.system()} {platform.release()}"


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("spikingjelly", "snntorch", "norse"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:  # noqa: BLE001
            out[mod] = "?"
    return out


def summary(rows: List[Dict[str, Any]]) -> str:
    built = [r for r in rows if r["status"] != "not built"]
    conv_ok = [r for r in built if all(m in r["converted"] for m in MODES)]
    met = [r for r in conv_ok if target_met(r)]
    sites = sum(r["sites"] or 0 for r in built)
    sup = sum(r["supported"] or 0 for r in built)
    conv = {m: sum(r["converted"].get(m, 0) for r in built) for m in MODES}

    def ratio(flag):  # passed / checked
        vals = [flag(r) for r in built]
        return f"{sum(v is True for v in vals)}/{sum(v is not None for v in vals)}"

    orig_fail = sum("original" in r["errors"] for r in built)
    conv_fail = sum(any(k.startswith("convert") for k in r["errors"]) for r in built)
    return (f"{len(rows)} models, {len(built)} built, {orig_fail} whose original raises, {conv_fail} whose conversion "
            f"raises; every neuron of a supported family converted in both modes in {len(met)}/{len(conv_ok)} "
            f"converted models; sites {sites}, of a supported family {sup}, converted {conv['reversible']} "
            f"(reversible) / {conv['exact']} (exact); exact output equal {ratio(lambda r: r['exact_equal'])}; "
            f"verify passes {ratio(lambda r: r['verify'].get('reversible'))} (reversible), "
            f"{ratio(lambda r: r['verify'].get('exact'))} (exact); training step runs "
            f"{ratio(lambda r: r['train'].get('reversible'))} (reversible), "
            f"{ratio(lambda r: r['train'].get('exact'))} (exact) (passed/checked)")


def _planned_cell(r: Dict[str, Any], label: str) -> str:
    """A --planner variant's cell: its decisions, then what failed (forward, verify, train)."""
    p = r.get("planned", {}).get(label)
    if p is None:
        return "-"
    if f"plan {label}" in r["errors"]:
        return "**error**"
    if p.get("refused"):
        floor = re.search(r"smallest reachable estimated peak is (\d+) bytes", p["refused"])
        return (f"refused: {p.get('budget')} bytes; the smallest reachable estimate {floor.group(1)} bytes" if floor
                else "refused: " + _md(p["refused"])[:80])
    cell = ", ".join(f"{v} {k}" for k, v in sorted(p["decisions"].items())) or "no sites"
    bad = [what for what, ok in (("forward", p["same_forward"]), ("verify", p["verify"]), ("train", p["train"]),
                                 ("budget", p.get("fits"))) if ok is False]
    return cell + (f" (**{', '.join(bad)} failed**)" if bad else "") + f"; {p['convert_s']:.2f} s"


def planned_summary(rows: List[Dict[str, Any]]) -> str:
    """Per --planner variant: conversions that ran, forwards equal, verify passes, training steps
    that ran (passed/checked)."""
    parts = []
    for label in PLANNED:
        ps = [(r, r["planned"][label]) for r in rows if label in r.get("planned", {})]

        def ratio(key, ps=ps):
            vals = [p[key] for _, p in ps if p.get(key) is not None]
            return f"{sum(vals)}/{len(vals)}"

        ran = sum(f"plan {label}" not in r["errors"] and not p.get("refused") for r, p in ps)
        refused = sum(bool(p.get("refused")) for _, p in ps)
        parts.append(f"{label}: converts {ran}/{len(ps)}"
                     + (f" (refused with the smallest reachable figure: {refused}; the estimate within the budget: "
                        f"{ratio('fits')})" if label == "exact peak" else "")
                     + (f", output equal {ratio('same_forward')}" if label in KEEPS_FUNCTION else "")
                     + f", verify passes {ratio('verify')}, training step runs {ratio('train')}")
    return "; ".join(parts)


def planned_table(rows: List[Dict[str, Any]]) -> str:
    head = ("model", *(f"`{', '.join(f'{k}={v!r}' for k, v in PLANNED[label].items())}`" for label in PLANNED))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("planned"):
            lines.append("| " + " | ".join((r["name"], *(_planned_cell(r, label) for label in PLANNED))) + " |")
    return "\n".join(lines)


def markdown(rows, command, total_s, quick) -> str:
    v = versions()
    return "\n".join([
        "# Coverage corpus (CPU)" + (" — quick subset" if quick else ""),
        "",
        f"Machine: {machine()}. Python {v['python']}, torch {v['torch']}, SpikingJelly {v['spikingjelly']}, "
        f"snnTorch {v['snntorch']}, norse {v['norse']}. Date: {datetime.date.today().isoformat()}.",
        "",
        f"Command: `{command}` ({total_s:.0f} s in all).",
        "",
        f"Every model at T = {T}, small sizes (the notes of the JSON say which); each converted with "
        "`revpass.convert(model, x, mode=...)` for `reversible` and `exact`. Columns: **sites** found by "
        "convert; **converted** sites / sites of a supported family (SpikingJelly LIFNode, IFNode, "
        "ParametricLIFNode; snnTorch Leaky, Synaptic; norse LIF, LIFCell, LIFBoxCell; hand-written neurons: "
        "the neurons the model holds); **exact == orig**: the exact conversion's outputs `torch.equal` to the "
        "original's from the reset state, same seed; **verify**: `revpass.verify(original, converted, x)` "
        "passes; **train**: forward, sum, backward and an SGD step run with finite values on the converted "
        "model; **convert s**: wall time of convert. Notes: errors (first line), verify's failure, the sites "
        "left unchanged with their reason shortened, and neuron modules the report does not list.",
        "",
        f"Summary: {summary(rows)}.",
        "",
        table(rows),
        "",
        *([] if not any(r.get("planned") for r in rows) else [
            "## Recomputed segments and the planner (--planner)",
            "",
            "Each model converted again with each of the keyword arguments heading the columns: the "
            "decisions, then what failed of the checks (**forward**: the outputs `torch.equal` to the "
            "original's, for all that keep its function, every column but `budget='min'`; **verify**; "
            "**train**; **budget**: the conversion's estimated peak within the `revpass.Peak` budget, "
            f"{PEAK_SHARE:g}x the model's estimated peak before conversion, which convert may instead refuse "
            "with `BudgetError` naming the smallest reachable figure), and convert's wall time.",
            "",
            f"Summary: {planned_summary(rows)}.",
            "",
            planned_table(rows),
            "",
        ]),
        "## Errors and failed checks, grouped",
        "",
        failures(rows),
        "",
    ])


def model_line(i: int, n: int, r: Dict[str, Any]) -> str:
    if r["status"] == "not built":
        return f"[{i}/{n}] {r['name']}: not built: {r['errors'].get('build', '')[:160]}"
    conv = ", ".join(f"{m[:3]} {r['converted'][m]}/{r['supported']}" for m in MODES if m in r["converted"])
    ver = "/".join({True: "pass", False: "FAIL", None: "err"}[r["verify"].get(m)] if m in r["verify"] else "-"
                   for m in MODES)
    tr = "/".join(("ok" if r["train"][m] else "FAIL") if m in r["train"] else "-" for m in MODES)
    err = f"; errors: {', '.join(r['errors'])}" if r["errors"] else ""
    planned = "".join(
        f"; {label}: " + ("refused" if p.get("refused") else "ok" if all(
            v is not False for k, v in p.items() if k in ("same_forward", "verify", "train", "fits"))
                          and f"plan {label}" not in r["errors"] else "FAIL")
        for label, p in r.get("planned", {}).items())
    return (f"[{i}/{n}] {r['name']}: {r['sites']} sites, {conv or 'not converted'}, exact==orig "
            f"{_flag(r['exact_equal']).strip('*')}, verify {ver}, train {tr}{planned} ({r.get('total_s', 0):.1f} s)"
            f"{err}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few small models across the frameworks (CI)")
    ap.add_argument("--only", default=None, help="run the models whose name contains NAME (comma-separated: any)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--md", type=Path, default=None,
                    help="markdown table (default: docs/results/coverage_cpu.md for the full corpus, "
                         "bench_out/coverage.md with --quick or --only)")
    ap.add_argument("--model-timeout", type=int, default=600, help="seconds per model before it is a row with "
                                                                   "a timeout error (0: none)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: the models are small, and on a shared machine more "
                         "threads than free cores make every time here swing tenfold; 0: torch's default)")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    ap.add_argument("--planner", action="store_true",
                    help="also convert each model with mode='recompute', mode='exact' with budget='min', "
                         "budget='min' and mode='exact' with a Peak budget of 0.8x its estimated peak, each "
                         "checked as the modes are (a second table)")
    a = ap.parse_args(argv)

    cases = [c for c in CASES if c.quick] if a.quick else list(CASES)
    if a.only:
        keys = [k.strip() for k in a.only.split(",") if k.strip()]
        cases = [c for c in cases if any(k in c.name for k in keys)]
    if a.list:
        for c in cases:
            print(f"{c.name:34s} {c.framework:13s} {c.form:28s} {'quick' if c.quick else ''}")
        return 0
    if not cases:
        print(f"no model matches --only {a.only!r}", file=sys.stderr)
        return 2
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    md_path = a.md or (ROOT / "bench_out" / "coverage.md" if (a.quick or a.only) else
                       ROOT / "docs" / "results" / "coverage_cpu.md")
    command = "python tools/coverage.py" + "".join(f" {shlex.quote(s)}" for s in (argv if argv is not None
                                                                                    else sys.argv[1:]))
    t0 = time.perf_counter()
    rows = []
    for i, case in enumerate(cases, 1):
        r = measure(case, a.model_timeout, a.planner)
        rows.append(r)
        print(model_line(i, len(cases), r), file=sys.stderr, flush=True)
    total = time.perf_counter() - t0
    md = markdown(rows, command, total, a.quick)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    print(md)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"command": command, "machine": machine(), "versions": versions(),
                                      "quick": a.quick, "T": T, "total_s": total, "summary": summary(rows),
                                      "planned_summary": planned_summary(rows) if a.planner else None,
                                      "models": rows}, indent=1, default=str))
    print(f"coverage: {len(rows)} models in {total:.1f} s; table written to {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
