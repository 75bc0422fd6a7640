"""lrp_grad: Layer-wise Relevance Propagation for Keras image classifiers (Keras 3 and tf-keras).

Each supported layer is re-expressed as a function wrapped in ``tf.custom_gradient`` whose
backward pass is an LRP rule; one ``tf.GradientTape`` pass over the rewritten model yields the
relevance of every input element for a whole batch.

>>> import lrp_grad                                            # doctest: +SKIP
>>> R = lrp_grad.explain(model, x, target=y, rule=lrp_grad.Epsilon(1e-6))   # doctest: +SKIP
"""
from .errors import (
    InvalidInputError,
    InvalidRuleError,
    InvalidTargetError,
    LRPError,
    LRPMemoryError,
    ModelFileError,
    StaleExplainerError,
    UnsupportedLayerError,
    UnsupportedModelError,
)
from . import canonizers, datasets, presets
from .composites import Composite, RuleMap
from .explain import DEFAULT_RULE, Explainer, RelevanceReport, explain
from .frontends import load_model
from .handlers import Handler, register_handler, supported_layers, unregister_handler
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, Z, ZBox, ZPlus

__version__ = "0.1.0"

#: Submodules loaded on first use (``lrp_grad.heatmap.render(...)`` works after ``import lrp_grad``).
_LAZY = ("heatmap", "evaluate", "stream", "export", "bench", "demo", "frontends")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lrp_grad' has no attribute {name!r}")

__all__ = [
    "explain", "Explainer", "RelevanceReport", "DEFAULT_RULE", "load_model",
    "Rule", "Z", "Epsilon", "AlphaBeta", "ZPlus", "Flat", "WSquare", "ZBox", "Gamma",
    "Composite", "RuleMap", "presets", "canonizers", "datasets",
    "Handler", "register_handler", "unregister_handler", "supported_layers",
    "LRPError", "UnsupportedModelError", "UnsupportedLayerError", "InvalidInputError",
    "InvalidTargetError", "InvalidRuleError", "ModelFileError",
    "StaleExplainerError", "LRPMemoryError",
]
