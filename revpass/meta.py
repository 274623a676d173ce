"""The node.meta schema: every fact revpass writes on a graph's nodes, in one place.

``node.meta[KEY]`` (and the same dict under ``node.meta["custom"][KEY]``, which torch.export
carries into exported programs and ONNX files) holds a :class:`NodeInfo` as a plain dict, so
that it survives copying, pickling and JSON. The other keys are written by the rewriting passes
and read by the annotator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

from torch import fx

#: node.meta key of the memory annotations (a NodeInfo as a dict)
KEY = "revpass"
#: torch.export keeps node.meta[CUSTOM]: the annotations are copied there too
CUSTOM = "custom"
#: the names of the nodes of the graph before conversion that this node stands for
REPLACES = "revpass_replaces"
#: (strategy, reason) of a node that is no neuron site itself (a recomputed segment)
STRATEGY = "revpass_strategy"
#: the path of the batch norm folded into this node
FOLDED = "revpass_folded"


@dataclass
class NodeInfo:
    """What revpass knows of one node after :func:`revpass.analysis.annotate.annotate`."""

    shape: Optional[List[int]]  # of the node's output (None for non-tensors)
    dtype: Optional[str]
    kept_bytes: int  # bytes it keeps for backward, measured on this graph
    strategy: str = "-"  # "reversible" | "exact" | "recompute" | "unchanged" at sites, "-" elsewhere
    reason: str = ""
    forward_step: Optional[int] = None  # its position in the forward
    backward_step: Optional[int] = None  # the step of the backward that frees what it keeps
    kept_bytes_before: Optional[int] = None  # the same, over the nodes it replaced, before conversion
    workspace_bytes: Optional[int] = None  # nodes and segments: what their backward allocates besides gradients
    forward_bytes: Optional[int] = None  # module calls: the most their forward holds at once beyond what existed before

    def as_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items()
                if v is not None or k not in ("kept_bytes_before", "workspace_bytes", "forward_bytes")}


def info(n: fx.Node) -> Optional[Dict[str, Any]]:
    """The node's annotations (a NodeInfo's dict), or None when the graph is not annotated."""
    return n.meta.get(KEY)


def write(n: fx.Node, node_info: NodeInfo) -> None:
    """Annotate ``n`` (both copies: node.meta and what torch.export keeps)."""
    d = node_info.as_dict()
    n.meta[KEY] = d
    n.meta.setdefault(CUSTOM, {})[KEY] = dict(d)


def update(n: fx.Node, **fields: Any) -> None:
    """Change some annotations of an annotated node (both copies)."""
    n.meta[KEY].update(fields)
    n.meta.setdefault(CUSTOM, {}).setdefault(KEY, {}).update(fields)


def replaces(n: fx.Node) -> List[str]:
    """The names of the nodes of the unconverted graph that ``n`` stands for (itself if none)."""
    return list(n.meta.get(REPLACES, [n.name]))


def set_replaces(n: fx.Node, names: List[str]) -> None:
    n.meta[REPLACES] = list(names)


def strategy(n: fx.Node) -> Optional[Tuple[str, str]]:
    """(strategy, reason) set on a node that is no site itself (a recomputed segment), or None."""
    return n.meta.get(STRATEGY)


def set_strategy(n: fx.Node, strategy_: str, reason: str) -> None:
    n.meta[STRATEGY] = (strategy_, reason)


def folded(n: fx.Node) -> Optional[str]:
    """The path of the batch norm folded into node ``n``'s module, or None."""
    return n.meta.get(FOLDED)


def set_folded(n: fx.Node, path: str) -> None:
    n.meta[FOLDED] = path
