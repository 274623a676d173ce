"""Exceptions raised by revpass. Each message names the module, the setting and the fix."""


class RevpassError(Exception):
    """Base class of revpass's errors."""


class UnsupportedNeuronError(RevpassError, ValueError):
    """A neuron, or one of its settings, cannot be represented by revpass's nodes."""


class ExampleInputError(RevpassError, ValueError):
    """The model does not run on the example inputs given to revpass (their shape or dtype)."""


class TimeStepsError(RevpassError, ValueError):
    """A converted model whose time loop was unrolled at one number of steps, run at another."""


class ShapeAssumedError(TimeStepsError):
    """A converted model whose forward read its inputs' shapes while tracing, run at another shape."""


class RevpassWarning(UserWarning):
    """Something revpass could not do as asked, said once (the report says more)."""
