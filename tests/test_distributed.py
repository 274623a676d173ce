"""FSDP2 (torch.distributed.fsdp.fully_shard) with gloo: two processes on 127.0.0.1 train a converted
SpikingJelly conv net (conv, batch norm, LIFNode, linear, LIFNode; multi-step) for a few SGD
steps on per-rank batches; the gradients of every step and the final parameters equal those of one
process training on the same batches (the mean of the two shards' gradients, as DistributedDataParallel
gives: tests/test_reliability.py). Bounded in time; see docs/reliability.md, Distributed training."""

import functools
import os
import socket
import time
import warnings

import pytest
import torch
from torch import nn

import revpass
from revpass.state import reset_states

WORLD, B, STEPS, LR = 2, 2, 3, 0.1  # processes, batch per process, SGD steps, learning rate
DEADLINE_S = 120


class ConvNet(nn.Module):
    """Conv -> BatchNorm -> LIF -> Linear -> LIF, multi-step SpikingJelly (in reversible mode the
    batch norm is folded into the first LIF's reversible node). No ParametricLIFNode: its scalar
    parameter ``w`` is refused by fully_shard ("doesn't support scalar parameters"), converted or not."""

    def __init__(self):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron

        self.conv = layer.Conv2d(2, 4, 3, padding=1, bias=False, step_mode="m")
        self.bn = layer.BatchNorm2d(4, step_mode="m")
        self.sn1 = neuron.LIFNode(step_mode="m")
        self.flat = layer.Flatten(step_mode="m")
        self.fc = layer.Linear(4 * 6 * 6, 6, step_mode="m")
        self.sn2 = neuron.LIFNode(step_mode="m")

    def forward(self, x):
        return self.sn2(self.fc(self.flat(self.sn1(self.bn(self.conv(x))))))


def _data():
    """Inputs (STEPS, T, WORLD * B, C, H, W) and loss weights (STEPS, T, WORLD * B, 6)."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(STEPS, 4, WORLD * B, 2, 6, 6, generator=g) * 2, torch.randn(STEPS, 4, WORLD * B, 6, generator=g)


def _model(mode):
    torch.manual_seed(0)
    return revpass.convert(ConvNet(), _data()[0][0][:, :B], mode=mode)


def _loss(gm, step, rank):
    x, w = _data()
    sl = slice(rank * B, (rank + 1) * B)
    reset_states(gm)
    return (gm(x[step][:, sl]) * w[step][:, sl]).sum()


# FSDP layouts: each child with parameters is an FSDP unit of its own, then the root; a batch norm
# folded into a reversible node (revpass/nodes/batchnorm.py) is called inside that node, not by the
# graph, so it is left in the root's unit ("apart"), grouped with its node ("with-node":
# fully_shard([bn, node])), or given a unit of its own ("alone": the node runs inside bn's FSDP
# forward, see test_a_folded_batch_norm_as_its_own_fsdp_unit)
CONFIGS = {  # name: (mode, layout)
    "reversible": ("reversible", "apart"),
    "reversible-bn-with-node": ("reversible", "with-node"),
    "exact": ("exact", "apart"),
    "reversible-bn-alone": ("reversible", "alone"),
}


def _units(gm, layout):
    """The FSDP units below the root: {name: module or list of modules}."""
    folds = {id(m.folded_bn): n for n, m in gm.named_children() if getattr(m, "folded_bn", None) is not None}
    units = {}
    for n, m in gm.named_children():
        if id(m) in folds and layout == "apart":
            continue
        if id(m) in folds and layout == "with-node":
            units[f"{n}+{folds[id(m)]}"] = [m, gm.get_submodule(folds[id(m)])]
        elif any(True for _ in m.parameters()):
            units[n] = m
    return units


def _train(name, rank, mesh):
    """Shard configuration ``name``'s model over ``mesh`` and train it STEPS steps on this rank's
    batches: every step's full gradients, the full final parameters."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor, Shard

    mode, layout = CONFIGS[name]
    gm = _model(mode)
    units = _units(gm, layout)
    for u in units.values():
        fully_shard(u, mesh=mesh)
    fully_shard(gm, mesh=mesh)
    assert all(isinstance(m, FSDPModule) for u in [gm, *units.values()] for m in (u if isinstance(u, list) else [u]))
    local = {}
    for n, p in gm.named_parameters():
        assert isinstance(p, DTensor) and p.placements == (Shard(0),), n
        local[n] = p.to_local().numel()
    opt = torch.optim.SGD(gm.parameters(), lr=LR)
    grads = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _loss(gm, step, rank).backward()
        grads.append({n: p.grad.full_tensor() for n, p in gm.named_parameters()})  # a collective
        opt.step()
    params = {n: p.full_tensor().detach() for n, p in gm.named_parameters()}
    return {"grads": grads, "params": params, "local_numel": local, "units": sorted(units)}


def _worker(rank, port, configs, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)  # two processes on what may be two cores
    # SpikingJelly's multi-step layers return views (reshapes); nothing writes into them in place
    # (the gradients below say so): FSDP's warning about that is noise here
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {name: _train(name, rank, mesh) for name in configs}
        if rank == 0:
            torch.save(results, out)
        # both ranks done with every collective before either tears gloo down: without it, a rank
        # could destroy its process group while gloo's threads still served the other, and abort
        # at exit ("terminate called without an active exception", seen once in a few runs)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # done and saved: leave without the interpreter's teardown, where gloo's threads still aborted
    # a rank now and then after the barrier (SIGABRT, "terminate called without an active
    # exception": once in each of the last two rounds of full runs); an exception above still propagates
    os._exit(0)


def _run_fsdp(tmp, configs):
    """Train each of ``configs`` under fully_shard in two spawned processes; rank 0's results (full
    gradients per step, full final parameters). Fails the test if the processes have not finished
    in DEADLINE_S."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / "fsdp.pt"
    ctx = mp.start_processes(_worker, args=(port, tuple(configs), str(out)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.time() + DEADLINE_S
    while not ctx.join(timeout=2):  # raises ProcessRaisedException with the worker's traceback
        if time.time() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"fully_shard training with gloo (2 processes: {', '.join(configs)}) did not "
                        f"finish in {DEADLINE_S} s: a collective hung (processes killed)")
    return torch.load(out)


@functools.lru_cache(maxsize=None)
def _reference(mode):
    """One process, the same batches: each step the mean of the two shards' gradients, then SGD."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: a conv's weight gradient sums in another order otherwise
    try:
        return _reference_steps(mode)
    finally:
        torch.set_num_threads(threads)


def _reference_steps(mode):
    gm = _model(mode)
    opt = torch.optim.SGD(gm.parameters(), lr=LR)
    grads = []
    for step in range(STEPS):
        shards = []
        for r in range(WORLD):
            gm.zero_grad(set_to_none=True)
            _loss(gm, step, r).backward()
            shards.append({n: p.grad.clone() for n, p in gm.named_parameters()})
        for n, p in gm.named_parameters():
            p.grad = sum(s[n] for s in shards) / WORLD
        grads.append({n: p.grad.clone() for n, p in gm.named_parameters()})
        opt.step()
    return grads, {n: p.detach().clone() for n, p in gm.named_parameters()}


def _check(got, mode):
    grads, params = _reference(mode)
    assert set(got["params"]) == set(params) == {
        "conv.weight", "bn.weight", "bn.bias", "fc.weight", "fc.bias"}
    # sharded for real: each rank holds half of every parameter (all have an even first dimension)
    assert got["local_numel"] == {n: p.numel() // WORLD for n, p in params.items()}
    for step in range(STEPS):
        for n, g in grads[step].items():
            assert torch.equal(got["grads"][step][n], g), (mode, step, n, (got["grads"][step][n] - g).abs().max())
    for n, p in params.items():
        assert torch.equal(got["params"][n], p), (mode, n, (got["params"][n] - p).abs().max())
    # the training did something: gradients not all zero (spikes reached the loss)
    assert all(any(g[n].abs().sum() > 0 for g in grads) for n in params), mode


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    """One pair of processes for every configuration (spawning costs seconds)."""
    return _run_fsdp(tmp_path_factory.mktemp("fsdp"), tuple(CONFIGS))


_UNITS = {"reversible": ["conv", "fc"], "reversible-bn-with-node": ["bn+sn1", "conv", "fc"],
          "exact": ["bn", "conv", "fc"]}


@pytest.mark.parametrize("config", list(_UNITS))
def test_fully_shard_gloo_two_processes_equals_one_process(fsdp_results, config):
    got = fsdp_results[config]
    assert got["units"] == _UNITS[config]
    _check(got, CONFIGS[config][0])


def test_a_folded_batch_norm_as_its_own_fsdp_unit(fsdp_results):
    """fully_shard(bn) on a batch norm folded into a reversible node: outside bn's own forward its
    parameters are sharded, and that forward runs inside the node's autograd Function (no backward
    hooks), so the node runs inside bn's FSDP forward (revpass/nodes/batchnorm.run). It used to fail
    in backward ('aten.sub_.Tensor got mixed torch.Tensor and DTensor')."""
    got = fsdp_results["reversible-bn-alone"]
    assert got["units"] == ["bn", "conv", "fc"]
    _check(got, "reversible")
