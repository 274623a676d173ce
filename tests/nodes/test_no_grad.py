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


def _most_alive(node, x) -> float:
    """The most bytes of step-sized tensors (B, ...) that ``node``'s forward over ``x`` (one
    step) has alive at once besides its input, in steps of float32: a recomputed segment
    rebuilds its chunks' starts so."""
    import weakref

    step = x[0].numel()
    live, most = {}, [0]

    class Steps(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() == step:
                    st = t.untyped_storage()
                    key = st.data_ptr()
                    if key not in live and key != x.untyped_storage().data_ptr():
                        live[key] = st.nbytes()
                        weakref.finalize(st, live.pop, key, None)
                        most[0] = max(most[0], sum(live.values()))
            return out

    with torch.no_grad(), Steps():
        out = node(x)
    del out
    return most[0] / (4 * step)


def test_a_step_without_grad_computes_in_few_buffers():
    """Without gradients a SpikingJelly LIF step computes its charge and reset in place, the same
    operations as with them (bit for bit, the equivalence tests hold it): at most 6 steps' worth
    of buffers alive at once with a hard reset, 5.25 with a soft one (7 and 6 when the charge's
    and the reset's temporaries each had a buffer of their own)."""
    from spikingjelly.activation_based import neuron

    x = torch.randn(1, 4, 3, 8) * 2
    for kw in ({}, {"decay_input": False}, {"v_reset": None}, {"v_reset": None, "decay_input": False}):
        node = revpass.ExactNode.from_neuron(neuron.LIFNode(step_mode="m", tau=1.7, **kw))
        node.carry_state = False
        most = _most_alive(node, x)
        assert most <= (5.25 if "v_reset" in kw else 6), (kw, most)
