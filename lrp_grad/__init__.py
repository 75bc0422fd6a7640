"""lrp_grad: Layer-wise Relevance Propagation for Keras image classifiers (Keras 3 and tf-keras).

Each supported layer is re-expressed as a function wrapped in ``tf.custom_gradient`` whose
backward pass is an LRP rule; one ``tf.GradientTape`` pass over the rewritten model yields the
relevance of every input element for a whole batch.

>>> import lrp_grad                                            # doctest: +SKIP
>>> R = lrp_grad.explain(model, x, target=y, rule=lrp_grad.Epsilon(1e-6))   # doctest: +SKIP
"""
from .errors import (
    ForkedProcessError,
    InvalidInputError,
    InvalidRuleError,
    InvalidTargetError,
    LRPError,
    LRPMemoryError,
    ModelFileError,
    OutputPathError,
    StaleExplainerError,
    UnsupportedLayerError,
    UnsupportedModelError,
)
from ._moved import MOVED, install as _install_moved_paths
from ._quiet import quiet_tensorflow
from .core.rules import AlphaBeta, AttnLRP, CPLRP, Epsilon, Flat, Gamma, Rule, WSquare, Z, ZBox, ZPlus

__version__ = "0.1.0"

_install_moved_paths(__name__)

# Everything that needs TensorFlow or Keras is imported on first use, so that ``import lrp_grad``
# (and ``lrp-grad --help``) stays fast and quiet; ``lrp_grad.heatmap.render(...)`` and
# ``lrp_grad.evaluate.seed_flip(...)`` work right after ``import lrp_grad``. (No submodule may be
# named like a lazy attribute: importing it would bind the module over the attribute; hence
# ``api/explainer.py`` for ``explain``.)
_LAZY_ATTRIBUTES = {
    "Composite": "core.composites", "RuleMap": "core.composites",
    "DEFAULT_RULE": "api.explainer", "Explainer": "api.explainer", "RelevanceReport": "api.report",
    "explain": "api.cache",
    "Explanation": "visual.explanation", "RelevanceCallback": "integrations.callbacks",
    "load_model": "frontends",
    "Handler": "core.handlers", "register_handler": "core.handlers", "supported_layers": "core.handlers",
    "unregister_handler": "core.handlers",
}
#: The package's layers and product parts, the public heatmap namespace, and the module paths of the
#: flat 0.1 layout (aliases, see :mod:`lrp_grad._moved`).
_LAZY_MODULES = ("frontends", "core", "api", "concepts", "pipelines", "integrations", "visual", "evaluate", "app",
                 "heatmap") + tuple(MOVED)


def __getattr__(name):
    import importlib

    if name in _LAZY_ATTRIBUTES:
        value = getattr(importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lrp_grad' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES) | set(_LAZY_MODULES))


__all__ = [
    "explain", "Explainer", "RelevanceReport", "Explanation", "RelevanceCallback", "DEFAULT_RULE", "load_model",
    "Rule", "Z", "Epsilon", "AlphaBeta", "ZPlus", "Flat", "WSquare", "ZBox", "Gamma", "AttnLRP", "CPLRP",
    "Composite", "RuleMap", "presets", "canonizers", "datasets",
    "Handler", "register_handler", "unregister_handler", "supported_layers",
    "LRPError", "UnsupportedModelError", "UnsupportedLayerError", "InvalidInputError",
    "InvalidTargetError", "InvalidRuleError", "ModelFileError", "StaleExplainerError", "LRPMemoryError",
    "OutputPathError", "ForkedProcessError", "quiet_tensorflow",
]
