"""The registry of supported layers: which Keras layer class (or raw operation) is propagated how.

The table is written once by class name and holds both Keras packages' classes of that name
(Keras 3 and tf-keras layers read the same attributes here). Handlers are matched by the layer's
exact class (a subclass may override ``call`` and would be
mishandled silently), so the table of built-in handlers (``_BY_NAME`` in :mod:`lrp_grad.core.layers`)
is also the coverage ledger: a class that is not in it is reported as unsupported, with every
offending layer listed at once. Users add their own classes with :func:`register_handler`.

Handler kinds:

``linear``
    ``z = F(x, W) + b``, linear in ``x``; the layer's rule decides the relevance. Families:
    ``dense``, ``conv`` (layers with weights), ``pool`` (average pooling), ``norm`` (an unfolded
    BatchNormalization, a LayerNormalization with its scale held constant), ``merge`` (Add: a sum
    with unit weights) and ``attention`` (attention cores and products of two tensors, whose rule
    is AttnLRP or CP-LRP: not linear, but rule-taking the same way).
``passthrough``
    Relevance passes through unchanged (elementwise activations, preprocessing); a softmax inside
    the network takes the softmax rule.
``gradient``
    The plain gradient already is the LRP redistribution: reshapes, padding, cropping,
    concatenation, nearest upsampling (relevance is moved back) and max pooling (winner takes all).
``identity``
    The identity at inference (Dropout and friends).
``gate``
    Multiply: all relevance goes to the gated signal, none to the gate; which input is the gate
    is read from the graph (:mod:`lrp_grad.gating`). Without a gate, half to each factor.
``forward``
    Computed, never given relevance: the planner's handler (:data:`FORWARD_ONLY`) for a layer
    without a handler of its own on a branch that only feeds gates (an attention softmax, an
    unsupported operation inside a squeeze-and-excitation branch).

Raw operations (:class:`~lrp_grad.frontends.RawOp`: ``x + y``, ``x * 2``, ``keras.ops.*``,
tf-keras' ``TFOpLambda``) get the handler of the layer they stand for, by kind: a sum of tensors
is an ``Add``, a product of two tensors a ``Multiply``, arithmetic with a constant and activation
functions pass relevance through, reshapes/slices/concatenations route it, and ``mean``/``sum``
over non-batch axes are weight-free linear layers of the ``pool`` family
(:mod:`lrp_grad.core.raw_ops`).

:class:`Context` and :class:`Handler` are defined in :mod:`lrp_grad.core.handler_types`, the
activation sets in :mod:`lrp_grad.core.activations`; this module re-exports them, and the built-in
handlers other modules use (:data:`IDENTITY`, :data:`FUSED_RELU`, :data:`FORWARD_ONLY`,
:func:`is_plain_relu`, :func:`batch_norm_affine`), so ``lrp_grad.handlers.X`` keeps working.
"""
from __future__ import annotations

from ..frontends import AttentionCore, RawOp, is_layer_class
from .activations import ELEMENTWISE, HEADS, NONNEG, ZERO_AT_ZERO
from .handler_types import FAMILIES, KINDS, Context, Handler
from .layers import (_BUILTIN, _BY_NAME, _SHORTCUTS, EFFECTIVE_BASES, EFFECTIVE_CONV, FORWARD_ONLY, FUSED_RELU,
                     IDENTITY, is_plain_relu)
from .linear_layers import batch_norm_affine, effective_kernel
from .raw_ops import _RAW
from .transformer_layers import attention_core, attention_rule_problem

#: The handler of the attention core the front end splits out of a MultiHeadAttention layer.
ATTENTION_CORE = Handler("linear", attention_core, attention_rule_problem, family="attention")

__all__ = ["Context", "Handler", "register_handler", "unregister_handler", "handler_for", "supported_layers",
           "KINDS", "FAMILIES",
           # re-exported for the core modules and tests that reach them through lrp_grad.handlers
           "ELEMENTWISE", "NONNEG", "HEADS", "ZERO_AT_ZERO", "IDENTITY", "FUSED_RELU", "FORWARD_ONLY",
           "is_plain_relu", "batch_norm_affine"]


def _raw_handler(op: RawOp) -> Handler:
    """The handler of a raw operation, by its kind and how many of its operands are tensors."""
    kind, several = op.kind, op.n_tensors > 1
    if kind == "add":
        return _RAW["add_tensors" if several else "shift"]
    if kind == "subtract":
        return _RAW["subtract_tensors" if several else "shift"]
    if kind == "resize":  # several tensors: the image and its size computed from shapes
        return _RAW["resize"]
    if kind == "multiply":
        return _BY_NAME["Multiply"] if several else _RAW["scale"]
    if kind == "divide":
        return _RAW["divide_tensors" if several else "opaque"]
    if kind == "negative":
        return _RAW["scale"]
    if kind == "shape":  # reads only shapes: computed, carries no relevance
        return FORWARD_ONLY
    if kind == "product":
        return _RAW["product" if several else "constant_product"]
    if kind == "activation" and several:  # pow(x, y) of two tensors: no rule
        return _RAW["refused"]
    if kind == "activation" and op.activation == "softmax":
        return _RAW["softmax"]
    if kind in ("route", "activation", "cut"):
        return _RAW[kind]
    if kind == "sum" and several and op.axes == (0,) and not op.keepdims:  # a sum over a list: add_n
        return _RAW["add_tensors"]
    if kind in ("mean", "sum"):
        return _RAW["reduce"]
    return _RAW["unknown"]


_USER: dict = {}
#: Bumped by every register_handler/unregister_handler: plans (and explain()'s cached
#: explainers) built before then are stale.
registry_version = 0


def register_handler(layer_class: type, handler) -> None:
    """Tell lrp_grad how to propagate relevance through ``layer_class``.

    Parameters
    ----------
    layer_class : type
        A ``keras.layers.Layer`` (Keras 3) or ``tf_keras.layers.Layer`` subclass; matched exactly
        (not its subclasses).
    handler : Handler or str
        A :class:`Handler`, or a shortcut: ``'passthrough'`` (elementwise layer, relevance passes
        through unchanged), ``'gradient'`` (the layer's plain gradient redistributes relevance,
        e.g. a reshape or a selection) or ``'identity'`` (identity at inference).

    Examples
    --------
    >>> class Scale(keras.layers.Layer):               # doctest: +SKIP
    ...     def call(self, x):
    ...         return 2.0 * x
    >>> lrp_grad.register_handler(Scale, "passthrough")  # doctest: +SKIP
    """
    if not is_layer_class(layer_class):
        raise TypeError(
            "register_handler: layer_class must be a keras.layers.Layer (Keras 3) or tf_keras.layers.Layer "
            f"subclass, got {layer_class!r}."
        )
    if isinstance(handler, str):
        if handler not in _SHORTCUTS:
            raise ValueError(
                f"register_handler: unknown handler shortcut {handler!r}; use one of "
                f"{sorted(_SHORTCUTS)} or a lrp_grad.handlers.Handler."
            )
        handler = _SHORTCUTS[handler]
    if not isinstance(handler, Handler):
        raise TypeError(
            f"register_handler: handler must be a lrp_grad.handlers.Handler or one of "
            f"{sorted(_SHORTCUTS)}, got {handler!r}."
        )
    global registry_version
    _USER[layer_class] = handler
    registry_version += 1


def unregister_handler(layer_class: type) -> None:
    """Remove a handler added with :func:`register_handler` (built-in handlers stay)."""
    global registry_version
    if _USER.pop(layer_class, None) is not None:
        registry_version += 1


#: Methods a subclass of a supported layer may define without changing what the layer computes
#: at inference (configuration, serialisation, shapes, training-time noise).
_HARMLESS = frozenset(("__init__", "get_config", "from_config", "compute_output_shape", "compute_output_spec",
                       "compute_output_signature", "_get_noise_shape", "__module__", "__qualname__", "__doc__",
                       "__dict__", "__weakref__", "__annotations__", "__firstlineno__", "__static_attributes__",
                       "__classcell__"))


def _overrides(cls, base) -> list:
    """The methods that ``cls`` and its ancestors below ``base`` define beyond :data:`_HARMLESS`."""
    found = []
    for klass in cls.__mro__:
        if klass is base:
            break
        found += [name for name, value in vars(klass).items()
                  if name not in _HARMLESS and (callable(value) or isinstance(value, (property, staticmethod,
                                                                                       classmethod)))]
    return found


def subclass_problem(layer) -> str | None:
    """Why a subclass of a supported layer class does not get its base class's handler (or ``None``)."""
    cls = type(layer)
    for base in cls.__mro__[1:]:
        if _USER.get(base) or _BUILTIN.get(base):
            methods = _overrides(cls, base)
            if methods:
                return (f"a subclass of {base.__name__} that overrides {', '.join(sorted(methods))}; lrp_grad "
                        f"explains subclasses that keep {base.__name__}'s computation (only configuration and "
                        "training-time methods overridden). Register a handler for it "
                        "(lrp_grad.register_handler) if it computes what its base class does")
            return None
    return None


def _resolved(handler, layer):
    """A table entry is a Handler, or a function of the layer choosing one by its configuration."""
    return handler(layer) if handler is not None and not isinstance(handler, Handler) else handler


def handler_for(layer) -> Handler | None:
    """The handler of ``layer``'s exact class (user registrations first), else of the nearest
    supported base class when the subclass keeps its computation (``FixedDropout(Dropout)``), or
    ``None``; a raw operation gets the handler of its kind."""
    if isinstance(layer, RawOp):
        return _raw_handler(layer)
    if isinstance(layer, AttentionCore):
        return ATTENTION_CORE
    cls = type(layer)
    exact = _USER.get(cls) or _BUILTIN.get(cls)
    if exact is not None:
        return _resolved(exact, layer)
    for base in cls.__mro__[1:]:
        inherited = _USER.get(base) or _BUILTIN.get(base)
        if inherited is not None:
            overrides = _overrides(cls, base)
            if not overrides:
                return _resolved(inherited, layer)
            if _computes_its_kernel(layer, base, overrides):
                return EFFECTIVE_CONV
            return None
    return None


def _computes_its_kernel(layer, base, overrides) -> bool:
    """Whether a subclass of a built-in convolution keeps its ``call`` and convolves with a kernel
    computed from its own weights (checked on its output: :func:`effective_kernel`)."""
    return (base in _BUILTIN and base.__name__ in EFFECTIVE_BASES and "call" not in overrides
            and effective_kernel(layer) is not None)


#: Layer classes the front ends split into supported parts (lrp_grad.frontends.blocks).
SPLIT_LAYERS = ("MultiHeadAttention",)


def supported_layers() -> list:
    """Names of the layer classes that have a handler, built-in and registered, and of those the
    front ends split into parts that have one."""
    return sorted({cls.__name__ for cls in (*_BUILTIN, *_USER)} | set(SPLIT_LAYERS))
