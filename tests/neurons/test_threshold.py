"""Inputs exactly at the threshold, for every family. SpikingJelly fires where the membrane equals
v_threshold (H - v_threshold >= 0); snnTorch and norse do not (mem - threshold > 0). The library
neuron, the exact node and the reversible node, under every backward, agree there: a spike
function that compares the other way round moves a spike by one step, and everything after it.

The inputs (tests/catalogue.py, AT_THRESHOLD) are built so that the pre-spike membrane is the
threshold itself; each test first checks that on the library's own membrane."""

import pytest
import torch

from catalogue import AT_THRESHOLD, at_threshold_input, close, library_membranes, threshold_of, worst
from revpass.neurons import run_library
from revpass.nodes import ExactNode, Node, ReversibleNode


def _dtypes(case):
    # norse multiplies by its float32 dt * tau_mem_inv (0.1 rounded): exactly 1.0 in float32 only
    return [torch.float32] if case.framework == "norse" else [torch.float32, torch.float64]


PAIRS = [(c, d) for c in AT_THRESHOLD for d in _dtypes(c)]
IDS = [f"{c.id}-{str(d)[6:]}" for c, d in PAIRS]


def _expected(case, like):
    """The library's spikes at each step, for every element of ``like``."""
    s = torch.tensor(case.spikes, dtype=like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))
    return s.expand_as(like).contiguous()


def _library(case, dtype, shape=(2, 2)):
    """(the neuron, its input at the threshold, its own spikes), after checking that the input
    does land exactly on the threshold and that it spikes as ``case.spikes`` says."""
    lib = case.make().to(dtype)
    x = at_threshold_input(case, shape=shape, dtype=dtype)
    first_fire = case.spikes.index(1.0) if 1.0 in case.spikes else len(case.spikes)
    mem = library_membranes(lib, x)
    thr = threshold_of(lib)
    checked = [t for t in case.at if t <= first_fire]
    assert checked and 0 in checked
    for t in checked:
        assert bool((mem[t] == thr).all()), f"step {t}: membrane {mem[t].flatten()[0].item()!r} is not {thr!r}"
    s = run_library(lib, x).detach().to(dtype)
    assert torch.equal(s, _expected(case, x)), f"the library spikes {s[:, 0, 0].tolist()}"
    return lib, x, s


@pytest.mark.parametrize("case,dtype", PAIRS, ids=IDS)
def test_the_library_fires_at_the_threshold_only_in_spikingjelly(case, dtype):
    _, x, s = _library(case, dtype)
    fires = case.framework == "spikingjelly"
    assert bool((s[0] == (1.0 if fires else 0.0)).all())
    assert s.sum() > 0  # the input makes every family fire somewhere: not a silent neuron


def _node_input(cls, x, s):
    """The node's input and the output it must give, from the library's input ``x`` (T, B, c)
    at the threshold and its spikes ``s``.

    Exact node: ``x`` itself, output ``s``. Reversible node (channels [G | F | remainder]): F
    charges from X2 = x; G's part is X1 = x - s, so that Y1 = X1 + F(X2) = x when F spikes as the
    library does, and G charges from inputs at the threshold too; the odd last channel runs
    through the exact node. Output [x | x + s | s]."""
    if cls is ExactNode:
        return torch.cat([x, x[:, :, :1]], 2), torch.cat([s, s[:, :, :1]], 2)
    return torch.cat([x - s, x, x[:, :, :1]], 2), torch.cat([x, x + s, s[:, :, :1]], 2)


NODE_CASES = [pytest.param(c, d, cls, b, id=f"{c.id}-{str(d)[6:]}-{cls.kind}-{b}")
              for c, d in PAIRS for cls in (ExactNode, ReversibleNode) for b in cls._backwards]


@pytest.mark.parametrize("case,dtype,cls,backward", NODE_CASES)
def test_nodes_at_the_threshold_are_the_library(case, dtype, cls, backward):
    lib, x, s = _library(case, dtype)
    xin, want = _node_input(cls, x, s)
    node = cls.from_neuron(lib, backward=backward, step_mode="m", carry_state=False)
    assert isinstance(node, Node)
    with torch.no_grad():  # the forward without autograd (what a backward rebuilds from)
        assert torch.equal(node(xin), want)
    xl = xin.clone().requires_grad_(True)
    y = node(xl)  # under autograd (the "autograd" backward runs its own forward)
    assert torch.equal(y.detach(), want), (y.detach()[:, 0, :].tolist(), want[:, 0, :].tolist())
    # the backward recomputes the spikes at the threshold as the forward decided them: the input
    # gradient is the library's (exact node) or the autograd backward's (reversible node), within
    # docs/method.md section 7
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    (g,) = torch.autograd.grad(y, [xl], gy)
    x2 = xin.clone().requires_grad_(True)
    if cls is ExactNode:
        if case.framework == "snntorch" and dtype == torch.float64:
            return  # snnTorch computes its spikes in float32: its float64 gradients carry that rounding
        y_ref = run_library(lib, x2)
    else:
        y_ref = cls.from_neuron(lib, backward="autograd", step_mode="m", carry_state=False)(x2)
    assert torch.equal(y_ref.detach().to(dtype), want)
    (g_ref,) = torch.autograd.grad(y_ref, [x2], gy.to(y_ref.dtype))
    assert close(g, g_ref.to(dtype), dtype), worst(g, g_ref.to(dtype), dtype)
