"""The one place that touches ``tf.custom_gradient``: LRP backward passes for linear layers.

Every weighted layer is expressed as a :class:`LinearOp` (a forward op ``F(x, W)`` that is linear
in ``x`` and in ``W``, and its transpose ``T(s, W) = dF/dx^T s``). :func:`linear` returns the
layer's pre-activation ``z = F(x, W) + b`` wrapped in ``tf.custom_gradient`` so that the
"gradient" arriving at ``z`` is the relevance ``R_j`` and the one leaving towards ``x`` is the
rule's ``R_i``. One ``GradientTape`` pass over the rewritten model then computes LRP.

Cost, counted in units of one forward op (a plain gradient pass costs 2 per layer: F and T):
Epsilon/Z reuse the forward ``z`` and need one T (2 units, as the gradient); z+ needs one more F
with ``W+`` (3 units); alpha-beta derives ``z-`` as ``z - z+`` and runs both transposed ops as one
T on output-channel-concatenated weights (4 units). Inputs not known to be non-negative double
the extra F (``x+`` and ``x-`` concatenated along the input channels) and add one T with ``W``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tensorflow as tf

from .rules import STABILIZER, AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, Z, ZBox

__all__ = ["LinearOp", "linear", "passthrough", "stabilize"]


@dataclass(frozen=True)
class LinearOp:
    """A map ``F(x, W)`` linear in ``x`` and in ``W``; ``W`` is any tensor of weights.

    Attributes
    ----------
    forward : callable
        ``forward(x, W) -> F(x, W)`` without bias, exactly as the Keras layer computes it.
    transpose : callable
        ``transpose(s, W, x) -> T(s, W)``, the vector-Jacobian product of ``forward`` w.r.t. ``x``
        (``x`` only provides the output shape).
    in_axis, out_axis : int or None
        Kernel axes of the input and output channels when every output sums over all input
        channels (Dense, Conv): then two ops ``F(x1, W1) + F(x2, W2)`` run as one call on
        channel-concatenated operands. ``None`` (depthwise, pooling, diagonal layers) runs two calls.
    """

    forward: Callable
    transpose: Callable
    in_axis: int | None = -2
    out_axis: int | None = -1

    def forward2(self, x1, w1, x2, w2):
        """``F(x1, W1) + F(x2, W2)``, as one call where the layout allows."""
        if self.in_axis is None:
            return self.forward(x1, w1) + self.forward(x2, w2)
        return self.forward(tf.concat([x1, x2], axis=-1), tf.concat([w1, w2], axis=self.in_axis))

    def transpose2(self, s1, w1, s2, w2, x):
        """``T(s1, W1) + T(s2, W2)``, as one call where the layout allows."""
        if self.out_axis is None:
            return self.transpose(s1, w1, x) + self.transpose(s2, w2, x)
        return self.transpose(tf.concat([s1, s2], axis=-1), tf.concat([w1, w2], axis=self.out_axis), x)


def stabilize(z, eps):
    """``z + eps * sign(z)`` with ``sign(0) = +1`` (the reference convention)."""
    return z + tf.where(z >= 0, tf.constant(eps, z.dtype), tf.constant(-eps, z.dtype))


def _split(t):
    """Return the positive and negative parts of ``t``."""
    pos = tf.nn.relu(t)
    return pos, t - pos


def _positive_forward(op, x, w_pos, w_neg, x_nonneg):
    """``sum_i (x_i w_ij)^+``: ``F(x, W+)`` or, for signed inputs, ``F(x+, W+) + F(x-, W-)`` as one op."""
    if x_nonneg:
        return op.forward(x, w_pos)
    x_pos, x_neg = _split(x)
    return op.forward2(x_pos, w_pos, x_neg, w_neg)


def _signed_pair_transpose(op, x, s_pos, s_neg, w_pos, w_neg, w, x_nonneg, q=None):
    """Relevance ``x+ (W+^T s+ + W-^T s-) + x- (W-^T s+ + W+^T s-)`` with at most two T calls.

    ``P = W+^T s+ + W-^T s-`` is one call on output-channel-concatenated weights; for signed
    inputs ``W-^T s+ + W+^T s- = W^T (s+ + s-) - P`` and ``x+ P + x- (Q - P) = |x| P + x- Q``.
    ``q`` is ``Q`` when the caller already has it.
    """
    if s_neg is None:
        p = op.transpose(s_pos, w_pos, x)
    else:
        p = op.transpose2(s_pos, w_pos, s_neg, w_neg, x)
    if x_nonneg:
        return x * p
    if q is None:
        q = op.transpose(s_pos if s_neg is None else s_pos + s_neg, w, x)
    return tf.abs(x) * p + tf.minimum(x, 0) * q


def _ones_forward(op, x, w):
    """``F(1, W)`` for one sample: the denominators of the input-independent rules."""
    return op.forward(tf.ones_like(x[:1]), w)


def _peak(t, per_sample: bool):
    """max |t| (per sample or over the whole tensor), 1 where it is 0: a scale for reduced precision."""
    axes = list(range(1, t.shape.rank)) if per_sample else None
    peak = tf.reduce_max(tf.abs(t), axis=axes, keepdims=per_sample)
    return tf.where(peak > 0, peak, tf.ones_like(peak))


def reduced_precision(op: LinearOp, compute_dtype) -> LinearOp:
    """``op`` computed on ``compute_dtype`` operands, its results cast back to the input dtype.

    Only the heavy ops (F and T) run in reduced precision; every division, stabiliser and
    product with the input stays in the model's dtype. F and T are linear in both operands, so
    each operand is scaled to max |value| = 1 first (per sample for the batch operand) and the
    result scaled back in full precision: float16 neither overflows (65504) nor underflows.
    """
    dtype = tf.as_dtype(compute_dtype)

    def rescale(result, a_peak, w_peak):
        shape = [-1] + [1] * (result.shape.rank - 1)
        return tf.cast(result, a_peak.dtype) * tf.reshape(a_peak, shape) * w_peak

    def forward(x, w):
        xp, wp = _peak(x, True), _peak(w, False)
        return rescale(op.forward(tf.cast(x / xp, dtype), tf.cast(w / wp, dtype)), xp, wp)

    def transpose(s, w, x):
        sp, wp = _peak(s, True), _peak(w, False)
        return rescale(op.transpose(tf.cast(s / sp, dtype), tf.cast(w / wp, dtype), tf.cast(x, dtype)), sp, wp)

    return LinearOp(forward, transpose, op.in_axis, op.out_axis)


def _backward(rule: Rule, op: LinearOp, x, w, b, z_nobias, z, x_nonneg: bool, reduced: bool = False):
    """Return a function mapping the relevance ``R`` at ``z`` to the relevance at ``x``.

    ``reduced``: F runs in reduced precision, where ``z- = z - z+`` would cancel catastrophically;
    ``z-`` is then computed by its own forward op.
    """
    dtype = z.dtype
    if isinstance(rule, Z):
        return lambda r: x * op.transpose(tf.math.divide_no_nan(r, z), w, x)

    if isinstance(rule, Epsilon):
        denom = stabilize(z if rule.bias else z_nobias, rule.epsilon)
        return lambda r: x * op.transpose(r / denom, w, x)

    if isinstance(rule, AlphaBeta):
        w_pos, w_neg = _split(w)
        zp_nobias = _positive_forward(op, x, w_pos, w_neg, x_nonneg)
        if reduced:
            zn_nobias = _positive_forward(op, x, w_neg, w_pos, x_nonneg)
        else:
            zn_nobias = z_nobias - zp_nobias
        zp, zn = zp_nobias, zn_nobias
        if rule.bias and b is not None:
            b_pos, b_neg = _split(b)
            zp, zn = zp + b_pos, zn + b_neg
        inv_p = tf.constant(rule.alpha, dtype) / stabilize(zp, STABILIZER)
        inv_n = tf.constant(-rule.beta, dtype) / stabilize(zn, STABILIZER) if rule.beta else None

        def ab(r):
            return _signed_pair_transpose(
                op, x, r * inv_p, None if inv_n is None else r * inv_n, w_pos, w_neg, w, x_nonneg
            )

        return ab

    if isinstance(rule, Flat):
        ones_w = tf.ones_like(w)
        denom = stabilize(_ones_forward(op, x, ones_w), STABILIZER)
        return lambda r: op.transpose(r / denom, ones_w, x)

    if isinstance(rule, WSquare):
        w2 = tf.square(w)
        denom = stabilize(_ones_forward(op, x, w2), STABILIZER)
        return lambda r: op.transpose(r / denom, w2, x)

    if isinstance(rule, ZBox):
        w_pos, w_neg = _split(w)
        shape = tf.shape(x[:1])
        low = tf.broadcast_to(tf.constant(rule.low, dtype), shape)
        high = tf.broadcast_to(tf.constant(rule.high, dtype), shape)
        z_box = (z if rule.bias else z_nobias) - op.forward(low, w_pos) - op.forward(high, w_neg)
        denom = stabilize(z_box, STABILIZER)

        def zbox(r):
            s = r / denom
            c_all = op.transpose(s, w, x)
            c_pos = op.transpose(s, w_pos, x)
            return x * c_all - low * c_pos - high * (c_all - c_pos)

        return zbox

    if isinstance(rule, Gamma):
        w_pos, w_neg = _split(w)
        gamma = tf.constant(rule.gamma, dtype)
        zp = _positive_forward(op, x, w_pos, w_neg, x_nonneg)
        zn = _positive_forward(op, x, w_neg, w_pos, x_nonneg) if reduced else z_nobias - zp
        if b is not None:
            b_pos, b_neg = _split(b)
            zp, zn = zp + b_pos, zn + b_neg
        zero = tf.zeros_like(z)
        inv_p = tf.where(z > 0, 1 / stabilize(z + gamma * zp, STABILIZER), zero)
        inv_n = tf.where(z < 0, 1 / stabilize(z + gamma * zn, STABILIZER), zero)

        def gamma_rule(r):
            s_pos, s_neg = r * inv_p, r * inv_n
            q = op.transpose(s_pos + s_neg, w, x)
            pair = _signed_pair_transpose(op, x, s_pos, s_neg, w_pos, w_neg, w, x_nonneg, q=q)
            return x * q + gamma * pair

        return gamma_rule

    raise TypeError(f"no LRP backward pass for rule {rule!r} ({type(rule).__name__})")


def linear(x, op: LinearOp, w, b, rule: Rule, x_nonneg: bool = False, compute_dtype=None):
    """Return ``z = F(x, W) + b`` whose gradient w.r.t. ``x`` is the ``rule``'s relevance.

    Parameters
    ----------
    x : tf.Tensor
        Layer input.
    op : LinearOp
        The layer's linear map.
    w, b : tf.Tensor or None
        Kernel (already read from the variable; no gradient flows to it) and bias or ``None``.
    rule : Rule
        The LRP rule of this layer.
    x_nonneg : bool
        Whether ``x >= 0`` is guaranteed (it follows a ReLU); skips the ``x-`` half of the
        sign-split rules. Must only be ``True`` when it is true.
    compute_dtype : str, optional
        Run F and T in this precision (``'bfloat16'``, ``'float16'``); see :func:`reduced_precision`.
    """
    reduced = compute_dtype is not None and tf.as_dtype(compute_dtype) != x.dtype
    if reduced:
        op = reduced_precision(op, compute_dtype)

    @tf.custom_gradient
    def lrp_linear(x):
        z_nobias = op.forward(x, w)
        z = z_nobias if b is None else tf.nn.bias_add(z_nobias, b)
        return z, _backward(rule, op, x, w, b, z_nobias, z, x_nonneg, reduced)

    return lrp_linear(x)


def passthrough(fn: Callable, x):
    """Apply the elementwise ``fn`` in the forward pass; relevance passes through unchanged."""

    @tf.custom_gradient
    def lrp_passthrough(x):
        def grad(r, variables=None):  # a layer's own variables (e.g. LayerNorm) get nothing
            if variables:
                return r, [None] * len(variables)
            return r

        return fn(x), grad

    return lrp_passthrough(x)
