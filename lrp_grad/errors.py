"""Exception types raised by lrp_grad; every message names the offending thing and the fix."""


class LRPError(Exception):
    """Base class of every error lrp_grad raises on purpose."""


class UnsupportedModelError(LRPError, TypeError):
    """The model is not a Keras (Keras 3 or tf-keras) Sequential/Functional model lrp_grad can walk."""


class UnsupportedLayerError(LRPError, TypeError):
    """One or more layers have no LRP handler.

    Attributes
    ----------
    layers : list of tuple
        ``(layer_name, class_name, reason)`` for every offending layer.
    """

    def __init__(self, message, layers=()):
        super().__init__(message)
        self.layers = list(layers)


class InvalidInputError(LRPError, ValueError):
    """The input batch ``x`` has the wrong rank, shape, dtype or non-finite values."""


class InvalidTargetError(LRPError, ValueError):
    """``target`` or ``initial`` does not fit the model output or the batch."""


class ModelFileError(LRPError, ValueError):
    """A model file or folder does not exist or cannot be read by either Keras package."""


class ForkedProcessError(LRPError, RuntimeError):
    """TensorFlow was initialised in a parent process that forked this one; it would hang here."""


class OutputPathError(LRPError, ValueError):
    """An output path would overwrite existing files, the model being read or another output."""


class StaleExplainerError(LRPError, RuntimeError):
    """The model's weights changed in a way the Explainer's plan cannot follow; build a new one."""


class LRPMemoryError(LRPError, MemoryError):
    """A batch did not fit in memory; the message names ``batch_size``."""


class InvalidRuleError(LRPError, ValueError):
    """A rule was constructed with parameters outside its valid range."""


class RelevanceAbsorbedWarning(UserWarning):
    """The explained output was so small that the rules' stabiliser absorbed its relevance: the map
    is (nearly) all zero. The message says how much reached the input and which rule to use."""
