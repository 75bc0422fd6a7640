"""The built-in linear layers' computations: each layer call as ``z = F(x, W) + b`` under its LRP rule.

Weighted layers (Dense and the convolutions: their kernels, fused activations and BatchNorm
folds), average pooling, BatchNormalization, Add and InceptionResNetV2's CustomScaleLayer. The
table that gives these to their layer classes is in :mod:`lrp_grad.core.layers`; raw operations
reuse the linear call and the sum (:mod:`lrp_grad.core.raw_ops`).
"""
from __future__ import annotations

import weakref
from dataclasses import replace

import numpy as np
import tensorflow as tf

from . import ops, propagate
from .activations import _activate, _activation_problem
from .handler_types import _channels_last, _static
from .rules import AlphaBeta, Epsilon, Flat, Z


def _linear(x, op, w, b, ctx, x_nonneg, relu=False):
    """The layer call's ``z = F(x, W) + b`` under its rule (see :func:`lrp_grad.propagate.linear`);
    ``relu(z)`` with ``relu``. Weights of another float dtype (a float16 layer in a float32
    explanation) are cast to the input's."""
    if w.dtype != x.dtype:
        w = tf.cast(w, x.dtype)
    if b is not None and b.dtype != x.dtype:
        b = tf.cast(b, x.dtype)
    return propagate.linear(x, op, w, b, ctx.rule, x_nonneg=x_nonneg, compute_dtype=ctx.compute_dtype, relu=relu)


def _kernel(layer, kernel_attr):
    """The kernel variable; Keras 3 names DepthwiseConv2D's ``kernel``, tf-keras ``depthwise_kernel``."""
    w = getattr(layer, kernel_attr, None)
    return layer.kernel if w is None else w


def _reader(kernel_attr="kernel"):
    """``weights(layer) -> (kernel, bias)`` reading the layer's variables as tensors."""

    def weights(layer):
        b = tf.convert_to_tensor(layer.bias) if layer.use_bias else None
        return tf.convert_to_tensor(_kernel(layer, kernel_attr)), b

    return weights


def _weighted(op_for, kernel_attr="kernel", read=None):
    """``apply`` of a layer with a kernel, an optional bias and a fused activation."""
    read = read or _reader(kernel_attr)

    def apply(layer, inputs, ctx):
        (x,) = inputs
        w, b = ctx.params() if ctx.params is not None else read(layer)
        z = _linear(x, op_for(layer), w, b, ctx, ctx.nonneg[0], relu=ctx.fuse_relu)
        return _activate(layer.activation, z, ctx)

    return apply


def _separable(layer, inputs, ctx):
    """SeparableConv2D: a depthwise then a pointwise linear layer, both under the layer's rule."""
    (x,) = inputs
    pointwise, b = ctx.params() if ctx.params is not None else _reader("pointwise_kernel")(layer)
    depthwise = tf.convert_to_tensor(_kernel(layer, "depthwise_kernel"))
    h = _linear(x, ops.depthwise_op(layer), depthwise, None, ctx, ctx.nonneg[0])
    z = _linear(h, ops.POINTWISE_OP, pointwise, b, ctx, False, relu=ctx.fuse_relu)
    return _activate(layer.activation, z, ctx)


def _fold_last(layer, w, b, scale, shift):
    """Fold ``y * scale + shift`` into a kernel whose output channels are its last axis."""
    b = shift if b is None else b * scale + shift
    return w * scale, b


def _fold_depthwise(layer, w, b, scale, shift):
    channels, multiplier = w.shape[-2], w.shape[-1]
    b = shift if b is None else b * scale + shift
    return w * tf.reshape(scale, [channels, multiplier]), b


def _fold_conv_transpose(layer, w, b, scale, shift):
    b = shift if b is None else b * scale + shift
    return w * scale[:, None], b


def _conv_problem(layer, ctx):
    problem = _channels_last(layer)
    if problem:
        return problem
    return _activation_problem(None if ctx.linear_only else layer.activation, ctx.is_output)


def _conv_transpose_problem(layer, ctx):
    if tuple(layer.dilation_rate) != (1, 1):
        return f"dilation_rate={layer.dilation_rate}; only 1 is supported for Conv2DTranspose"
    return _conv_problem(layer, ctx)


def _dense_problem(layer, ctx):
    return _activation_problem(None if ctx.linear_only else layer.activation, ctx.is_output)


def _avg_pool_2d(layer, inputs, ctx):
    (x,) = inputs
    size, strides, padding = list(layer.pool_size), list(layer.strides), layer.padding.upper()
    op = ops.fixed_op(lambda t: tf.nn.avg_pool2d(t, size, strides, padding))
    return _linear(x, op, tf.ones([], x.dtype), None, ctx, ctx.nonneg[0], relu=ctx.fuse_relu)


def _global_avg_pool(layer, inputs, ctx):
    (x,) = inputs
    axes = list(range(1, x.shape.rank - 1))
    keepdims = bool(getattr(layer, "keepdims", False))
    op = ops.fixed_op(lambda t: tf.reduce_mean(t, axes, keepdims=keepdims))
    return _linear(x, op, tf.ones([], x.dtype), None, ctx, ctx.nonneg[0], relu=ctx.fuse_relu)


def batch_norm_affine(layer, dtype):
    """``(scale, shift)`` of a BatchNormalization at inference: ``y = x * scale + shift``."""
    inv = tf.math.rsqrt(tf.cast(layer.moving_variance, dtype) + tf.constant(layer.epsilon, dtype))
    if layer.scale:
        inv = inv * tf.cast(layer.gamma, dtype)
    shift = -tf.cast(layer.moving_mean, dtype) * inv
    if layer.center:
        shift = shift + tf.cast(layer.beta, dtype)
    return inv, shift


def _batch_norm(layer, inputs, ctx):
    (x,) = inputs
    scale, shift = batch_norm_affine(layer, x.dtype)
    return _linear(x, ops.DIAGONAL_OP, scale, shift, ctx, ctx.nonneg[0], relu=ctx.fuse_relu)


def _batch_norm_problem(layer, ctx):
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    rank = ctx.input_shapes[0].rank if ctx.input_shapes else None
    if len(axis) != 1 or (rank is not None and axis[0] not in (-1, rank - 1)):
        return f"axis={layer.axis}; only the last (channels) axis is supported"
    return None


def _broadcast_all(tensors) -> list:
    """The tensors of a broadcasting sum or difference broadcast to one shape (unchanged when they
    share it): ``broadcast_to``'s gradient sums the copies' relevance back to the original."""
    if len({tuple(t.shape) for t in tensors}) == 1:
        return list(tensors)
    shape = tf.shape(tensors[0])
    for t in tensors[1:]:
        shape = tf.broadcast_dynamic_shape(shape, tf.shape(t))
    return [tf.broadcast_to(t, shape) for t in tensors]


def _add(layer, inputs, ctx):
    inputs = _broadcast_all(inputs)  # a broadcasting sum (x + position bias)
    out = propagate.add(inputs, ctx.rule, ctx.nonneg, relu=ctx.fuse_relu)
    if out is not None:
        return out
    stacked = tf.stack(inputs, axis=-1)
    w = tf.ones([len(inputs)], stacked.dtype)
    return _linear(stacked, ops.SUM_OP, w, None, ctx, all(ctx.nonneg), relu=ctx.fuse_relu)


def _scaled_sum(layer, x, r, factor: float, ctx):
    """``x + factor * r`` under the layer's rule: an Add of ``x`` and ``factor * r`` whose second
    share passes on to ``r``; for the rules that read the weights themselves (w^2, z^B, gamma) a
    linear layer with weights ``(1, factor)``."""
    scale = tf.constant(factor, x.dtype)
    x, r = _broadcast_all([x, r])  # a broadcasting difference (x - mean over positions): the copies first
    if isinstance(ctx.rule, (Z, Epsilon, AlphaBeta, Flat)):  # their shares only see the contributions x, s r
        branch = propagate.passthrough(lambda t: t * scale, r)
        nonneg = (ctx.nonneg[0], ctx.nonneg[1] and factor >= 0)
        return _add(layer, [x, branch], replace(ctx, nonneg=nonneg))
    weights = tf.stack([tf.ones([], x.dtype), scale])
    return _linear(tf.stack([x, r], axis=-1), ops.SUM_OP, weights, None, ctx, all(ctx.nonneg), relu=ctx.fuse_relu)


def _custom_scale(layer, inputs, ctx):
    """InceptionResNetV2's CustomScaleLayer ``x + scale * r`` (the residual join): a sum of the
    shortcut and the scaled branch under the layer's rule; the branch's share passes on to ``r``."""
    x, r = inputs
    return _scaled_sum(layer, x, r, float(layer.scale), ctx)


def _subtract(layer, inputs, ctx):
    """``x - y`` of two tensors (a ``Subtract`` layer, ``keras.ops.subtract``): a signed sum, the
    ``merge`` family's rule on ``x + (-1) y``."""
    x, y = inputs
    return _scaled_sum(layer, x, y, -1.0, ctx)


def _pair_problem(ctx, takes: str, combines: str, supported: str):
    """Why a layer joining two same-shaped tensors cannot take these inputs (or ``None``)."""
    if len(ctx.input_shapes) != 2:
        return f"called on {len(ctx.input_shapes)} tensors; {takes}"
    shapes = {_static(s) for s in ctx.input_shapes}
    if len(shapes) != 1:
        return (f"{combines} tensors of different shapes {[tuple(s) for s in ctx.input_shapes]} (broadcasting); "
                f"only {supported} are supported")
    return None


def _subtract_problem(layer, ctx):
    if len(ctx.input_shapes) == 2 and len(ctx.input_shapes[0]) == len(ctx.input_shapes[1]):
        return None  # same rank: broadcasting along axes of size 1 is a difference of the copies
    return _pair_problem(ctx, "a difference takes two", "subtracts", "tensors of the same rank")


def _fixed_linear(fn, interpolates: bool = True):
    """``apply`` of a weight-free linear map ``fn`` of one tensor (bilinear resizing, interpolation):
    a linear layer of the ``pool`` family (its rule; ``Epsilon`` by default). ``interpolates``:
    ``fn`` is a TensorFlow resize (float32 inside, see :func:`_in_float32`)."""

    def apply(layer, inputs, ctx):
        (x,) = inputs
        f = (lambda t: _in_float32(fn, layer, t)) if interpolates else (lambda t: tf.cast(fn(layer, t), t.dtype))
        return _linear(x, ops.fixed_op(f), tf.ones([], x.dtype), None, ctx, ctx.nonneg[0], relu=ctx.fuse_relu)

    return apply


def _in_float32(fn, layer, t):
    """``fn(layer, t)`` in the pass's dtype. tf.image.resize answers in float32 for any float input;
    under XLA a float64 tensor is resized as float32 and cast back, so the gradient stays in one
    dtype (XLA refuses a ResizeBilinearGrad mixing a float32 gradient with a float64 image).
    Outside XLA the gradient keeps float64 precision."""
    if t.dtype == tf.float64 and _in_xla():
        return tf.cast(fn(layer, tf.cast(t, tf.float32)), t.dtype)
    return tf.cast(fn(layer, t), t.dtype)


def _in_xla() -> bool:
    """Whether the graph being traced is compiled by XLA (``tf.function(jit_compile=True)``)."""
    try:
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception:  # noqa: BLE001 - a TensorFlow without this helper: keep the float64 path
        return False


def _custom_scale_problem(layer, ctx):
    return _pair_problem(ctx, "CustomScaleLayer adds a scaled branch to one shortcut", "adds",
                         "same-shaped shortcut and branch")


def _custom_scale_nonneg(layer, flags):
    return all(flags) and float(layer.scale) >= 0


# ---------------------------------------------------------------------------------------------
# A convolution whose kernel is computed from its weights (weight standardisation)

#: The TensorFlow operations a convolution's ``convolution_op`` ends in (Keras 3 runs a grouped
#: convolution as an XLA function call).
_CONV_OPS = ("Conv2D", "Conv3D", "Conv", "DepthwiseConv2dNative", "PartitionedCall", "StatefulPartitionedCall")
_EFFECTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _ref(v):
    """A hashable reference to a TensorFlow variable (Keras 3 wraps it: ``v.value``)."""
    return (v if hasattr(v, "ref") else v.value).ref()


def _trace_kernel(layer):
    """``kernel()``: the kernel ``layer.convolution_op(x, layer.kernel)`` convolves ``x`` with, read
    from its traced graph as the one tensor of the convolution that does not depend on ``x`` (it may
    read only the layer's own weights); ``None`` when there is no such single tensor."""
    kernel = layer.kernel
    rank = len(kernel.shape) - 2
    channels = int(kernel.shape[-2]) * int(getattr(layer, "groups", 1) or 1)
    dtype = tf.as_dtype(getattr(layer, "compute_dtype", None) or kernel.dtype)
    spec = tf.TensorSpec((None,) * (rank + 1) + (channels,), dtype)
    wrapped = tf.compat.v1.wrap_function(lambda x: layer.convolution_op(x, layer.kernel), [spec])
    own = {_ref(v) for v in layer.weights}
    if any(_ref(v) not in own for v in wrapped.variables):
        return None  # reads weights of other layers
    graph = wrapped.graph
    (x,) = [t for t in wrapped.inputs if t.dtype == dtype][:1] or [None]
    depends, convs = {x.ref()} if x is not None else set(), []
    for op in graph.get_operations():
        if any(t.ref() in depends for t in op.inputs):
            depends.update(t.ref() for t in op.outputs)
            if op.type in _CONV_OPS:
                convs.append(op)
    if len(convs) != 1:
        return None
    fixed = [t for t in convs[0].inputs if t.ref() not in depends and t.dtype.is_floating]
    if len(fixed) != 1:
        return None
    fetch = wrapped.prune(feeds=[], fetches=fixed[0])
    shape = tuple(kernel.shape)

    def read():
        return tf.reshape(tf.cast(fetch(), kernel.dtype), shape)  # Conv1D runs on an expanded 2-D kernel

    return read


def _matches(layer, read) -> bool:
    """Whether ``layer(x)`` is the layer's base convolution with the kernel ``read()`` on a random input."""
    kernel = layer.kernel
    rank = len(kernel.shape) - 2
    groups = int(getattr(layer, "groups", 1) or 1)
    size = [max(8, (k - 1) * d + 1 + 2 * s) for k, d, s in zip(kernel.shape[:rank], layer.dilation_rate, layer.strides)]
    dtype = tf.as_dtype(getattr(layer, "compute_dtype", None) or kernel.dtype)
    x = tf.constant(np.random.default_rng(0).normal(size=(2, *size, int(kernel.shape[-2]) * groups)), dtype)
    own = tf.convert_to_tensor(layer.call(x))
    z = ops.conv_op(layer).forward(x, tf.cast(read(), dtype))
    if layer.use_bias:
        z = z + tf.cast(layer.bias, dtype)
    ours = layer.activation(z)
    scale = float(tf.reduce_max(tf.abs(own))) or 1.0
    return own.shape == ours.shape and float(tf.reduce_max(tf.abs(own - ours))) <= 1e-4 * scale


def effective_kernel(layer):
    """For a convolution subclass that computes its kernel from its weights (weight standardisation:
    NFNet's ``ScaledStandardizedConv2D``, the Keras example's ``StandardizedConv2D`` overriding
    ``convolution_op``): ``read() -> kernel``, the kernel it convolves with, computed from the live
    weights at every call, when its output is checked to be exactly the base convolution's with
    that kernel (then it is explained as that convolution, under the conv family's rule); else
    ``None``."""
    try:
        return _EFFECTIVE[layer]
    except (KeyError, TypeError):
        pass
    read = None
    if getattr(layer, "padding", None) in ("valid", "same") and getattr(layer, "data_format", "channels_last") in (
            "channels_last", None) and getattr(layer, "built", False):
        try:
            read = _trace_kernel(layer)
            read = read if read is not None and _matches(layer, read) else None
        except Exception:  # noqa: BLE001 - a call that cannot be traced is looked into instead
            read = None
    try:
        _EFFECTIVE[layer] = read
    except TypeError:
        pass
    return read


def effective_reader(layer):
    """``(kernel, bias)`` of a convolution with a computed kernel (see :func:`effective_kernel`)."""
    b = tf.convert_to_tensor(layer.bias) if layer.use_bias else None
    return effective_kernel(layer)(), b
