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


def _storage_trace(tracker_cls, make):
    """(total, peak) after each step of a small program run under a tracker; ``make`` builds it
    from the external tensors it is told of."""
    x = torch.randn(64, 16)
    mt = make(x)
    seen = []
    with mt:
        a = x * 2                                   # 4096 bytes
        seen.append(tracker_cls(mt))
        v = a.view(16, 64).t()                      # a view of a: nothing new
        _ = x[:8]                                   # a view of the external x: nothing new
        seen.append(tracker_cls(mt))
        vals, idx = torch.max(a, dim=1)             # a tuple: 256 + 512 (int64) bytes
        seen.append(tracker_cls(mt))
        b = (a + 1).exp()                           # a + 1 is freed at once: peak 4096 * 3 + 768
        del a, v
        seen.append(tracker_cls(mt))
        b.untyped_storage().resize_(0)              # freed in Python, no operation: at once
        seen.append(tracker_cls(mt))
        c = torch.ones(10, dtype=torch.float64)     # 80 bytes
        seen.append(tracker_cls(mt))
        del vals, idx, b, c
    return seen


def test_the_storage_tracker_counts_what_memtracker_counts_at_every_point():
    """revpass.memory.StorageTracker (the planner's workspace and forward measurements) keeps the
    running total and peak of torch's MemTracker, views, tuples and a resize_ included."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from revpass.memory import StorageTracker, tracker_bytes

    def memtracker(x):
        mt = MemTracker()
        mt.track_external(x)
        return mt

    lean = _storage_trace(lambda mt: (mt.total, mt.peak), StorageTracker)
    torch_ = _storage_trace(lambda mt: (tracker_bytes(mt.get_tracker_snapshot()),
                                        tracker_bytes(mt.get_tracker_snapshot("peak"))), memtracker)
    x = 4096
    assert lean == [(2 * x, 2 * x), (2 * x, 2 * x), (2 * x + 768, 2 * x + 768),
                    (2 * x + 768, 4 * x + 768), (x + 768, 4 * x + 768), (x + 848, 4 * x + 768)]
    assert lean == torch_
