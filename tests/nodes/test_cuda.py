"""The nodes on CUDA (skipped without a GPU; run on a lent GPU machine, never required by CI).

On CUDA the nodes run revpass's Triton kernels (REVPASS_KERNELS=auto); the tests that compare
the three backward modes pin REVPASS_KERNELS=torch, because PyTorch on CUDA divides by a Python
number as a multiplication by its reciprocal, which the kernels (like SpikingJelly's) do not."""


import pytest
import torch

import revpass
from catalogue import CASES, close, input_for, within_reconstruction_bound, worst
from revpass.memory import saved_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _grads(node, x, seed=3):
    y = node(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y)
    params = [p for p in node.parameters() if p.requires_grad]
    return y.detach(), torch.autograd.grad(y, [x] + params, g)


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("REVPASS_KERNELS", "torch")


@pytest.mark.parametrize("T", [16, 128])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cuda_backwards_agree(case, T, torch_path):
    lib = case.make().cuda()
    x = input_for(case, T).cuda().requires_grad_(True)
    res = {b: _grads(revpass.ReversibleNode.from_neuron(lib, backward=b, step_mode="m", carry_state=False), x)
           for b in ("autograd", "optimized", "recompute")}
    for b in ("optimized", "recompute"):
        assert torch.equal(res[b][0], res["autograd"][0])
        for a, r in zip(res[b][1], res["autograd"][1]):
            # float32 reconstruction: the documented bound (docs/method.md), at any T
            assert within_reconstruction_bound(a, r), f"{b}: worst {worst(a, r):.3g}"
    ex = {b: _grads(revpass.ExactNode.from_neuron(lib, backward=b, step_mode="m", carry_state=False), x)
          for b in ("autograd", "optimized")}
    assert torch.equal(ex["optimized"][0], ex["autograd"][0])
    gx, gx_ref = ex["optimized"][1][0], ex["autograd"][1][0]
    assert close(gx, gx_ref), f"exact: worst {worst(gx, gx_ref):.3g}"
    for a, r in zip(ex["optimized"][1][1:], ex["autograd"][1][1:]):
        # a parameter's gradient is a float32 sum over T*B*F terms, whose rounding depends on the
        # summation order (a whole-tensor reduction here, per-step accumulation in autograd):
        # on CUDA it was measured at 1.04x section 7's tolerance (T = 128); docs/method.md
        assert bool(((a - r).abs() <= 4e-6 + 4e-5 * r.abs()).all()), f"exact param: worst {worst(a, r):.3g}"


# ---------------------------------------------------------------------------------------------
# the Triton kernels
# ---------------------------------------------------------------------------------------------

KERNEL_CASES = [c for c in CASES if c.id not in ("sj-lif-own-surrogate", "snn-leaky-channel-beta",
                                                 "norse-lifcell-tanh")]


@pytest.mark.parametrize("cls", [revpass.ReversibleNode, revpass.ExactNode], ids=["reversible", "exact"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c.id for c in KERNEL_CASES])
def test_cuda_kernels_against_the_pytorch_path(case, cls, monkeypatch):
    """The kernels on CUDA against the PyTorch path on the CPU (which divides correctly rounded,
    as the kernels do; PyTorch on CUDA multiplies by a reciprocal): forward bit for bit,
    gradients within the reconstruction bound (reversible) or section 7 (exact)."""
    lib = case.make()
    x = input_for(case, 32, shape=(4, 7, 5, 3)).requires_grad_(True)
    monkeypatch.setenv("REVPASS_KERNELS", "torch")
    y_t, g_t = _grads(cls.from_neuron(lib, step_mode="m", carry_state=False), x)
    monkeypatch.setenv("REVPASS_KERNELS", "triton")
    xc = x.detach().cuda().requires_grad_(True)
    y_k, g_k = _grads(cls.from_neuron(lib.cuda(), step_mode="m", carry_state=False), xc)
    assert torch.equal(y_k.cpu(), y_t)
    for a, r in zip(g_k, g_t):
        a = a.cpu()
        assert within_reconstruction_bound(a, r) or close(a, r), f"worst {worst(a, r):.3g}"


@pytest.mark.parametrize("name", ["LIFNode", "IFNode"])
@pytest.mark.parametrize("kw", [{}, {"v_reset": None}, {"detach_reset": True}, {"tau": 3.0, "decay_input": False}],
                         ids=["hard", "soft", "detach", "tau3-nodecay"])
def test_cuda_exact_node_reproduces_spikingjellys_triton_neuron(name, kw, monkeypatch):
    """Exact mode on CUDA: SpikingJelly's own Triton neuron's outputs bit for bit, and its
    gradients bit for bit or within section 7 (the README says which was measured)."""
    from spikingjelly.activation_based import neuron

    if name == "IFNode":
        kw = {k: v for k, v in kw.items() if k not in ("tau", "decay_input")}
    for ns in ("SJ_LIF_CUDA_IMPLEMENTATION", "SJ_IF_CUDA_IMPLEMENTATION"):
        monkeypatch.setenv(ns, "triton")
    lib = getattr(neuron, name)(step_mode="m", **kw).cuda()
    x = (torch.randn(16, 8, 32, 9, 9, device="cuda") + 0.6).requires_grad_(True)
    g = torch.randn_like(x)
    lib.reset()
    y_lib = lib(x)
    (gx_lib,) = torch.autograd.grad(y_lib, x, g)
    node = revpass.ExactNode.from_neuron(lib, carry_state=False)
    y = node(x)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(y, y_lib)
    bitwise = torch.equal(gx, gx_lib)
    print(f"{name} {kw}: gradients bit for bit: {bitwise}, worst {worst(gx, gx_lib):.3g}")
    assert bitwise or close(gx, gx_lib)


@pytest.mark.parametrize("node_kind", ["reversible", "exact"])
def test_cuda_folded_batch_norm(node_kind, monkeypatch, device="cuda"):
    """A batch norm folded into a node, in the kernels on CUDA (the reversible node's and the
    exact node's batch-norm backward kernels): outputs equal the unfolded node's, two calls
    carrying state, gradients within section 7 (folded into an exact node: as accurate as the
    unfolded one, docs/method.md section 12)."""
    from nodes.test_batchnorm import _bn, _node, _run, assert_grads_close
    from nodes.test_batchnorm_exact import _exact, assert_as_accurate

    monkeypatch.setenv("REVPASS_KERNELS", "triton")
    shape = (8, 4, 16, 8, 8)
    gen = torch.Generator().manual_seed(1)
    c = (torch.randn((2, *shape), generator=gen) * 2 + 0.3).to(device).requires_grad_(True)
    g = torch.randn((2, *shape), generator=gen).to(device)
    node = (_node if node_kind == "reversible" else _exact)("lif").to(device)
    bn = _bn(shape[2]).to(device)
    ys_u, gr_u, _ = _run(node, bn, c, g, fold=False)
    ys_f, gr_f, _ = _run(node, bn, c, g, fold=True)
    assert all(torch.equal(a, b) for a, b in zip(ys_u, ys_f))
    (assert_grads_close if node_kind == "reversible" else assert_as_accurate)(gr_f, gr_u, node, bn, c, g,
                                                                                torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", [revpass.ReversibleNode, revpass.ExactNode], ids=["reversible", "exact"])
def test_cuda_half_inputs_are_computed_in_float32(cls, dtype, monkeypatch):
    """float16/bfloat16 inputs: computed in float32 inside the kernels, returned in the input's
    dtype, as the PyTorch path does."""
    from spikingjelly.activation_based import neuron

    x = (torch.randn(8, 4, 6, 5, 5, device="cuda") + 0.6).to(dtype).requires_grad_(True)
    res = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("REVPASS_KERNELS", name)
        node = cls.from_neuron(neuron.ParametricLIFNode(step_mode="m").cuda(), carry_state=False)
        y = node(x)
        assert y.dtype == dtype
        res[name] = (y.detach(), torch.autograd.grad(y.float().sum(), x)[0])
    assert torch.equal(res["torch"][0], res["triton"][0])
    assert torch.allclose(res["torch"][1].float(), res["triton"][1].float(), rtol=1e-2, atol=1e-3)


def test_cuda_kernels_launch_independently_of_T(monkeypatch):
    """One launch per kernel per call, whatever T (counted through torch.profiler)."""
    from spikingjelly.activation_based import neuron
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("REVPASS_KERNELS", "triton")
    counts = []
    for T in (4, 64):
        node = revpass.ReversibleNode.from_neuron(neuron.LIFNode(step_mode="m").cuda(), carry_state=False)
        x = torch.randn(T, 4, 7, 8, 8, device="cuda", requires_grad=True)
        node(x).sum().backward()  # compiled once
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            node(x).sum().backward()
            torch.cuda.synchronize()
        counts.append(sum(e.count for e in p.key_averages() if e.key.startswith(("_rev_", "_exact_"))))
    assert counts[0] == counts[1] == 4  # pairs and the unpaired channel, forward and backward


def test_cuda_bytes_kept():
    from spikingjelly.activation_based import neuron

    lif = neuron.LIFNode(step_mode="m").cuda()
    x = torch.randn(8, 4, 16, 8, 8, device="cuda", requires_grad=True)
    node = revpass.ReversibleNode.from_neuron(lif, carry_state=False)
    y, rep = saved_bytes(lambda: node(x), exclude=[x], output_of=lambda y: [y])
    assert rep.total_without_output * 64 == x.numel() * 4


def test_cuda_convert_spiking_resnet18():
    import models

    net = models.sj_zoo("spiking_resnet18").cuda()
    x = torch.randn(4, 2, 3, 32, 32, device="cuda")
    exact = revpass.convert(net, x, mode="exact")
    from revpass.state import reset_states

    reset_states(net)
    assert torch.equal(exact(x), net(x))
    rev = revpass.convert(net, x)
    assert rev.revpass_report.count("reversible") == 17
    assert revpass.verify(net, rev, x).passed
    assert revpass.verify(net, exact, x).passed



def test_cuda_recompute_segments():
    """Recomputed segments on CUDA: the original function, gradients verified, batch-norm
    statistics updated once, and dropout's CUDA random numbers replayed in the rebuild."""
    import models
    from passes.test_segments import check_dropout_replay

    net = models.sj_zoo("spiking_resnet18").cuda()
    x = torch.randn(4, 2, 3, 32, 32, device="cuda")
    gm = revpass.convert(net, x, mode="recompute")
    assert gm.revpass_report.count("recompute") == 17
    from revpass.state import reset_states

    reset_states(net), reset_states(gm)
    assert torch.equal(gm(x), net(x))
    reset_states(net), reset_states(gm)
    assert revpass.verify(net, gm, x).passed
    orig = revpass.convert(net, x, exclude="*")
    for m in (orig, gm):
        reset_states(m)
        m(x).sum().backward()
    for (name, a), (_, b) in zip(orig.named_buffers(), gm.named_buffers()):
        assert torch.equal(a, b), name
    check_dropout_replay("cuda", slack=4.0)
