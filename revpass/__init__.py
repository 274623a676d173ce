"""revpass: reversible spiking-neuron nodes and the torch.fx pass that puts them in your model."""

from revpass.api import convert, plan
from revpass.errors import ExampleInputError, RevpassError, RevpassWarning, TimeStepsError, UnsupportedNeuronError
from revpass.export import export_onnx, write_graph
from revpass.neurons import NeuronSpec, Surrogate, lif_spec, register_neuron, spec_from_module
from revpass.nodes import ExactNode, Node, ReversibleNode
from revpass.planning.budget import BudgetError, Peak
from revpass.verify import verify

__version__ = "0.1.0"

__all__ = [
    "RevpassError",
    "UnsupportedNeuronError",
    "ExampleInputError",
    "RevpassWarning",
    "TimeStepsError",
    "BudgetError",
    "Peak",
    "NeuronSpec",
    "Surrogate",
    "lif_spec",
    "register_neuron",
    "spec_from_module",
    "Node",
    "ReversibleNode",
    "ExactNode",
    "convert",
    "plan",
    "verify",
    "export_onnx",
    "write_graph",
]
