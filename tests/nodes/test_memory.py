"""Bytes kept for backward, measured with saved_tensors_hooks and deduplicated by storage, equal
what docs/method.md sections 3 and 6 say, for every family."""

import math

import pytest
import torch

import revpass
from catalogue import CASES, input_for
from revpass.memory import saved_bytes
from revpass.neurons import family_of, spec_from_module

T = 16


def _measure(node, x):
    exclude = [x, *node.parameters(), *node.buffers()]
    y, rep = saved_bytes(lambda: node(x), exclude=exclude, output_of=lambda y: [y])
    return y, rep


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("C", [6, 5])
def test_reversible_keeps_output_bits_and_nothing_else(case, C):
    if case.id == "snn-leaky-channel-beta" and C == 5:
        pytest.skip("per-channel beta is sized for 6 channels")
    lib = case.make()
    x = input_for(case, T, shape=(2, C, 3)).requires_grad_(True)
    node = revpass.ReversibleNode.from_neuron(lib, carry_state=False, step_mode="m")
    y, rep = _measure(node, x)
    spec = spec_from_module(lib)
    fam = family_of(spec)
    B, F, c = 2, 3, C // 2
    bits = T * fam.n_bits(spec) * math.ceil(B * c * F / 8)  # each decision plane starts on a byte
    rem = (C - 2 * c) * B * F * T * 4 * len(fam.exact_keep(spec, [n for n, p in spec.params.items() if p.requires_grad]))
    assert rep.shared_with_output == y.numel() * 4  # Y itself: free when its consumer keeps it
    assert rep.total == y.numel() * 4 + bits + rem


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_exact_keeps_one_float_per_element_and_step(case):
    lib = case.make()
    x = input_for(case, T).requires_grad_(True)
    node = revpass.ExactNode.from_neuron(lib, carry_state=False, step_mode="m")
    y, rep = _measure(node, x)
    spec = spec_from_module(lib)
    keep = family_of(spec).exact_keep(spec, [n for n, p in spec.params.items() if p.requires_grad])
    assert rep.shared_with_output == 0  # the spikes are recomputed from H, not kept
    assert rep.total == x.numel() * 4 * len(keep)
    assert keep == (("h", "syn") if case.id == "snn-synaptic-learn" else ("h",))


def test_carried_state_is_kept_once():
    from spikingjelly.activation_based import neuron

    lib = neuron.LIFNode(step_mode="m")
    node = revpass.ReversibleNode.from_neuron(lib)  # SpikingJelly nodes carry state
    x = torch.randn(T, 2, 6, 3).requires_grad_(True)
    _, first = _measure(node, x)
    _, second = _measure(node, x)
    assert second.total - first.total == 2 * 6 * 3 * 4  # the initial v: one step's worth


def test_library_neurons_keep_what_method_md_says():
    from spikingjelly.activation_based import functional, neuron

    x = torch.randn(4, 2, 6, 8).requires_grad_(True)  # F half: 48 bits per step, no padding
    expected = {
        "hard": (neuron.LIFNode(step_mode="m"), 3.0),
        "detach": (neuron.LIFNode(detach_reset=True, step_mode="m"), 2.0),
        "soft": (neuron.LIFNode(v_reset=None, step_mode="m"), 1.0),
        "if": (neuron.IFNode(step_mode="m"), 3.0),
    }
    for name, (m, ratio) in expected.items():
        functional.reset_net(m)
        _, rep = saved_bytes(lambda: m(x), exclude=[x])
        assert rep.total == ratio * x.numel() * 4, name
        node = revpass.ReversibleNode.from_neuron(m, carry_state=False)
        _, r2 = _measure(node, x)
        # >= 64x fewer bytes than the library neuron, with the output counted by its consumer
        assert rep.total / r2.total_without_output == 64 * ratio


def test_sliced_backward_workspace():
    """The optimized backward in slices (revpass.nodes.slicing.chunks) allocates a fraction of what
    the whole-sequence backward does: for the stem of spiking_resnet18 (8 slices), under a
    third, for both nodes; and the whole-sequence one several times the input, as docs/method.md
    section 5's buffers say. (The exact node of a SpikingJelly LIF runs no slices: see below.)"""
    from spikingjelly.activation_based import neuron

    from revpass.nodes import slicing
    from revpass.analysis.workspace import node_workspace

    shape = (4, 2, 64, 16, 16)
    nbytes = math.prod(shape) * 4
    for cls, lif in ((revpass.ReversibleNode, neuron.LIFNode), (revpass.ExactNode, neuron.ParametricLIFNode)):
        node = cls.from_neuron(lif(step_mode="m"))
        whole = node_workspace(node, shape, torch.float32)  # the default: 2^15 per step is one slice
        node.set_slicing(slicing.CHUNK_MIN_ELEMS_FINE)  # as convert does at a model's largest activations
        sliced = node_workspace(node, shape, torch.float32)
        assert whole >= 1.5 * nbytes, (cls.__name__, whole / nbytes)
        assert 0 < sliced < whole / 3, (cls.__name__, sliced / nbytes, whole / nbytes)


@pytest.mark.parametrize("surrogate", ["Sigmoid", "ATan"])
def test_exact_spikingjelly_backward_workspace_is_a_few_steps(surrogate):
    """The exact node of a SpikingJelly LIF computes its backward one whole step at a time, as
    SpikingJelly does (SpikingJellyFamily.exact_stream): besides the input gradient it allocates
    four steps' worth at any T, however it is asked to slice."""
    from spikingjelly.activation_based import neuron, surrogate as sj_surrogate

    from revpass.nodes import slicing
    from revpass.analysis.workspace import node_workspace

    lif = neuron.LIFNode(step_mode="m", surrogate_function=getattr(sj_surrogate, surrogate)())
    for T in (4, 16):
        shape = (T, 2, 64, 16, 16)
        step = math.prod(shape[1:]) * 4
        for min_elems in (None, slicing.CHUNK_MIN_ELEMS_FINE):
            node = revpass.ExactNode.from_neuron(lif)
            node.set_slicing(min_elems)
            assert node_workspace(node, shape, torch.float32) == 4 * step, (T, min_elems)
