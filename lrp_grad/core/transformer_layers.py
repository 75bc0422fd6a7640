"""The built-in handlers of what transformers are made of: EinsumDense, LayerNormalization with its
scale held constant, the attention core of MultiHeadAttention, a softmax inside the network, and
products of two tensors.

The table that gives these to layer classes is :data:`lrp_grad.core.layers._BY_NAME`; raw
operations (``keras.ops.matmul``, ``tf.einsum``, ``keras.ops.softmax``) reach them through
:mod:`lrp_grad.core.raw_ops`. The backward passes are in :mod:`lrp_grad.core.attention`.
"""
from __future__ import annotations

import tensorflow as tf

from . import attention, ops, propagate
from .activations import _activate, _activation_problem
from .handler_types import _own_call
from .linear_layers import _linear
from .rules import AttentionRule, Epsilon, Z

__all__ = ["einsum_weights", "einsum_dense", "einsum_dense_problem", "layer_norm", "layer_norm_problem", "group_norm",
           "group_norm_problem", "attention_core",
           "attention_rule_problem", "inner_softmax", "raw_product", "raw_softmax", "uniform_product"]


# ---------------------------------------------------------------------------------------------
# EinsumDense: a Dense layer with an einsum equation


def einsum_weights(layer):
    """``(kernel, bias or None)``: EinsumDense has a bias only with ``bias_axes``."""
    bias = getattr(layer, "bias", None)
    return tf.convert_to_tensor(layer.kernel), (None if bias is None else tf.convert_to_tensor(bias))


def einsum_dense(layer, inputs, ctx):
    (x,) = inputs
    w, b = ctx.params() if ctx.params is not None else einsum_weights(layer)
    z = _linear(x, ops.einsum_op(layer.equation), w, b, ctx, ctx.nonneg[0], relu=ctx.fuse_relu)
    return _activate(layer.activation, z, ctx)


def einsum_dense_problem(layer, ctx):
    if getattr(layer, "quantization_mode", None):
        return f"quantization_mode={layer.quantization_mode!r}; LRP needs the float kernel"
    return _activation_problem(None if ctx.linear_only else layer.activation, ctx.is_output)


# ---------------------------------------------------------------------------------------------
# LayerNormalization: y = (x - mean) * gamma / std + beta with std held constant


def _axes(layer, rank: int) -> list:
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted(int(a) % rank for a in axis)


def _broadcast(v, x, axes):
    """A per-feature weight (``gamma``/``beta``) shaped to broadcast against ``x`` (as Keras does)."""
    v = tf.cast(tf.convert_to_tensor(v), x.dtype)
    if axes == [x.shape.rank - 1] or v.shape.rank == x.shape.rank:
        return v
    shape = [1] * x.shape.rank
    for a in axes:
        shape[a] = x.shape[a]
    return tf.reshape(v, shape)


def layer_norm(layer, inputs, ctx):
    """Its own forward; relevance by the epsilon (or Z) rule of the map with the scale held constant
    (:func:`lrp_grad.core.attention.normalization`)."""
    (x,) = inputs
    axes = _axes(layer, x.shape.rank)
    gamma = getattr(layer, "gamma", None) if getattr(layer, "scale", True) else None
    beta = getattr(layer, "beta", None) if getattr(layer, "center", True) else None
    rms = bool(getattr(layer, "rms_scaling", False))

    def factor(t):
        _, variance = tf.nn.moments(t, axes, keepdims=True)
        f = tf.math.rsqrt(variance + tf.constant(layer.epsilon, t.dtype))
        return f if gamma is None else f * _broadcast(gamma, t, axes)

    def center(v):
        return v - tf.reduce_mean(v, axes, keepdims=True)

    offset = None if (beta is None or rms) else _broadcast(beta, x, axes)
    return attention.normalization(lambda t: _own_call(layer, [t]), x, factor, None if rms else center, ctx.rule,
                                   offset)


def group_norm(layer, inputs, ctx):
    """GroupNormalization (channels last): LayerNorm's rule per group of channels."""
    (x,) = inputs
    groups = int(layer.groups)
    rank = x.shape.rank
    channels = x.shape[-1]
    grouped = lambda t: tf.reshape(t, tf.concat([tf.shape(t)[:-1], [groups, channels // groups]], 0))  # noqa: E731
    axes = list(range(1, rank - 1)) + [rank]  # positions and the channels inside a group

    def factor(t):
        _, variance = tf.nn.moments(grouped(t), axes, keepdims=True)
        f = tf.math.rsqrt(variance + tf.constant(layer.epsilon, t.dtype))
        if getattr(layer, "scale", True) and getattr(layer, "gamma", None) is not None:
            f = f * tf.reshape(tf.cast(layer.gamma, t.dtype), [groups, channels // groups])
        else:
            f = f * tf.ones([groups, channels // groups], t.dtype)
        return tf.reshape(tf.broadcast_to(f, tf.shape(grouped(t))), tf.shape(t))

    def center(v):
        g = grouped(v)
        return tf.reshape(g - tf.reduce_mean(g, axes, keepdims=True), tf.shape(v))

    beta = getattr(layer, "beta", None) if getattr(layer, "center", True) else None
    offset = None if beta is None else tf.cast(beta, x.dtype)
    return attention.normalization(lambda t: _own_call(layer, [t]), x, factor, center, ctx.rule, offset)


def group_norm_problem(layer, ctx):
    axis = layer.axis if isinstance(layer.axis, int) else None
    rank = len(ctx.input_shapes[0]) if ctx.input_shapes else None
    if axis is None or rank is None or axis % rank != rank - 1:
        return f"axis={layer.axis!r}; only the last axis (channels last) is supported"
    return layer_norm_problem(layer, ctx)


def layer_norm_problem(layer, ctx):
    if not isinstance(ctx.rule, (Z, Epsilon)) and ctx.rule is not None:
        return (f"a normalisation takes Z or Epsilon (its scale is held constant), but the composite gives it "
                f"{ctx.rule!r}; map the 'norm' family to lrp_grad.Epsilon(...)")
    return None


# ---------------------------------------------------------------------------------------------
# The attention family


def attention_rule_problem(layer, ctx):
    if ctx.rule is not None and not isinstance(ctx.rule, AttentionRule):
        return f"the 'attention' family takes lrp_grad.AttnLRP() or lrp_grad.CPLRP(), got {ctx.rule!r}"
    return None


def attention_core(core, inputs, ctx):
    """``softmax(einsum(dot, k, q * scale)) -> einsum(combine, A, v)`` of MultiHeadAttention."""
    q, k, v = inputs
    rule = ctx.rule
    scale = core.scale
    q = propagate.passthrough(lambda t: t * tf.constant(scale, t.dtype), q)  # a constant factor
    scores = attention.product(lambda a, b: tf.einsum(core.dot_equation, a, b), k, q, rule)
    weights = attention.softmax(core.softmax, scores, core.softmax_axes)
    return attention.product(lambda a, b: tf.einsum(core.combine_equation, a, b), weights, v, rule, constant=0)


def raw_product(op, inputs, ctx):
    """A matrix product or einsum of two tensors (``keras.ops.matmul``, ``tf.einsum``): the
    attention rule; CP-LRP holds a factor that comes through a softmax constant (``ctx.gate``)."""
    a, b = inputs
    return attention.product(lambda x, y: op.fn(x, y), a, b, ctx.rule, constant=ctx.gate)


def uniform_product(x_a, x_b):
    """``x_a * x_b`` of two independent signals: half of the relevance to each (the uniform rule of
    AttnLRP for an elementwise product, where every term is the whole product)."""

    @tf.custom_gradient
    def uniform(a, b):
        z = a * b

        def grad(r):
            half = tf.constant(0.5, z.dtype) * r
            return _unbroadcast(half, a), _unbroadcast(half, b)

        return z, grad

    return uniform(x_a, x_b)


def _unbroadcast(r, x):
    """Relevance of a broadcast operand: summed over the axes it was broadcast along."""
    if r.shape == x.shape:
        return r
    return tf.reshape(tf.reduce_sum(r, axis=_broadcast_axes(r, x), keepdims=True), tf.shape(x))


def _broadcast_axes(r, x):
    rank = r.shape.rank
    padded = [1] * (rank - x.shape.rank) + list(x.shape)
    return [i for i in range(rank) if padded[i] == 1 and r.shape[i] != 1]


def inner_softmax(layer, inputs, ctx):
    """A Softmax layer: skipped as the explained output's last operation, else the softmax rule."""
    (x,) = inputs
    if ctx.is_output:
        return tf.identity(x)
    rank = x.shape.rank
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return attention.softmax(lambda t: _own_call(layer, [t]), x, tuple(int(a) % rank for a in axis))


def raw_softmax(op, inputs, ctx):
    """``keras.ops.softmax``/``tf.nn.softmax``: skipped at the output, else the softmax rule."""
    (x,) = inputs
    if ctx.is_output:
        return tf.identity(x)
    return attention.softmax(lambda t: op.fn(t), x, op.axes if op.axes is not None else (x.shape.rank - 1,))
