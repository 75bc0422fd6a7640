"""The registry of supported layers: which Keras layer class (or raw operation) is propagated how.

The table is written once by class name and holds both Keras packages' classes of that name
(Keras 3 and tf-keras layers read the same attributes here). Handlers are matched by the layer's
exact class (a subclass may override ``call`` and would be
mishandled silently), so the table at the end of this module is also the coverage ledger: a class
that is not in it is reported as unsupported, with every offending layer listed at once. Users add
their own classes with :func:`register_handler`.

Handler kinds:

``linear``
    ``z = F(x, W) + b``, linear in ``x``; the layer's rule decides the relevance. Families:
    ``dense``, ``conv`` (layers with weights), ``pool`` (average pooling), ``norm`` (an unfolded
    BatchNormalization: an elementwise affine layer) and ``merge`` (Add: a sum with unit weights).
``passthrough``
    Relevance passes through unchanged (elementwise activations, preprocessing, LayerNorm).
``gradient``
    The plain gradient already is the LRP redistribution: reshapes, padding, cropping,
    concatenation, nearest upsampling (relevance is moved back) and max pooling (winner takes all).
``identity``
    The identity at inference (Dropout and friends).
``gate``
    Multiply: all relevance goes to the gated signal, none to the gate; which input is the gate
    is read from the graph (:mod:`lrp_grad.gating`).
``forward``
    Computed, never given relevance: the planner's handler (:data:`FORWARD_ONLY`) for a layer
    without a handler of its own on a branch that only feeds gates (an attention softmax, an
    unsupported operation inside a squeeze-and-excitation branch).

Raw operations (:class:`~lrp_grad.frontends.RawOp`: ``x + y``, ``x * 2``, ``keras.ops.*``,
tf-keras' ``TFOpLambda``) get the handler of the layer they stand for, by kind: a sum of tensors
is an ``Add``, a product of two tensors a ``Multiply``, arithmetic with a constant and activation
functions pass relevance through, reshapes/slices/concatenations route it, and ``mean``/``sum``
over non-batch axes are weight-free linear layers of the ``pool`` family.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import tensorflow as tf

from . import ops, propagate
from ..frontends import RawOp, activation_name, is_layer, is_layer_class, layer_classes
from .rules import AlphaBeta, Epsilon, Flat, Z

__all__ = ["Context", "Handler", "register_handler", "unregister_handler", "handler_for", "supported_layers",
           "KINDS", "FAMILIES"]

KINDS = ("linear", "passthrough", "gradient", "identity", "gate", "forward")
#: Families of linear layers; composites map rules to them.
FAMILIES = ("dense", "conv", "pool", "norm", "merge")

#: Elementwise activations: relevance passes through them unchanged.
ELEMENTWISE = frozenset(
    "linear relu relu6 elu selu celu tanh sigmoid hard_sigmoid softplus softsign swish silu gelu "
    "exponential leaky_relu mish hard_swish hard_silu hard_tanh log_sigmoid sparse_plus squareplus "
    "soft_shrink hard_shrink tanh_shrink sparse_sigmoid threshold".split()
)
#: Activations whose output is never negative: the next layer may skip the ``x-`` half.
NONNEG = frozenset("relu relu6 sigmoid hard_sigmoid softplus exponential sparse_plus squareplus "
                   "sparse_sigmoid".split())
#: Output activations that are skipped when they are the model's last operation: the logits
#: (their input) are explained, not the probabilities.
HEADS = frozenset(("softmax", "sigmoid", "log_softmax"))
#: Elementwise activations with ``f(0) = 0``.
ZERO_AT_ZERO = ELEMENTWISE - frozenset(
    "sigmoid hard_sigmoid softplus exponential log_sigmoid sparse_plus squareplus sparse_sigmoid threshold".split())


@dataclass(frozen=True)
class Context:
    """What a handler knows when it builds one layer call of the rewritten forward pass.

    Attributes
    ----------
    rule : Rule or None
        The LRP rule of a ``linear`` layer (``None`` for the others).
    nonneg : tuple of bool
        Per input tensor: whether it is guaranteed to be non-negative.
    is_output : bool
        Whether this call produces the model output (a final softmax or sigmoid is then skipped).
    params : callable or None
        ``params() -> (kernel, bias)`` replacing the layer's own weights (set by canonizers,
        e.g. a folded BatchNorm).
    input_shapes : tuple
        Static shapes of the inputs (``tf.TensorShape``).
    compute_dtype : str or None
        Run the linear ops in this reduced precision (``'bfloat16'``, ``'float16'``).
    fuse_relu : bool
        For handlers with ``fuses_relu``: apply the ReLU that follows the layer (its own
        activation, or the next ReLU layer, which the planner then skips) inside the layer's LRP
        op. Set by the planner only where the relevance reaching that ReLU's output is zero
        wherever the output is zero (see :func:`lrp_grad.propagate.linear`).
    gate, gate_problem : int or None, str or None
        For ``gate`` handlers: which input is the gate, as the planner read it from the graph
        (:func:`lrp_grad.gating.gate_index`), or why none could be told.
    """

    rule: object = None
    nonneg: tuple = ()
    is_output: bool = False
    params: Callable | None = None
    input_shapes: tuple = ()
    compute_dtype: str | None = None
    fuse_relu: bool = False
    gate: int | None = None
    gate_problem: str | None = None


def _no_problem(layer, ctx):
    return None


def _never_nonneg(layer, flags):
    return False


def _keeps_sign(layer, flags):
    return all(flags)


@dataclass(frozen=True)
class Handler:
    """How one layer class takes part in the rewritten forward pass.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS` (see module docs).
    apply : callable
        ``apply(layer, inputs, ctx) -> tensor``: the layer's forward computation, built from
        :mod:`lrp_grad.propagate` primitives so that its gradient is the relevance.
    check : callable
        ``check(layer, ctx) -> str or None``: why this configuration is not supported (``ctx``
        is a :class:`Context` with ``is_output`` and ``input_shapes`` set).
    nonneg : callable
        ``nonneg(layer, input_flags) -> bool``: whether the output is guaranteed ``>= 0``.
    family : str or None
        For ``linear`` handlers, one of :data:`FAMILIES` (composites map rules to families).
    weights : callable or None
        ``weights(layer) -> (kernel, bias)``: the tensors a canonizer may replace (bias may be
        ``None``); the handler reads them through ``ctx.params`` when a canonizer did.
    fold : callable or None
        For layers a following BatchNorm can be folded into:
        ``fold(layer, kernel, bias, scale, shift) -> (kernel, bias)`` for ``y * scale + shift``.
    fuses_relu : bool
        ``apply`` honours ``ctx.fuse_relu``: it returns ``relu`` of the layer's output, computed
        inside the LRP op, and skips a fused ``'relu'`` activation of its own.
    zero_in_zero_out : bool or callable
        For the non-``linear`` kinds (a callable: ``zero_in_zero_out(layer) -> bool``): the
        relevance this layer gives an input is zero wherever that input is zero, provided the
        relevance at its output is zero wherever the output is zero (true of routing layers and
        of activations with ``f(0) = 0``). Lets the planner fuse ReLUs below the layer.
    """

    kind: str
    apply: Callable
    check: Callable = _no_problem
    nonneg: Callable = field(default=_never_nonneg)
    family: str | None = None
    weights: Callable | None = None
    fold: Callable | None = None
    fuses_relu: bool = False
    zero_in_zero_out: bool | Callable = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Handler kind must be one of {KINDS}, got {self.kind!r}.")
        if self.kind == "linear" and self.family not in FAMILIES:
            raise ValueError(f"a linear Handler needs family in {FAMILIES}, got {self.family!r}.")


# ---------------------------------------------------------------------------------------------
# Activations (fused into weighted layers, or as layers of their own)


def _activation_problem(fn, is_output):
    name = activation_name(fn)
    if name in ELEMENTWISE or (name in ("softmax", "log_softmax") and is_output):
        return None
    if name in ("softmax", "log_softmax"):
        return f"{name} is only supported as the explained output's last operation (it is then skipped)"
    return (
        f"activation {name!r} is not a known elementwise activation; register the layer with "
        "register_handler if relevance should pass through it"
    )


def _activate(fn, z, ctx):
    name = activation_name(fn)
    if ctx.fuse_relu:
        return z  # the ReLU was applied inside the layer's LRP op
    if name == "linear" or (name in HEADS and ctx.is_output):
        return z  # a final softmax or sigmoid is skipped: the logits are explained
    return propagate.passthrough(fn, z)


def _fused_nonneg(layer, flags):
    return activation_name(layer.activation) in NONNEG


def _channels_last(layer, ctx=None):
    fmt = getattr(layer, "data_format", "channels_last")
    if fmt != "channels_last":
        return f"data_format={fmt!r}; only 'channels_last' is supported"
    return None


# ---------------------------------------------------------------------------------------------
# Linear handlers


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


def _weighted(op_for, kernel_attr="kernel"):
    """``apply`` of a layer with a kernel, an optional bias and a fused activation."""
    read = _reader(kernel_attr)

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
    return _activation_problem(layer.activation, ctx.is_output)


def _conv_transpose_problem(layer, ctx):
    if layer.output_padding is not None:
        return f"output_padding={layer.output_padding}; only output_padding=None is supported"
    if tuple(layer.dilation_rate) != (1, 1):
        return f"dilation_rate={layer.dilation_rate}; only 1 is supported for Conv2DTranspose"
    return _conv_problem(layer, ctx)


def _dense_problem(layer, ctx):
    return _activation_problem(layer.activation, ctx.is_output)


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


def _add(layer, inputs, ctx):
    out = propagate.add(inputs, ctx.rule, ctx.nonneg, relu=ctx.fuse_relu)
    if out is not None:
        return out
    stacked = tf.stack(inputs, axis=-1)
    w = tf.ones([len(inputs)], stacked.dtype)
    return _linear(stacked, ops.SUM_OP, w, None, ctx, all(ctx.nonneg), relu=ctx.fuse_relu)


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


def _own_call(layer, inputs):
    """``layer.call`` on ``inputs`` in the layer's compute dtype, cast back to the inputs' dtype.

    A mixed-precision layer (``dtype='mixed_float16'``) casts its constants to float16; the LRP
    pass runs in the model input's dtype, so such a layer is called in its own dtype.
    """
    dtype = inputs[0].dtype
    compute = tf.as_dtype(getattr(layer, "compute_dtype", None) or dtype)
    if compute != dtype and compute.is_floating:
        inputs = [tf.cast(t, compute) for t in inputs]
        return tf.cast(layer.call(inputs if len(inputs) > 1 else inputs[0]), dtype)
    return layer.call(inputs if len(inputs) > 1 else inputs[0])


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


def _custom_scale(layer, inputs, ctx):
    """InceptionResNetV2's CustomScaleLayer ``x + scale * r`` (the residual join): a sum of the
    shortcut and the scaled branch under the layer's rule, as an Add of ``x`` and ``scale * r``;
    the scaled branch passes its relevance on to ``r``."""
    x, r = inputs
    scale = tf.constant(float(layer.scale), x.dtype)
    if isinstance(ctx.rule, (Z, Epsilon, AlphaBeta, Flat)):  # their shares only see the contributions x, s r
        branch = propagate.passthrough(lambda t: t * scale, r)
        nonneg = (ctx.nonneg[0], ctx.nonneg[1] and float(layer.scale) >= 0)
        return _add(layer, [x, branch], replace(ctx, nonneg=nonneg))
    # Rules that read the weights themselves (w^2, z^B, gamma): a linear layer with weights (1, s).
    weights = tf.stack([tf.ones([], x.dtype), scale])
    return _linear(tf.stack([x, r], axis=-1), ops.SUM_OP, weights, None, ctx, all(ctx.nonneg), relu=ctx.fuse_relu)


def _custom_scale_problem(layer, ctx):
    if len(ctx.input_shapes) != 2:
        return f"called on {len(ctx.input_shapes)} tensors; CustomScaleLayer adds a scaled branch to one shortcut"
    shapes = {_static(s) for s in ctx.input_shapes}
    if len(shapes) != 1:
        return (f"adds tensors of different shapes {[tuple(s) for s in ctx.input_shapes]} (broadcasting); only "
                "same-shaped shortcut and branch are supported")
    return None


def _custom_scale_nonneg(layer, flags):
    return all(flags) and float(layer.scale) >= 0


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


def _softmax_problem(layer, ctx):
    if ctx.is_output:
        return None
    return "softmax is only supported as the explained output's last operation (it is then skipped)"


def _upsampling_problem(layer, ctx):
    if layer.interpolation != "nearest":
        return (f"interpolation={layer.interpolation!r}; only 'nearest' is supported (its gradient "
                "moves relevance back to the copied pixel)")
    return _channels_last(layer)


def _upsample_nearest(layer, inputs, ctx):
    """Nearest upsampling as repeats (what ``UpSampling2D`` computes): tf-keras calls
    ``tf.image.resize``, whose gradient XLA cannot compile for an unknown batch size."""
    (x,) = inputs
    sh, sw = (int(v) for v in layer.size)
    return tf.repeat(tf.repeat(x, sh, axis=1), sw, axis=2)


def _multiply(layer, inputs, ctx):
    gate = ctx.gate
    signal = 1 - gate

    @tf.custom_gradient
    def gated(x_signal, x_gate):
        def grad(r):  # all relevance to the gated signal, none to the gate
            return r, tf.zeros_like(x_gate)

        return x_signal * x_gate, grad

    return gated(inputs[signal], inputs[gate])


def _multiply_problem(layer, ctx):
    if ctx.gate is None:
        return ctx.gate_problem or "cannot tell the gate from the signal"
    return None


# ---------------------------------------------------------------------------------------------
# The registry

_CONV = dict(check=_conv_problem, nonneg=_fused_nonneg, family="conv", weights=_reader(), fuses_relu=True)
IDENTITY = Handler("identity", _identity, nonneg=_keeps_sign, zero_in_zero_out=True)
_PASS = Handler("passthrough", _elementwise_layer, zero_in_zero_out=True)  # for layers with f(0) = 0
_OPAQUE_PASS = Handler("passthrough", _elementwise_layer)  # f(0) may be != 0, or unknown
_ROUTE = Handler("gradient", _call, _channels_last, _keeps_sign, zero_in_zero_out=True)


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
    "UpSampling2D": Handler("gradient", _upsample_nearest, _upsampling_problem, _keeps_sign, zero_in_zero_out=True),
    "Multiply": Handler("gate", _multiply, _multiply_problem, zero_in_zero_out=True),
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
    "Softmax": Handler("identity", _identity, _softmax_problem),
    "Rescaling": Handler("passthrough", _rescaling),  # f(0) = offset: not zero_in_zero_out
    "LayerScale": Handler("passthrough", _layer_scale, zero_in_zero_out=True),
    "Normalization": _OPAQUE_PASS,
    "LayerNormalization": _OPAQUE_PASS,
}

_BUILTIN = {cls: handler for name, handler in _BY_NAME.items() for cls in layer_classes(name)}

# ---------------------------------------------------------------------------------------------
# Raw operations (RawOp): the handler of the layer each stands for


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
    """``mean``/``sum`` over non-batch axes: a weight-free linear map under the layer's rule."""
    (x,) = inputs
    linear_op = ops.fixed_op(lambda t: op.fn(t))
    return _linear(x, linear_op, tf.ones([], x.dtype), None, ctx, ctx.nonneg[0], relu=ctx.fuse_relu)


def _static(shape):
    return tuple(shape)[1:]


def _elementwise_problem(op, ctx):
    if op.n_tensors != 1 or len(ctx.input_shapes) != 1:
        return None
    if op.out_shape is not None and _static(op.out_shape) != _static(ctx.input_shapes[0]):
        return (f"{op.symbol} broadcasts its tensor from {tuple(ctx.input_shapes[0])} to {tuple(op.out_shape)}; "
                "only elementwise arithmetic with a constant of the tensor's shape (or a scalar) is supported")
    return None


def _raw_add_problem(op, ctx):
    shapes = {_static(s) for s in ctx.input_shapes}
    if len(shapes) != 1:
        return (f"{op.symbol} of tensors of different shapes {[tuple(s) for s in ctx.input_shapes]} "
                "(broadcasting); only a sum of same-shaped tensors is supported, as in an Add layer")
    return None


def _two_tensor_problem(op, ctx):
    return (f"{op.symbol} of two tensors is not supported (no LRP rule for it); supported are sums of "
            "tensors (x + y), gating products (x * gate) and arithmetic with constants (x - 1, x / 2)")


def _raw_reduce_problem(op, ctx):
    if op.axes is None or 0 in op.axes:
        return (f"{op.symbol} over axis={op.axes if op.axes is not None else 'None (all)'} reduces the batch "
                "axis; only reductions over the non-batch axes (e.g. axis=(1, 2)) are supported")
    return None


def _raw_activation_problem(op, ctx):
    if op.activation == "softmax" and not ctx.is_output:
        return "softmax is only supported as the explained output's last operation (it is then skipped)"
    return None


def _unknown_op_problem(op, ctx):
    return (f"operation {op.symbol} has no LRP handler; supported operations: + and - of tensors and "
            "constants, * and / by constants or gates, reshape, slicing, concatenate, transpose, "
            "mean/sum over non-batch axes, elementwise activations. Wrap it in a layer and register a handler "
            "(lrp_grad.register_handler)")


_RAW = {
    "add_tensors": Handler("linear", _add, _raw_add_problem, _keeps_sign, "merge", fuses_relu=True),
    "shift": Handler("passthrough", _raw_pass, _elementwise_problem),  # x + c: f(0) = c
    "scale": Handler("passthrough", _raw_pass, _elementwise_problem, zero_in_zero_out=True),  # x * c, -x
    "opaque": Handler("passthrough", _raw_pass, _elementwise_problem),  # x / c, c / x
    "refused": Handler("passthrough", _raw_pass, _two_tensor_problem),
    "route": Handler("gradient", _raw_route, nonneg=_keeps_sign, zero_in_zero_out=True),
    "reduce": Handler("linear", _raw_reduce, _raw_reduce_problem, _keeps_sign, "pool", fuses_relu=True),
    "activation": Handler(
        "passthrough", _raw_activation, _raw_activation_problem,
        lambda op, flags: op.activation in NONNEG,
        zero_in_zero_out=lambda op: op.activation in ZERO_AT_ZERO,
    ),
    "unknown": Handler("passthrough", _raw_pass, _unknown_op_problem),
}


def _raw_handler(op: RawOp) -> Handler:
    """The handler of a raw operation, by its kind and how many of its operands are tensors."""
    kind, several = op.kind, op.n_tensors > 1
    if kind == "add":
        return _RAW["add_tensors" if several else "shift"]
    if kind == "subtract":
        return _RAW["refused" if several else "shift"]
    if kind == "multiply":
        return _BY_NAME["Multiply"] if several else _RAW["scale"]
    if kind == "divide":
        return _RAW["refused" if several else "opaque"]
    if kind == "negative":
        return _RAW["scale"]
    if kind in ("route", "activation"):
        return _RAW[kind]
    if kind in ("mean", "sum"):
        return _RAW["reduce"]
    return _RAW["unknown"]


_USER: dict = {}
#: Bumped by every register_handler/unregister_handler: plans (and explain()'s cached
#: explainers) built before then are stale.
registry_version = 0

_SHORTCUTS = {  # what a user layer does at zero is unknown: no zero_in_zero_out
    "passthrough": _OPAQUE_PASS,
    "gradient": Handler("gradient", _call),
    "identity": IDENTITY,
}


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


def handler_for(layer) -> Handler | None:
    """The handler of ``layer``'s exact class (user registrations first), or ``None``; a raw
    operation gets the handler of its kind."""
    if isinstance(layer, RawOp):
        return _raw_handler(layer)
    cls = type(layer)
    return _USER.get(cls) or _BUILTIN.get(cls)


def supported_layers() -> list:
    """Names of the layer classes that have a handler, built-in and registered."""
    return sorted({cls.__name__ for cls in (*_BUILTIN, *_USER)})
