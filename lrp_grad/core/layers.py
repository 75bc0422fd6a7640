"""The built-in handlers: how each Keras layer class is propagated, in one table (the coverage ledger).

:data:`_BY_NAME` at the end of this module is the ledger that :mod:`lrp_grad.handlers` matches
layers against: one entry per class name, holding for that class in both Keras packages; a class
that is not in it (nor registered) is unsupported. The weight-free layers' computations (routing,
identity, elementwise, gates) are here, the linear layers' in :mod:`lrp_grad.core.linear_layers`.
Also here: the handlers the planner substitutes (:data:`FUSED_RELU`, :data:`FORWARD_ONLY`) and
those behind ``register_handler``'s shortcuts.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from . import ops, propagate
from ..frontends import RawOp, activation_name, is_layer, layer_classes
from .activations import NONNEG, ZERO_AT_ZERO, _activate, _activation_problem, _fused_nonneg
from .handler_types import Handler, _channels_last, _keeps_sign, _own_call
from .transformer_layers import (
    einsum_dense, einsum_dense_problem, einsum_weights, group_norm, group_norm_problem, inner_softmax, layer_norm, layer_norm_problem, uniform_product,
)
from .linear_layers import (
    _add, _avg_pool_2d, _batch_norm, _batch_norm_problem, _conv_problem, _conv_transpose_problem, _custom_scale,
    _custom_scale_nonneg, _custom_scale_problem, _dense_problem, _fold_conv_transpose, _fold_depthwise,
    _fold_last, _global_avg_pool, _reader, _separable, _weighted, _fixed_linear, _subtract, _subtract_problem,
    effective_reader,
)

# ---------------------------------------------------------------------------------------------
# Layers without weights


def _max_pool_2d(layer, inputs, ctx):
    (x,) = inputs
    return tf.nn.max_pool2d(x, list(layer.pool_size), list(layer.strides), layer.padding.upper())


def _flatten(layer, inputs, ctx):
    (x,) = inputs
    return tf.reshape(x, [tf.shape(x)[0], -1])


def _reshape(layer, inputs, ctx):
    (x,) = inputs
    return tf.reshape(x, tf.concat([tf.shape(x)[:1], list(layer.target_shape)], 0))


def _call(layer, inputs, ctx):
    """The layer's own (weight-free, deterministic) computation; its gradient routes relevance."""
    return _own_call(layer, inputs)


def _identity(layer, inputs, ctx):
    (x,) = inputs
    return tf.identity(x)


def _activation_layer(layer, inputs, ctx):
    (x,) = inputs
    out = _activate(layer.activation, x, ctx)
    # A linear (or skipped head) activation returns its input: a tensor of its own keeps the
    # per-layer report from reading the input's relevance (the input may be shared).
    return tf.identity(out) if out is x else out


def _elementwise_layer(layer, inputs, ctx):
    (x,) = inputs
    return propagate.passthrough(lambda t: _own_call(layer, [t]), x)


def _rescaling(layer, inputs, ctx):
    """``x * scale + offset``, computed in the input's dtype (not in a float16 policy's)."""
    (x,) = inputs
    scale = tf.constant(np.asarray(layer.scale, np.float64), x.dtype)
    offset = tf.constant(np.asarray(layer.offset, np.float64), x.dtype)
    return propagate.passthrough(lambda t: t * scale + offset, x)


def _layer_scale(layer, inputs, ctx):
    """ConvNeXt's LayerScale ``x * gamma`` (a fixed per-channel scale, no bias): relevance passes
    unchanged, which is what LRP-0 gives a one-to-one scale (and epsilon up to its stabiliser;
    a single contribution has no positive/negative parts for alpha-beta to weigh)."""
    (x,) = inputs
    gamma = tf.cast(tf.convert_to_tensor(layer.gamma), x.dtype)
    return propagate.passthrough(lambda t: t * gamma, x)


def _relu_nonneg(layer, flags):
    return float(layer.negative_slope) == 0.0 and float(layer.threshold) >= 0.0


def _relu_zero_at_zero(layer):
    return float(layer.negative_slope) == 0.0 or float(layer.threshold) == 0.0


def is_plain_relu(layer) -> bool:
    """Whether the layer is exactly ``max(x, 0)`` (a ReLU or Activation('relu') layer)."""
    if isinstance(layer, RawOp):
        return layer.kind == "activation" and layer.activation == "relu"
    if is_layer(layer, "Activation"):
        return activation_name(layer.activation) == "relu"
    if is_layer(layer, "ReLU"):
        return (layer.max_value is None and float(layer.negative_slope) == 0.0
                and float(layer.threshold) == 0.0)
    return False


def _resized(layer, t):
    """The layer's own resizing of ``t`` (bilinear/bicubic/area interpolation: linear in ``t``)."""
    return _own_call(layer, [t])


#: Interpolating resize layers: fixed linear maps of the ``pool`` family (nearest UpSampling2D routes).
_INTERPOLATE = Handler("linear", _fixed_linear(_resized), _channels_last, family="pool", fuses_relu=True)


def _upsampling(layer):
    """UpSampling2D: nearest copies route relevance; bilinear interpolation is a fixed linear map."""
    return _NEAREST if layer.interpolation == "nearest" else _INTERPOLATE


def _upsample_nearest(layer, inputs, ctx):
    """Nearest upsampling as repeats (what ``UpSampling2D`` computes): tf-keras calls
    ``tf.image.resize``, whose gradient XLA cannot compile for an unknown batch size."""
    (x,) = inputs
    sh, sw = (int(v) for v in layer.size)
    return tf.repeat(tf.repeat(x, sh, axis=1), sw, axis=2)


def _multiply(layer, inputs, ctx):
    gate = ctx.gate
    if gate is None:  # two independent signals (a gated MLP, GRN): the uniform rule
        return uniform_product(inputs[0], inputs[1])
    signal = 1 - gate

    @tf.custom_gradient
    def gated(x_signal, x_gate):
        def grad(r):  # all relevance to the gated signal, none to the gate
            return r, tf.zeros_like(x_gate)

        return x_signal * x_gate, grad

    return gated(inputs[signal], inputs[gate])


def _multiply_problem(layer, ctx):
    if len(ctx.input_shapes) != 2:
        return ctx.gate_problem or f"a product of {len(ctx.input_shapes)} tensors; only products of two are supported"
    return None


# ---------------------------------------------------------------------------------------------
# The table

_CONV = dict(check=_conv_problem, nonneg=_fused_nonneg, family="conv", weights=_reader(), fuses_relu=True)
IDENTITY = Handler("identity", _identity, nonneg=_keeps_sign, zero_in_zero_out=True)
_PASS = Handler("passthrough", _elementwise_layer, zero_in_zero_out=True)  # for layers with f(0) = 0
_OPAQUE_PASS = Handler("passthrough", _elementwise_layer)  # f(0) may be != 0, or unknown
_ROUTE = Handler("gradient", _call, _channels_last, _keeps_sign, zero_in_zero_out=True)
_NEAREST = Handler("gradient", _upsample_nearest, _channels_last, _keeps_sign, zero_in_zero_out=True)


def _fused_away(layer, inputs, ctx):
    """A ReLU layer whose ReLU the layer below already applied (``ctx.fuse_relu``)."""
    return inputs[0]


#: The handler the planner gives a ReLU layer fused into the linear layer below it.
FUSED_RELU = Handler("identity", _fused_away, nonneg=lambda layer, flags: True, zero_in_zero_out=True)


def _forward_only(layer, inputs, ctx):
    """The layer's (or operation's) own forward; no gradient flows through it."""
    out = layer.fn(*inputs) if isinstance(layer, RawOp) else _own_call(layer, inputs)
    return tf.nest.map_structure(tf.stop_gradient, out)


#: The handler the planner gives an otherwise unsupported layer whose output only reaches the
#: explained output through gates: the gate gets no relevance, so the branch needs no LRP rule.
FORWARD_ONLY = Handler("forward", _forward_only, zero_in_zero_out=True)

#: The built-in handlers by class name; each holds for that class in both Keras packages.
_BY_NAME = {
    # weighted layers
    "Dense": Handler("linear", _weighted(lambda layer: ops.DENSE_OP), _dense_problem, _fused_nonneg, "dense",
                      _reader(), _fold_last, fuses_relu=True),
    "Conv1D": Handler("linear", _weighted(ops.conv_op), fold=_fold_last, **_CONV),
    "Conv2D": Handler("linear", _weighted(ops.conv_op), fold=_fold_last, **_CONV),
    "Conv2DTranspose": Handler("linear", _weighted(ops.conv_transpose_op), fold=_fold_conv_transpose,
                                **{**_CONV, "check": _conv_transpose_problem}),
    "DepthwiseConv2D": Handler("linear", _weighted(ops.depthwise_op, "depthwise_kernel"), fold=_fold_depthwise,
                                **{**_CONV, "weights": _reader("depthwise_kernel")}),
    "SeparableConv2D": Handler("linear", _separable, fold=_fold_last,
                                **{**_CONV, "weights": _reader("pointwise_kernel")}),
    # weight-free linear layers
    "AveragePooling2D": Handler("linear", _avg_pool_2d, _channels_last, _keeps_sign, "pool", fuses_relu=True),
    "GlobalAveragePooling2D": Handler("linear", _global_avg_pool, _channels_last, _keeps_sign, "pool",
                                       fuses_relu=True),
    "GlobalAveragePooling1D": Handler("linear", _global_avg_pool, _channels_last, _keeps_sign, "pool",
                                       fuses_relu=True),
    "BatchNormalization": Handler("linear", _batch_norm, _batch_norm_problem, family="norm", fuses_relu=True),
    "Add": Handler("linear", _add, nonneg=_keeps_sign, family="merge", fuses_relu=True),
    "Subtract": Handler("linear", _subtract, _subtract_problem, family="merge", fuses_relu=True),
    "CustomScaleLayer": Handler("linear", _custom_scale, _custom_scale_problem, _custom_scale_nonneg, "merge",
                                fuses_relu=True),
    # routing layers: the plain gradient moves relevance back (positions or copies: zero stays zero)
    "MaxPooling2D": Handler("gradient", _max_pool_2d, _channels_last, _keeps_sign, zero_in_zero_out=True),
    "MaxPooling1D": _ROUTE,
    "GlobalMaxPooling2D": _ROUTE,
    "GlobalMaxPooling1D": _ROUTE,
    "Flatten": Handler("gradient", _flatten, _channels_last, _keeps_sign, zero_in_zero_out=True),
    "Reshape": Handler("gradient", _reshape, nonneg=_keeps_sign, zero_in_zero_out=True),
    "Concatenate": Handler("gradient", _call, nonneg=_keeps_sign, zero_in_zero_out=True),
    "ZeroPadding2D": _ROUTE,
    "ZeroPadding1D": _ROUTE,
    "Cropping2D": _ROUTE,
    "Cropping1D": _ROUTE,
    "UpSampling2D": _upsampling,  # chosen by its interpolation
    "Resizing": _INTERPOLATE,
    "Permute": _ROUTE,
    "RepeatVector": _ROUTE,
    "Multiply": Handler("gate", _multiply, _multiply_problem, zero_in_zero_out=True),
    # transformers (lrp_grad.core.transformer_layers); MultiHeadAttention is split into EinsumDense
    # projections and an attention core by the front end (lrp_grad.frontends.blocks)
    "EinsumDense": Handler("linear", einsum_dense, einsum_dense_problem, _fused_nonneg, "dense", einsum_weights,
                           fuses_relu=True),
    # identity at inference
    "Dropout": IDENTITY,
    "SpatialDropout1D": IDENTITY,
    "SpatialDropout2D": IDENTITY,
    "GaussianDropout": IDENTITY,
    "GaussianNoise": IDENTITY,
    "AlphaDropout": IDENTITY,
    "ActivityRegularization": IDENTITY,
    "Identity": IDENTITY,
    # relevance passes through
    "Activation": Handler(
        "passthrough",
        _activation_layer,
        lambda layer, ctx: _activation_problem(layer.activation, ctx.is_output),
        lambda layer, flags: activation_name(layer.activation) in NONNEG,
        zero_in_zero_out=lambda layer: activation_name(layer.activation) in ZERO_AT_ZERO,
    ),
    "ReLU": Handler("passthrough", _elementwise_layer, nonneg=_relu_nonneg, zero_in_zero_out=_relu_zero_at_zero),
    "LeakyReLU": _PASS,
    "ELU": _PASS,
    "PReLU": _PASS,
    "ThresholdedReLU": Handler("passthrough", _elementwise_layer, nonneg=lambda layer, flags: True,
                                zero_in_zero_out=True),
    "Softmax": Handler("passthrough", inner_softmax, zero_in_zero_out=True),  # the output's: skipped
    "Rescaling": Handler("passthrough", _rescaling),  # f(0) = offset: not zero_in_zero_out
    "LayerScale": Handler("passthrough", _layer_scale, zero_in_zero_out=True),
    "Normalization": _OPAQUE_PASS,
    "LayerNormalization": Handler("linear", layer_norm, layer_norm_problem, family="norm"),
    "GroupNormalization": Handler("linear", group_norm, group_norm_problem, family="norm"),
}

#: A Conv1D/Conv2D subclass that convolves with a kernel computed from its weights (weight
#: standardisation): that convolution, its kernel computed at every read (:func:`effective_reader`).
EFFECTIVE_CONV = Handler("linear", _weighted(ops.conv_op, read=effective_reader), fold=_fold_last,
                         **{**_CONV, "weights": effective_reader})
#: The base classes whose subclasses may get EFFECTIVE_CONV.
EFFECTIVE_BASES = ("Conv1D", "Conv2D")

#: The same handlers by layer class (both packages' classes of each name).
_BUILTIN = {cls: handler for name, handler in _BY_NAME.items() for cls in layer_classes(name)}

#: The handlers behind register_handler's shortcut names.
_SHORTCUTS = {  # what a user layer does at zero is unknown: no zero_in_zero_out
    "passthrough": _OPAQUE_PASS,
    "gradient": Handler("gradient", _call),
    "identity": IDENTITY,
}
