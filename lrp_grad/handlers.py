"""The registry of supported layers: which Keras layer class is propagated how.

Handlers are matched by the layer's exact class (a subclass may override ``call`` and would be
mishandled silently), so the table below is also the coverage ledger: a class that is not in it
is reported as unsupported, with every offending layer listed at once. Users add their own
classes with :func:`register_handler`.

Four kinds of handler exist:

``linear``
    A weighted layer ``z = F(x, W) + b``; the active rule decides the relevance (Dense, Conv2D).
``passthrough``
    An elementwise layer; relevance passes through unchanged (ReLU, Activation).
``gradient``
    A layer whose plain gradient already is the LRP redistribution: reshapes (relevance is
    reshaped back) and max pooling (winner takes all).
``identity``
    A layer that is the identity at inference (Dropout).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import tensorflow as tf

from . import propagate
from ._keras import activation_name, keras

__all__ = ["Context", "Handler", "register_handler", "handler_for", "supported_layers", "unregister_handler"]

#: Elementwise activations: relevance passes through them unchanged.
ELEMENTWISE = frozenset(
    "linear relu relu6 elu selu tanh sigmoid hard_sigmoid softplus softsign swish silu gelu "
    "exponential leaky_relu mish".split()
)
#: Activations whose output is never negative: the next layer may skip the ``x-`` half.
NONNEG = frozenset("relu relu6 sigmoid hard_sigmoid softplus exponential".split())


@dataclass(frozen=True)
class Context:
    """What a handler knows when it builds one layer call of the rewritten forward pass.

    Attributes
    ----------
    rule : Rule or None
        The LRP rule for a ``linear`` layer (``None`` for the others).
    nonneg : tuple of bool
        Per input tensor: whether it is guaranteed to be non-negative.
    is_output : bool
        Whether this call produces the model output (a final softmax is then skipped).
    """

    rule: object = None
    nonneg: tuple = ()
    is_output: bool = False


def _no_problem(layer, is_output):
    return None


def _keeps_sign(layer, flags):
    return all(flags)


@dataclass(frozen=True)
class Handler:
    """How one layer class takes part in the rewritten forward pass.

    Attributes
    ----------
    kind : str
        ``'linear'``, ``'passthrough'``, ``'gradient'`` or ``'identity'`` (see module docs).
    apply : callable
        ``apply(layer, inputs, ctx) -> tensor``: the layer's forward computation, built from
        :mod:`lrp_grad.propagate` primitives so that its gradient is the relevance.
    check : callable
        ``check(layer, is_output) -> str or None``: why this layer's configuration is not
        supported, or ``None``.
    nonneg : callable
        ``nonneg(layer, input_flags) -> bool``: whether the output is guaranteed ``>= 0``.
    """

    kind: str
    apply: Callable
    check: Callable = _no_problem
    nonneg: Callable = field(default=lambda layer, flags: False)

    def __post_init__(self):
        if self.kind not in ("linear", "passthrough", "gradient", "identity"):
            raise ValueError(
                f"Handler kind must be 'linear', 'passthrough', 'gradient' or 'identity', got {self.kind!r}."
            )


# ---------------------------------------------------------------------------------------------
# Activations (fused into weighted layers, or as layers of their own)


def _activation_problem(layer, fn, is_output):
    name = activation_name(fn)
    if name in ELEMENTWISE or (name == "softmax" and is_output):
        return None
    if name == "softmax":
        return "softmax is only supported as the model's last operation (it is then skipped)"
    return (
        f"activation {name!r} is not a known elementwise activation; register the layer with "
        "register_handler if relevance should pass through it"
    )


def _activate(layer, fn, z, ctx):
    name = activation_name(fn)
    if name == "linear" or (name == "softmax" and ctx.is_output):
        return z  # a final softmax is skipped: the logits are explained
    return propagate.passthrough(fn, z)


def _activation_nonneg(layer, fn):
    return activation_name(fn) in NONNEG


# ---------------------------------------------------------------------------------------------
# Linear layers


def _dense_forward(x, w):
    if x.shape.rank == 2:
        return tf.matmul(x, w)
    return tf.tensordot(x, w, [[x.shape.rank - 1], [0]])


def _dense_transpose(s, w, x):
    if s.shape.rank == 2:
        return tf.matmul(s, w, transpose_b=True)
    return tf.tensordot(s, w, [[s.shape.rank - 1], [1]])


DENSE_OP = propagate.LinearOp(_dense_forward, _dense_transpose)


def _dilate_kernel(w, rates):
    """Insert ``rate - 1`` zeros between kernel taps (CPU transposed convs lack dilation)."""
    for axis, rate in enumerate(rates):
        if rate == 1:
            continue
        k = w.shape[axis]
        taps = tf.unstack(w, axis=axis)
        zero = tf.zeros_like(taps[0])
        spread = []
        for i, tap in enumerate(taps):
            spread.append(tap)
            if i < k - 1:
                spread.extend([zero] * (rate - 1))
        w = tf.stack(spread, axis=axis)
    return w


def conv2d_op(layer) -> propagate.LinearOp:
    """The :class:`LinearOp` of a channels-last ``Conv2D`` layer."""
    strides = list(layer.strides)
    padding = layer.padding.upper()
    dilations = list(layer.dilation_rate)

    def forward(x, w):
        return tf.nn.convolution(x, w, strides=strides, padding=padding, dilations=dilations, data_format="NHWC")

    def transpose(s, w, x):
        return tf.nn.conv2d_transpose(
            s, _dilate_kernel(w, dilations), tf.shape(x), strides=strides, padding=padding
        )

    return propagate.LinearOp(forward, transpose)


def _weighted(op_for):
    """Handler ``apply`` for a layer with ``kernel``, optional ``bias`` and ``activation``."""

    def apply(layer, inputs, ctx):
        (x,) = inputs
        w = tf.convert_to_tensor(layer.kernel)
        b = tf.convert_to_tensor(layer.bias) if layer.use_bias else None
        z = propagate.linear(x, op_for(layer), w, b, ctx.rule, x_nonneg=ctx.nonneg[0])
        return _activate(layer, layer.activation, z, ctx)

    return apply


def _conv_problem(layer, is_output):
    if layer.data_format != "channels_last":
        return f"data_format={layer.data_format!r}; only 'channels_last' is supported"
    if getattr(layer, "groups", 1) != 1:
        return f"groups={layer.groups}; grouped convolutions are not supported yet"
    return _activation_problem(layer, layer.activation, is_output)


def _dense_problem(layer, is_output):
    return _activation_problem(layer, layer.activation, is_output)


def _weighted_nonneg(layer, flags):
    return _activation_nonneg(layer, layer.activation)


# ---------------------------------------------------------------------------------------------
# Layers without weights


def _max_pool_2d(layer, inputs, ctx):
    (x,) = inputs
    return tf.nn.max_pool2d(x, list(layer.pool_size), list(layer.strides), layer.padding.upper())


def _pool_problem(layer, is_output):
    if layer.data_format != "channels_last":
        return f"data_format={layer.data_format!r}; only 'channels_last' is supported"
    return None


def _flatten(layer, inputs, ctx):
    (x,) = inputs
    return tf.reshape(x, [tf.shape(x)[0], -1])


def _reshape(layer, inputs, ctx):
    (x,) = inputs
    return tf.reshape(x, tf.concat([tf.shape(x)[:1], list(layer.target_shape)], 0))


def _identity(layer, inputs, ctx):
    (x,) = inputs
    return tf.identity(x)


def _activation_layer(layer, inputs, ctx):
    (x,) = inputs
    return _activate(layer, layer.activation, x, ctx)


def _elementwise_layer(layer, inputs, ctx):
    (x,) = inputs
    return propagate.passthrough(layer.call, x)


def _relu_nonneg(layer, flags):
    return float(layer.negative_slope) == 0.0 and float(layer.threshold) >= 0.0


def _softmax_layer(layer, inputs, ctx):
    (x,) = inputs
    return tf.identity(x)


def _softmax_problem(layer, is_output):
    if is_output:
        return None
    return "softmax is only supported as the model's last operation (it is then skipped)"


def _flatten_problem(layer, is_output):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return f"data_format={layer.data_format!r}; only 'channels_last' is supported"
    return None


# ---------------------------------------------------------------------------------------------
# The registry

_L = keras.layers
_BUILTIN = {
    _L.Dense: Handler("linear", _weighted(lambda layer: DENSE_OP), _dense_problem, _weighted_nonneg),
    _L.Conv2D: Handler("linear", _weighted(conv2d_op), _conv_problem, _weighted_nonneg),
    _L.MaxPooling2D: Handler("gradient", _max_pool_2d, _pool_problem, _keeps_sign),
    _L.Flatten: Handler("gradient", _flatten, _flatten_problem, _keeps_sign),
    _L.Reshape: Handler("gradient", _reshape, nonneg=_keeps_sign),
    _L.Dropout: Handler("identity", _identity, nonneg=_keeps_sign),
    _L.Activation: Handler(
        "passthrough",
        _activation_layer,
        lambda layer, o: _activation_problem(layer, layer.activation, o),
        lambda layer, flags: _activation_nonneg(layer, layer.activation),
    ),
    _L.ReLU: Handler("passthrough", _elementwise_layer, nonneg=_relu_nonneg),
    _L.Softmax: Handler("identity", _softmax_layer, _softmax_problem),
}

_USER: dict = {}

_SHORTCUTS = {
    "passthrough": Handler("passthrough", _elementwise_layer),
    "gradient": Handler("gradient", lambda layer, inputs, ctx: layer.call(*inputs)),
    "identity": Handler("identity", _identity, nonneg=_keeps_sign),
}


def register_handler(layer_class: type, handler) -> None:
    """Tell lrp_grad how to propagate relevance through ``layer_class``.

    Parameters
    ----------
    layer_class : type
        A ``tf_keras.layers.Layer`` subclass; matched exactly (not its subclasses).
    handler : Handler or str
        A :class:`Handler`, or a shortcut: ``'passthrough'`` (elementwise layer, relevance passes
        through unchanged), ``'gradient'`` (the layer's plain gradient redistributes relevance,
        e.g. a reshape or a selection) or ``'identity'`` (identity at inference).

    Examples
    --------
    >>> class Scale(tf_keras.layers.Layer):            # doctest: +SKIP
    ...     def call(self, x):
    ...         return 2.0 * x
    >>> lrp_grad.register_handler(Scale, "passthrough")  # doctest: +SKIP
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(
            f"register_handler: layer_class must be a tf_keras.layers.Layer subclass, got {layer_class!r}."
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
    _USER[layer_class] = handler


def unregister_handler(layer_class: type) -> None:
    """Remove a handler added with :func:`register_handler` (built-in handlers stay)."""
    _USER.pop(layer_class, None)


def handler_for(layer) -> Handler | None:
    """The handler of ``layer``'s exact class (user registrations first), or ``None``."""
    cls = type(layer)
    return _USER.get(cls) or _BUILTIN.get(cls)


def supported_layers() -> list:
    """Names of the layer classes that have a handler, built-in and registered."""
    return sorted({cls.__name__ for cls in (*_BUILTIN, *_USER)})
