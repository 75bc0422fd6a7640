"""Linear maps of the supported layers, each with its transpose: the ``F`` and ``T`` of
:class:`~lrp_grad.propagate.LinearOp` for Dense, Conv1D/2D, Conv2DTranspose, DepthwiseConv2D,
pointwise (1x1) convolutions, fixed-weight maps (pooling) and elementwise maps (BatchNorm, Add).

Forward ops are the ones Keras itself calls, so the rewritten forward pass equals ``model(x)``.
"""
from __future__ import annotations

import tensorflow as tf

from .propagate import LinearOp

__all__ = ["DENSE_OP", "POINTWISE_OP", "DIAGONAL_OP", "SUM_OP", "conv_op", "conv_transpose_op", "depthwise_op",
           "einsum_op", "fixed_op"]


def _vjp(f, x, s):
    """``T(s) = (dF/dx)^T s`` of a fixed linear map ``f`` (its forward is pruned from the graph)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = f(x)
    return tape.gradient(y, x, output_gradients=s)


def _dense_forward(x, w):
    if x.shape.rank == 2:
        return tf.matmul(x, w)
    return tf.tensordot(x, w, [[x.shape.rank - 1], [0]])


def _dense_transpose(s, w, x):
    if s.shape.rank == 2:
        return tf.matmul(s, w, transpose_b=True)
    return tf.tensordot(s, w, [[s.shape.rank - 1], [1]])


DENSE_OP = LinearOp(_dense_forward, _dense_transpose, row_blocks=True)


def _dilate_kernel(w, rates):
    """Insert ``rate - 1`` zeros between kernel taps (CPU transposed convs lack dilation)."""
    for axis, rate in enumerate(rates):
        if rate == 1 or w.shape[axis] == 1:
            continue
        taps = tf.unstack(w, axis=axis)
        zero = tf.zeros_like(taps[0])
        spread = [taps[0]]
        for tap in taps[1:]:
            spread.extend([zero] * (rate - 1) + [tap])
        w = tf.stack(spread, axis=axis)
    return w


def conv_op(layer) -> LinearOp:
    """Conv1D / Conv2D (channels last), with causal padding folded into the op and ``groups``."""
    rank = len(layer.kernel_size)
    strides = list(layer.strides)
    dilations = list(layer.dilation_rate)
    causal = layer.padding == "causal"
    padding = "VALID" if causal else layer.padding.upper()
    left = (layer.kernel_size[0] - 1) * dilations[0] if causal else 0
    groups = int(getattr(layer, "groups", 1) or 1)

    def dense_forward(x, w):
        return tf.nn.convolution(x, w, strides=strides, padding=padding, dilations=dilations)

    def forward(x, w):
        if causal:  # padding inside the op: pad zeros are not inputs (matters for Flat, WSquare)
            x = tf.pad(x, [[0, 0], [left, 0], [0, 0]])
        if groups == 1:
            return dense_forward(x, w)
        return _grouped_forward(x, w, groups, rank, strides, padding, dilations, dense_forward)

    def dense_transpose(s, w, shape):
        if rank == 1:
            return tf.nn.conv1d_transpose(s, w, shape, strides, padding)
        return tf.nn.conv2d_transpose(s, w, shape, strides, padding)

    def transpose(s, w, x):
        shape = tf.shape(x)
        if causal:
            shape = shape + tf.constant([0, left, 0])
        w = _dilate_kernel(w, dilations)
        if groups == 1:
            out = dense_transpose(s, w, shape)
        else:
            out = _grouped_transpose(s, w, shape, groups, rank, strides, padding, dense_transpose)
        return out[:, left:] if causal else out

    # A grouped kernel holds C_in / groups input channels: inputs cannot be concatenated along them.
    return LinearOp(forward, transpose, in_axis=-2 if groups == 1 else None)


def _grouped_forward(x, w, groups, rank, strides, padding, dilations, dense_forward):
    """A grouped convolution as ops TensorFlow's graph optimiser leaves alone: its CPU fusion of a
    grouped Conv2D with the following BiasAdd is unimplemented (``Fused conv implementation does
    not support grouped convolutions``). One group per input channel is a depthwise convolution;
    otherwise each group is convolved on its own channels and the results concatenated."""
    per_in, out_channels = w.shape[-2], w.shape[-1]
    per_out = out_channels // groups
    if per_in == 1 and rank == 2:
        kernel = tf.reshape(w, [w.shape[0], w.shape[1], groups, per_out])
        return tf.nn.depthwise_conv2d(x, kernel, [1] + strides + [1], padding, dilations=dilations)
    if rank == 2 and groups >= per_in:
        # Many small groups (WaveMLP, RegNet): one depthwise convolution with a channel multiplier
        # of per_out, then the per_in products of each group summed. Same multiplications as the
        # grouped convolution, one op instead of one per group (per_in times the output's memory).
        out = tf.nn.depthwise_conv2d(x, _depthwise_kernel(w, groups), [1] + strides + [1], padding,
                                     dilations=dilations)
        shape = tf.concat([tf.shape(out)[:-1], [groups, per_in, per_out]], 0)
        return tf.reshape(tf.reduce_sum(tf.reshape(out, shape), axis=-2), tf.concat([tf.shape(out)[:-1],
                                                                                   [out_channels]], 0))
    return tf.concat([dense_forward(x[..., g * per_in:(g + 1) * per_in], w[..., g * per_out:(g + 1) * per_out])
                      for g in range(groups)], axis=-1)


def _depthwise_kernel(w, groups):
    """A grouped kernel ``(kh, kw, per_in, groups * per_out)`` as a depthwise kernel
    ``(kh, kw, groups * per_in, per_out)``: input channel ``g * per_in + c`` carries the weights of
    its group's ``per_out`` outputs."""
    kh, kw, per_in, out_channels = w.shape
    per_out = out_channels // groups
    k = tf.reshape(w, [kh, kw, per_in, groups, per_out])
    return tf.reshape(tf.transpose(k, [0, 1, 3, 2, 4]), [kh, kw, groups * per_in, per_out])


def _grouped_transpose(s, w, shape, groups, rank, strides, padding, dense_transpose):
    """The transpose of a grouped convolution (TensorFlow has no CPU kernel for it).

    One group per input channel (ConvNeXt's ``groups=C``) is a depthwise convolution, whose
    transpose exists; otherwise each group is transposed on its own slice of the output channels
    and the results are concatenated along the input channels."""
    per_in, out_channels = w.shape[-2], w.shape[-1]
    per_out = out_channels // groups
    if per_in == 1 and rank == 2:
        kernel = tf.reshape(w, [w.shape[0], w.shape[1], groups, per_out])
        return tf.nn.depthwise_conv2d_backprop_input(shape, kernel, s, [1] + strides + [1], padding)
    if rank == 2 and groups >= per_in:  # the transpose of _grouped_forward's depthwise form
        lead = tf.shape(s)[:-1]
        spread = tf.broadcast_to(tf.reshape(s, tf.concat([lead, [groups, 1, per_out]], 0)),
                                 tf.concat([lead, [groups, per_in, per_out]], 0))
        spread = tf.reshape(spread, tf.concat([lead, [groups * per_in * per_out]], 0))
        return tf.nn.depthwise_conv2d_backprop_input(shape, _depthwise_kernel(w, groups), spread,
                                                     [1] + strides + [1], padding)
    parts = []
    for g in range(groups):
        part_shape = tf.concat([shape[:-1], [per_in]], 0)
        parts.append(dense_transpose(s[..., g * per_out:(g + 1) * per_out], w[..., g * per_out:(g + 1) * per_out],
                                     part_shape))
    return tf.concat(parts, axis=-1)


def conv_transpose_op(layer) -> LinearOp:
    """Conv2DTranspose: forward is ``conv2d_transpose``, its transpose a plain ``conv2d``. The output
    size is Keras' (``output_padding`` adds rows and columns at the end)."""
    strides = list(layer.strides)
    padding = layer.padding.upper()
    (kh, kw), (sh, sw) = layer.kernel_size, layer.strides
    extra = getattr(layer, "output_padding", None)
    extra = None if extra is None else ((int(extra),) * 2 if isinstance(extra, int) else tuple(int(e) for e in extra))

    def out_len(n, k, s, axis):
        if extra is None:
            return n * s if padding == "SAME" else n * s + max(k - s, 0)
        pad = k // 2 if padding == "SAME" else 0  # Keras' deconv_output_length; TF places the SAME padding
        return (n - 1) * s + k - 2 * pad + extra[axis]

    def forward(x, w):
        shape = tf.shape(x)
        out = tf.stack([shape[0], out_len(shape[1], kh, sh, 0), out_len(shape[2], kw, sw, 1), tf.shape(w)[2]])
        return tf.nn.conv2d_transpose(x, w, out, strides, padding)

    def transpose(s, w, x):
        return tf.nn.conv2d(s, w, strides, padding)

    return LinearOp(forward, transpose, in_axis=-1)


def depthwise_op(layer) -> LinearOp:
    strides = [1] + list(layer.strides) + [1]
    padding = layer.padding.upper()
    dilations = list(layer.dilation_rate)

    def forward(x, w):
        return tf.nn.depthwise_conv2d(x, w, strides, padding, dilations=dilations)

    def transpose(s, w, x):
        return tf.nn.depthwise_conv2d_backprop_input(tf.shape(x), _dilate_kernel(w, dilations), s, strides, padding)

    return LinearOp(forward, transpose, in_axis=None)


def einsum_op(equation: str) -> LinearOp:
    """``EinsumDense``: ``F(x, W) = einsum(equation, x, W)``, its transpose by the vector-Jacobian product."""

    def forward(x, w):
        return tf.einsum(equation, x, w)

    def transpose(s, w, x):
        return _vjp(lambda t: tf.einsum(equation, t, w), x, s)

    return LinearOp(forward, transpose, in_axis=None)


def fixed_op(fn) -> LinearOp:
    """A weight-free linear map ``fn`` as ``F(x, w) = fn(x) * w`` with a scalar weight ``w = 1``."""

    def forward(x, w):
        return fn(x) * w

    def transpose(s, w, x):
        return _vjp(fn, x, s * w)

    return LinearOp(forward, transpose, in_axis=None)


def _diagonal_forward(x, w):
    return x * w


def _diagonal_transpose(s, w, x):
    return s * w


DIAGONAL_OP = LinearOp(_diagonal_forward, _diagonal_transpose, in_axis=None)


def _sum_forward(x, w):  # x: inputs stacked on a new last axis, w: (k,) unit weights
    return tf.reduce_sum(x * w, -1)


def _sum_transpose(s, w, x):
    return s[..., None] * w


SUM_OP = LinearOp(_sum_forward, _sum_transpose, in_axis=None)


def _pointwise_forward(x, w):
    return tf.nn.conv2d(x, w, 1, "VALID")


def _pointwise_transpose(s, w, x):
    return tf.nn.conv2d_transpose(s, w, tf.shape(x), 1, "VALID")


POINTWISE_OP = LinearOp(_pointwise_forward, _pointwise_transpose)
