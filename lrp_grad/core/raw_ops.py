"""The built-in handlers of raw operations (``x + y``, ``x * 2``, ``keras.ops.*``), as the layers they stand for.

A sum of tensors is an ``Add``, arithmetic with a constant and activation functions pass relevance
through, reshapes/slices/concatenations route it, ``mean``/``sum`` over non-batch axes are
weight-free linear layers of the ``pool`` family, a matrix product or einsum of two tensors takes
the ``'attention'`` family's rule and a softmax inside the network the softmax rule; operations
without a gradient (rounding, ``stop_gradient``, casts to integers, comparisons) are refused.
:data:`_RAW` is their table. Which entry an
operation gets (a product of two tensors is a ``Multiply`` gate) is decided in
:mod:`lrp_grad.handlers`.
"""
from __future__ import annotations

import tensorflow as tf

from . import ops, propagate
from .activations import HEADS, NONNEG, ZERO_AT_ZERO
from .handler_types import Handler, _keeps_sign, _static
from .rules import Epsilon, Z
from .linear_layers import _add, _fixed_linear, _linear, _subtract, _subtract_problem
from .transformer_layers import attention_rule_problem, raw_product, raw_softmax


def _replay(op, t):
    """The operation itself on one tensor (its constant operands bound)."""
    return op.fn(t)


def _raw_resize(op, inputs, ctx):
    """An image resize (any method: a fixed linear map of the image, ``pool`` family). Its other
    tensor operands are the size, computed from shapes (``tf.shape(x)[1:3]``, GhostNetV2): integers,
    held constant, carrying no relevance."""
    x, size = inputs[0], [tf.stop_gradient(t) for t in inputs[1:]]
    if op.interpolation == "nearest" and x.shape.rank == 4 and getattr(op.source, "data_format", None) in (
            None, "channels_last"):
        return _fixed_linear(lambda layer, t: _nearest_by_gather(layer, t, size), interpolates=False)(op, [x], ctx)
    return _fixed_linear(lambda layer, t: layer.fn(t, *size))(op, [x], ctx)


def _nearest_by_gather(op, t, size):
    """A nearest-neighbour resize as the gather of the pixels it copies: the same values, and a
    gradient XLA compiles (it has no kernel for ``ResizeNearestNeighborGrad``). Which pixel each
    output copies is read by resizing the image of pixel numbers (1-based: 0 is padding)."""
    shape = tf.shape(t)
    h, w = shape[1], shape[2]
    ids = tf.reshape(tf.range(1, h * w + 1, dtype=tf.float32), tf.stack([1, h, w, 1]))
    src = tf.cast(tf.round(tf.cast(op.fn(ids, *size), tf.float32)), tf.int32) - 1  # (1, oh, ow, 1)
    out_shape = tf.shape(src)
    src = tf.reshape(src, [-1])
    flat = tf.reshape(t, tf.stack([shape[0], h * w, shape[3]]))
    picked = tf.gather(flat, tf.maximum(src, 0), axis=1) * tf.cast(src >= 0, t.dtype)[None, :, None]
    return tf.reshape(picked, tf.stack([shape[0], out_shape[1], out_shape[2], shape[3]]))


def _resize_problem(op, ctx):
    if op.interpolation == "area":
        return (f"{op.symbol} with area interpolation has no gradient in TensorFlow, so relevance cannot flow back "
                "through it; resize with 'bilinear' (or use AveragePooling2D for an integer factor)")
    return None


def _raw_route(op, inputs, ctx):
    return op.fn(*inputs)


def _raw_pass(op, inputs, ctx):
    """An elementwise function of one tensor (with constant operands): relevance passes."""
    (x,) = inputs
    return propagate.passthrough(lambda t: op.fn(t), x)


def _raw_activation(op, inputs, ctx):
    (x,) = inputs
    if op.activation in HEADS and ctx.is_output:
        return tf.identity(x)  # a final softmax or sigmoid is skipped: the logits are explained
    return _raw_pass(op, inputs, ctx)


def _raw_reduce(op, inputs, ctx):
    """``mean``/``sum`` over non-batch axes: a weight-free linear map under the layer's rule. A list
    of tensors reduced as one (``tf.reduce_mean([a, b], axis=0)``) is that map of their stack."""
    if len(inputs) == 1:
        (x,) = inputs
        linear_op = ops.fixed_op(lambda t: op.fn(t))
    else:
        x = tf.stack(inputs, axis=0)
        linear_op = ops.fixed_op(lambda t: op.fn(*tf.unstack(t, axis=0)))
    return _linear(x, linear_op, tf.ones([], x.dtype), None, ctx, ctx.nonneg[0], relu=ctx.fuse_relu)


def _elementwise_problem(op, ctx):
    if op.n_tensors != 1 or len(ctx.input_shapes) != 1:
        return None
    if op.out_shape is not None and _static(op.out_shape) != _static(ctx.input_shapes[0]):
        return (f"{op.symbol} broadcasts its tensor from {tuple(ctx.input_shapes[0])} to {tuple(op.out_shape)}; "
                "only elementwise arithmetic with a constant of the tensor's shape (or a scalar) is supported")
    return None


def _raw_add_problem(op, ctx):
    ranks = {len(s) for s in ctx.input_shapes}
    if len(ranks) != 1:
        return (f"{op.symbol} of tensors of different ranks {[tuple(s) for s in ctx.input_shapes]}; a sum "
                "broadcasts along axes of size 1 of tensors of the same rank (x + position bias)")
    return None


def _two_tensor_problem(op, ctx):
    return (f"{op.symbol} of two tensors is not supported (no LRP rule for it); supported are sums and "
            "differences of tensors (x + y, x - y), products (x * y, matmul, einsum), quotients (x / y: the "
            "divisor held constant) and arithmetic with constants (x - 1, x / 2)")


def _raw_reduce_problem(op, ctx):
    if op.axes is None or op.batch_axis in op.axes:
        where = "" if op.batch_axis == 0 else f" (axis {op.batch_axis} of the stacked tensors)"
        return (f"{op.symbol} over axis={op.axes if op.axes is not None else 'None (all)'} reduces the batch "
                f"axis{where}; only reductions over the non-batch axes (e.g. axis=(1, 2)) are supported")
    return None


def _raw_route_problem(op, ctx):
    """A max reduction routes relevance to the largest element; over the batch axis it would mix
    samples: refused like mean/sum over it."""
    if op.symbol.rsplit(".", 1)[-1] in ("max", "amax", "reduce_max"):
        return _raw_reduce_problem(op, ctx)
    return None


def _raw_divide(op, inputs, ctx):
    """``x / y`` of two tensors: the divisor is a scale held constant (a hand-written normalisation,
    ``x / norm(x)``): all relevance to ``x``, none to ``y``, as LayerNorm's standard deviation."""
    x, y = inputs

    @tf.custom_gradient
    def scaled(a, b):
        z = op.fn(a, b)

        return z, propagate.no_variable_gradients(lambda r: (r, tf.zeros_like(b)))

    return scaled(x, y)


def _raw_divide_problem(op, ctx):
    shapes = [_static(s) for s in ctx.input_shapes]
    if len(shapes) == 2 and len(shapes[0]) != len(shapes[1]) and shapes[1]:
        return (f"{op.symbol} of tensors of ranks {len(shapes[0])} and {len(shapes[1])}; the numerator's relevance "
                "needs a divisor of the same rank (broadcast along size-1 axes)")
    return None


def _constant_linear_problem(op, ctx):
    """A matrix product, einsum or convolution of a tensor with a constant kernel (a custom layer's
    ``tf.nn.convolution(x, self.kernel)``, ``x @ self.w``) is a linear map whose kernel is bound
    inside the operation: Z or Epsilon only."""
    if ctx.rule is not None and not isinstance(ctx.rule, (Z, Epsilon)):
        return (f"{op.symbol} with a constant kernel (inside a layer's call) takes Z or Epsilon, whose relevance "
                f"does not split the kernel; the composite gives it {ctx.rule!r}: map the 'pool' family to "
                "lrp_grad.Epsilon(...), or hold the kernel in a layer (Dense, EinsumDense, Conv2D)")
    return None


def _unknown_op_problem(op, ctx):
    return (f"operation {op.symbol} has no LRP handler; supported operations: + and - of tensors and "
            "constants, * of tensors, / by constants, matmul and einsum, softmax, reshape, slicing, split, "
            "unstack, repeat, gather, concatenate, transpose, resize, mean/sum over non-batch axes, elementwise "
            "activations. Wrap it in a layer and register a handler (lrp_grad.register_handler)")


def _cut_problem(op, ctx):
    return (f"{op.symbol} cuts the gradient: {op.cut}. No relevance flows back through it, so the explanation "
            "would be all zero. Keep the explained path in floats (casts between float dtypes are supported), or, "
            "to look through the step (e.g. a quantization), wrap it in a layer and register that layer as the "
            "identity for relevance: lrp_grad.register_handler(YourLayer, 'passthrough')")


_RAW = {
    "add_tensors": Handler("linear", _add, _raw_add_problem, _keeps_sign, "merge", fuses_relu=True),
    "shift": Handler("passthrough", _raw_pass, _elementwise_problem),  # x + c: f(0) = c
    "scale": Handler("passthrough", _raw_pass, _elementwise_problem, zero_in_zero_out=True),  # x * c, -x
    "opaque": Handler("passthrough", _raw_pass, _elementwise_problem),  # x / c, c / x
    "refused": Handler("passthrough", _raw_pass, _two_tensor_problem),
    "route": Handler("gradient", _raw_route, _raw_route_problem, nonneg=_keeps_sign, zero_in_zero_out=True),
    "reduce": Handler("linear", _raw_reduce, _raw_reduce_problem, _keeps_sign, "pool", fuses_relu=True),
    "activation": Handler(
        "passthrough", _raw_activation, lambda op, ctx: None,
        lambda op, flags: op.activation in NONNEG,
        zero_in_zero_out=lambda op: op.activation in ZERO_AT_ZERO,
    ),
    "unknown": Handler("passthrough", _raw_pass, _unknown_op_problem),
    "divide_tensors": Handler("gate", _raw_divide, _raw_divide_problem, fixed_gate=1, zero_in_zero_out=True),
    "subtract_tensors": Handler("linear", _subtract, _subtract_problem, family="merge", fuses_relu=True),
    "resize": Handler("linear", _raw_resize, _resize_problem, family="pool", fuses_relu=True),
    # transformers (lrp_grad.core.transformer_layers)
    "product": Handler("linear", raw_product, attention_rule_problem, family="attention", reads_gate=True),
    "constant_product": Handler("linear", _fixed_linear(_replay, interpolates=False), _constant_linear_problem,
                                family="pool", fuses_relu=True),
    "softmax": Handler("passthrough", raw_softmax, zero_in_zero_out=True),
    "cut": Handler("passthrough", _raw_pass, _cut_problem),  # refused (computed only on a branch feeding gates)
}
