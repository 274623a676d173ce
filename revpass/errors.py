"""Exceptions raised by revpass. Each message names the module, the setting and the fix."""


class RevpassError(Exception):
    """Base class of revpass's errors."""


class UnsupportedNeuronError(RevpassError, ValueError):
    """A neuron, or one of its settings, cannot be represented by revpass's nodes."""
