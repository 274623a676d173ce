"""revpass: reversible spiking-neuron nodes and the torch.fx pass that puts them in your model."""

from revpass.errors import RevpassError, UnsupportedNeuronError
from revpass.neurons import NeuronSpec, Surrogate, lif_spec, register_neuron, spec_from_module

__version__ = "0.1.0"
from revpass.nodes import ExactNode, ReversibleNode  # noqa: E402

__all__ = [
    "RevpassError",
    "UnsupportedNeuronError",
    "NeuronSpec",
    "Surrogate",
    "lif_spec",
    "register_neuron",
    "spec_from_module",
    "ReversibleNode",
    "ExactNode",
]
from revpass.api import convert  # noqa: E402

__all__ += ["convert"]
from revpass.verify import verify  # noqa: E402

__all__ += ["verify"]
from revpass.plan import plan  # noqa: E402

__all__ += ["plan"]
from revpass.planner import BudgetError  # noqa: E402

__all__ += ["BudgetError"]
from revpass.export import export_onnx, write_graph  # noqa: E402

__all__ += ["export_onnx", "write_graph"]
