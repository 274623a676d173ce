"""Roll a single-step neuron's unrolled time loop into one sequence node.

The T calls of one neuron become ``stack(inputs) -> node -> unbind``. networkx proves that it is
safe: no input of any call may depend on an output of the same neuron (a recurrent neuron, such as
snnTorch's RLeaky, feeds itself), and each call's state outputs may be read only by the neuron's
next call (a membrane that feeds the loss is left alone, with the reason).
"""

from __future__ import annotations

import operator
from typing import Dict, List, Tuple

import networkx as nx
import torch
from torch import fx

from revpass.passes.detect import Site


def _getitems(node: fx.Node) -> Dict[int, fx.Node]:
    out = {}
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
            out[u.args[1]] = u
    return out


def _is_fresh_state(arg) -> bool:
    """None, or a fresh empty tensor (what snnTorch's init_leaky becomes when traced)."""
    if arg is None:
        return True
    if isinstance(arg, (tuple, list)):
        return all(_is_fresh_state(a) for a in arg)
    return (
        isinstance(arg, fx.Node)
        and arg.op == "call_function"
        and arg.target is torch.zeros
        and tuple(arg.args) == (0,)
    )


def plan_roll(site: Site, g: nx.DiGraph) -> Tuple[bool, str, Dict[str, object]]:
    """Can this site's calls be rolled? Returns (ok, reason, plan)."""
    calls = site.calls
    call_set = set(calls)
    # everything the neuron produces: its calls and the getitems of their tuple outputs
    produced = set(calls)
    for c in calls:
        produced.update(_getitems(c).values())
    for t, c in enumerate(calls):
        if c.kwargs:
            return False, f"call {t} passes keyword arguments {sorted(c.kwargs)}", {}
        x = c.args[0]
        if not isinstance(x, fx.Node):
            return False, f"call {t}: the input is not a tensor of the graph", {}
        dep = nx.ancestors(g, x) | {x}
        if dep & produced:
            return False, (
                f"the input of step {t} depends on this neuron's own outputs (a recurrent "
                "connection): its steps cannot be computed as one sequence"
            ), {}
    spikes: List[fx.Node] = []
    drop: List[fx.Node] = []
    for t, c in enumerate(calls):
        states_in = list(c.args[1:])
        items = _getitems(c)
        other_users = [u for u in c.users if u not in items.values()]
        if items and other_users:
            return False, f"call {t}'s output tuple is used whole by {other_users[0].name}", {}
        if t == 0:
            if not all(_is_fresh_state(a) for a in states_in):
                return False, "the first call's initial state is not the reset state", {}
        else:
            prev_items = _getitems(calls[t - 1])
            expected = [prev_items.get(i) for i in range(1, 1 + len(states_in))]
            nested = len(states_in) == 1 and isinstance(states_in[0], (tuple, list))
            flat_in = list(states_in[0]) if nested else states_in
            if flat_in != expected[: len(flat_in)] and states_in:
                return False, f"call {t}'s state is not the previous call's state", {}
        if items:
            spikes.append(items.get(0))
            for i, node in items.items():
                if i == 0:
                    continue
                readers = [u for u in node.users if u not in call_set]
                if readers:
                    return False, (
                        f"its state (output {i} of step {t}) is read by '{readers[0].name}', not "
                        "only by its own next step (a membrane recorded for the output or the loss): "
                        "the model then keeps every step's state itself, which is what a node saves "
                        "by dropping, so it is left as it is"
                    ), {}
                drop.append(node)
        else:
            spikes.append(c)
    return True, "", {"spikes": spikes, "drop": drop}
