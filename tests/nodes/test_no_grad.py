"""Without gradients an exact node runs its forward without the records a backward reads: the
same spikes and final state, bit for bit, and no (K, T, ...) tensor of records (a recomputed
segment's forward, inference)."""

import torch

import revpass
from revpass.nodes import ops


def test_exact_node_without_grad_keeps_no_records(monkeypatch):
    from spikingjelly.activation_based import neuron

    node = revpass.ExactNode.from_neuron(neuron.LIFNode(step_mode="m", tau=1.7, v_reset=None))
    x = torch.randn(5, 3, 4, 6) * 2
    y_grad = node(x.requires_grad_(True))
    state_grad = node.state
    node.reset()
    calls = []
    monkeypatch.setattr(ops, "run_op", lambda *a: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    with torch.no_grad():
        y = node(x)
    assert calls == [] and torch.equal(y, y_grad) and torch.equal(node.state[0], state_grad[0])


def test_without_grad_no_sequence_of_records_is_made():
    from spikingjelly.activation_based import neuron

    node = revpass.ExactNode.from_neuron(neuron.LIFNode(step_mode="m"))
    node.carry_state = False
    x = torch.randn(6, 2, 3, 5)
    made = {}

    class Sequences(torch.utils._python_dispatch.TorchDispatchMode):
        """Counts tensors made with a whole sequence's elements (T * B * ...)."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() == x.numel():  # storages, not views
                    made.setdefault(self.mode, set()).add(t.untyped_storage().data_ptr())
            return out

    for grad in (True, False):
        xx = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad), ops.visible_internals():
            mode = Sequences()
            mode.mode = grad
            with mode:
                out = node(xx)
        made[grad].discard(xx.untyped_storage().data_ptr())
        del out
    assert len(made[True]) == 2 and len(made[False]) == 1  # spikes and H with gradients; spikes alone without
