"""Replacement nodes for spiking neurons: reversible and exact, each one custom op."""

from revpass.nodes.modules import ExactNode, Node, ReversibleNode

__all__ = ["Node", "ReversibleNode", "ExactNode"]
