"""Replacement nodes for spiking neurons: reversible and exact, each one custom op."""

from revpass.nodes.modules import ExactNode, ReversibleNode

__all__ = ["ReversibleNode", "ExactNode"]
