import torch

from revpass.memory import saved_bytes


def test_counts_live_saved_storages_once_and_excludes_inputs():
    x = torch.randn(1000, requires_grad=True)

    def fn():
        a = x * 2  # mul by a constant saves nothing
        y = a.sin()  # keeps a (4000 bytes)
        z = a * a  # keeps a again: same storage, counted once
        return y + z

    _, rep = saved_bytes(fn, exclude=[x])
    assert rep.total == 4000


def test_a_branch_freed_during_the_forward_is_not_counted():
    x = torch.randn(1000, requires_grad=True)

    def fn():
        a = x * 2
        _ = (a.sin() * 3).detach()  # its graph (which saved a) dies here
        return x.exp()  # keeps its output (4000 bytes)

    out, rep = saved_bytes(fn, exclude=[x], output_of=lambda o: [o])
    assert rep.total == 4000
    assert rep.shared_with_output == 4000
