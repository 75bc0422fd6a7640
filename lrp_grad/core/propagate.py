"""The one place that touches ``tf.custom_gradient``: LRP backward passes for linear layers.

Every weighted layer is expressed as a :class:`LinearOp` (a forward op ``F(x, W)`` that is linear
in ``x`` and in ``W``, and its transpose ``T(s, W) = dF/dx^T s``). :func:`linear` returns the
layer's pre-activation ``z = F(x, W) + b`` wrapped in ``tf.custom_gradient`` so that the
"gradient" arriving at ``z`` is the relevance ``R_j`` and the one leaving towards ``x`` is the
rule's ``R_i``. One ``GradientTape`` pass over the rewritten model then computes LRP.

Cost, counted in units of one forward op (a plain gradient pass costs 2 per layer: F and T):
Epsilon/Z reuse the forward ``z`` and need one T (2 units, as the gradient); z+ needs one more F
with ``W+`` (3 units); alpha-beta derives ``z-`` as ``z - z+`` and needs two transposed ops,
``W+^T s+ + W-^T s-`` (4 units: 2x a gradient pass); one call on channel-concatenated operands
was measured slower on this CPU, with twice the peak memory. Inputs not known to be
non-negative double the extra F (``|x|`` and ``x-`` concatenated along the input channels) and
add one T with ``W`` (z+), or two with ``W-``/``W+`` (alpha-beta with beta > 0 and gamma, whose
cross terms are computed directly: see :func:`_signed_pair_transpose`). In a ReLU network only
the first layer has signed inputs.

Memory: every extra op runs in the backward pass, once the layer's relevance exists, so the
forward pass keeps no more tensors alive than a gradient pass (plus ``z``, which a layer followed
by a ReLU does not need: see ``relu`` in :func:`linear`). At most one modified copy of a kernel
exists at a time, and large Dense kernels are modified and used in row blocks
(:class:`LinearOp`): a whole copy of VGG16's first Dense kernel would be 400 MB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tensorflow as tf

from .rules import STABILIZER, AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, Z, ZBox

__all__ = ["LinearOp", "linear", "add", "fuses_relu", "passthrough", "stabilize", "no_variable_gradients"]


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
    in_axis : int or None
        Kernel axis of the input channels when every output sums over all input channels
        (Dense, Conv): then ``F(x+, W+) + F(x-, W-)`` for signed inputs runs as one call on
        channel-concatenated operands. ``None`` (depthwise, pooling, diagonal layers) runs two.
    row_blocks : bool
        The kernel's first axis indexes the input's last axis (Dense). Then a modified kernel
        ``g(W)`` (``W+``, ``W-``, ...) of more than :data:`BLOCK_ELEMENTS` entries is never made
        whole: :meth:`forward_mod` and :meth:`transpose_mod` run on blocks of rows, one after the
        other (VGG16's first Dense kernel is 400 MB; a copy of it would double the peak memory
        of an explanation).
    """

    forward: Callable
    transpose: Callable
    in_axis: int | None = -2
    row_blocks: bool = False

    def _blocks(self, w):
        """Row ranges of ``w`` to work on one at a time, or ``None`` to use it whole."""
        size = w.shape.num_elements()
        if not self.row_blocks or size is None or size <= BLOCK_ELEMENTS:
            return None
        per = max(1, BLOCK_ELEMENTS // (size // w.shape[0]))
        return [(a, min(a + per, w.shape[0])) for a in range(0, w.shape[0], per)]

    def forward_mod(self, x, w, g):
        """``F(x, g(W))`` for an elementwise ``g``."""
        blocks = self._blocks(w)
        if blocks is None:
            return self.forward(x, g(w))
        out = None
        for a, b in blocks:  # each block waits for the previous one: one block copy at a time
            with tf.control_dependencies([] if out is None else [out]):
                part = self.forward(x[..., a:b], g(w[a:b]))
            out = part if out is None else out + part
        return out

    def transpose_mod(self, s, w, g, x):
        """``T(s, g(W))`` for an elementwise ``g``."""
        blocks = self._blocks(w)
        if blocks is None:
            return self.transpose(s, g(w), x)
        parts = []
        for a, b in blocks:
            with tf.control_dependencies(parts[-1:]):
                parts.append(self.transpose(s, g(w[a:b]), x[..., a:b]))
        return tf.concat(parts, axis=-1)

    def forward_pair(self, x1, g, x2, w):
        """``F(x1, g(W)) + F(x2, W)``, as one call where the layout allows."""
        if self.in_axis is None or self._blocks(w) is not None:
            return self.forward_mod(x1, w, g) + self.forward(x2, w)
        return self.forward(tf.concat([x1, x2], axis=-1), tf.concat([g(w), w], axis=self.in_axis))


#: Modified kernels larger than this (entries) are processed in row blocks (see LinearOp).
BLOCK_ELEMENTS = 1 << 23


def _neg(w):
    return tf.minimum(w, 0)


def stabilize(z, eps):
    """``z + eps * sign(z)`` with ``sign(0) = +1`` (the reference convention)."""
    return z + tf.where(z >= 0, tf.constant(eps, z.dtype), tf.constant(-eps, z.dtype))


def _split(t):
    """Return the positive and negative parts of ``t``."""
    pos = tf.nn.relu(t)
    return pos, t - pos


# At most one modified copy of a kernel exists at a time (and of a large Dense kernel only a block
# of rows, see LinearOp). Forward terms with W- are rewritten with W+ and W.


def _positive_sum(op, x, w, x_nonneg):
    """``sum_i (x_i w_ij)^+ = F(x+, W+) + F(x-, W-) = F(|x|, W+) + F(x-, W)`` (one op for x >= 0)."""
    if x_nonneg:
        return op.forward_mod(x, w, tf.nn.relu)
    return op.forward_pair(tf.abs(x), tf.nn.relu, tf.minimum(x, 0), w)


def _negative_sum(op, x, w, x_nonneg):
    """``sum_i (x_i w_ij)^- = F(x+, W-) + F(x-, W+)`` computed on its own, as sums of terms that
    are all ``<= 0`` (for reduced precision, where ``z - z+`` cancels catastrophically: its
    rounding error can flip the sign of a small ``z-``)."""
    if x_nonneg:
        return op.forward_mod(x, w, _neg)
    return op.forward_mod(tf.nn.relu(x), w, _neg) + op.forward_mod(tf.minimum(x, 0), w, tf.nn.relu)


def _signed_pair_transpose(op, x, s_pos, s_neg, w, x_nonneg, q=None):
    """Relevance ``x+ (W+^T s+ + W-^T s-) + x- (W-^T s+ + W+^T s-)``.

    ``P = W+^T s+ + W-^T s-`` in two T calls; ``W-`` is made only after the first call, when
    ``W+`` is no longer needed, so at most one modified copy of the kernel exists at a time.
    Without ``s-`` the signed inputs' term is ``x- (Q - P)`` with ``Q = W^T s+`` (``q`` when the
    caller has it). With ``s-`` it is computed as ``W-^T s+ + W+^T s-`` itself: ``s-`` is huge
    (``beta R / eps``) where ``z- = 0``, and ``Q - P`` would then be a difference of huge numbers
    (measured: 6% error in float32); the direct terms are exact there (an ``x_i < 0`` that feeds
    such a unit has ``w_ij <= 0``, so ``W+`` gives it nothing of the huge share).
    """
    p = op.transpose_mod(s_pos, w, tf.nn.relu, x)
    if s_neg is not None:
        with tf.control_dependencies([p]):
            p = p + op.transpose_mod(s_neg, w, _neg, x)
    if x_nonneg:
        return x * p
    if s_neg is None:
        if q is None:
            q = op.transpose(s_pos, w, x)
        return tf.abs(x) * p + tf.minimum(x, 0) * q
    with tf.control_dependencies([p]):
        cross = op.transpose_mod(s_neg, w, tf.nn.relu, x)
    with tf.control_dependencies([cross]):
        cross = cross + op.transpose_mod(s_pos, w, _neg, x)
    return tf.nn.relu(x) * p + tf.minimum(x, 0) * cross


def _scaled(r, factor, dtype):
    """``factor * r`` (no multiplication for a factor of 1)."""
    return r if factor == 1 else r * tf.constant(factor, dtype)


def _negative_share(r, beta, gap, dtype):
    """``beta R / -stab(z-)`` with ``gap = eps - z-`` (b- included): for ``z- <= 0`` that is what
    ``stab()`` gives; a ``z-`` that rounding made positive is clamped to 0, so the divisor
    ``max(gap, eps)`` is never zero."""
    return _scaled(r, beta, dtype) / tf.maximum(gap, tf.constant(STABILIZER, dtype))


def _ones_forward(op, x, w, g):
    """``F(1, g(W))`` for one sample: the denominators of the input-independent rules."""
    return op.forward_mod(tf.ones_like(x[:1]), w, g)


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

    return LinearOp(forward, transpose, op.in_axis, op.row_blocks)


def _after_relevance(fn):
    """Run ``fn(r)``'s ops only once ``r`` exists. Its extra forward ops (``z+``, denominators)
    depend on forward tensors alone, so the graph executor would otherwise start them during the
    forward pass and keep their results alive until the backward pass reaches the layer."""

    def wrapped(r):
        with tf.control_dependencies([r]):
            return fn(r)

    return wrapped


def _backward(rule: Rule, op: LinearOp, x, w, b, z_nobias, z, x_nonneg: bool, reduced: bool = False, y=None):
    """Return a function mapping the relevance ``R`` at ``z`` to the relevance at ``x``.

    Everything the rule needs beyond ``x`` and ``z`` (``z+``, ``z-``, denominators) is computed
    inside the returned function, during the backward pass: the forward pass keeps no more
    tensors alive than a plain gradient pass does, which bounds peak memory; of ``z`` and the
    bias-free ``z_nobias`` only what the rule refers to is kept.

    ``reduced``: F runs in reduced precision, where ``z- = z - z+`` would cancel catastrophically;
    ``z-`` is then computed by its own forward op.

    ``y``: the layer's ReLU is fused (``z`` and ``z_nobias`` are ``None``): ``R`` is zero wherever
    ``y = relu(z)`` is zero, and ``z = y`` elsewhere, so ``y`` stands in for ``z`` (see
    :func:`linear`).
    """
    dtype = x.dtype

    def full_z():  # only the tensors a rule's backward refers to stay alive after the forward
        return z

    def split_sums():
        """``(z+, z-)`` without bias: sums of the positive / negative contributions."""
        zp = _positive_sum(op, x, w, x_nonneg)
        zn = _negative_sum(op, x, w, x_nonneg) if reduced else z_nobias - zp
        return zp, zn

    if y is not None and (isinstance(rule, Z) or (isinstance(rule, Epsilon) and rule.bias)):
        # r = 0 where y = 0 (0 / eps = 0 there); elsewhere y + eps = z + eps = stab(z).
        if isinstance(rule, Z):
            return lambda r: x * op.transpose(tf.math.divide_no_nan(r, y), w, x)
        # _after_relevance: y + eps depends on y alone and would otherwise be computed (and kept)
        # during the forward pass: one more activation-sized tensor per layer at the peak.
        return _after_relevance(lambda r: x * op.transpose(r / (y + tf.constant(rule.epsilon, dtype)), w, x))

    if isinstance(rule, Z):
        return lambda r: x * op.transpose(tf.math.divide_no_nan(r, full_z()), w, x)

    if isinstance(rule, Epsilon):
        return _after_relevance(
            lambda r: x * op.transpose(r / stabilize(full_z() if rule.bias else z_nobias, rule.epsilon), w, x))

    if isinstance(rule, AlphaBeta):

        @_after_relevance
        def ab(r):
            eps = tf.constant(STABILIZER, dtype)
            b_pos, b_neg = _split(b) if rule.bias and b is not None else (None, None)
            zp = _positive_sum(op, x, w, x_nonneg)
            # c = z+ + b+ + eps. For x >= 0, z+ = F(x, W+) sums non-negative terms, so it is >= 0
            # even after rounding and c is stab(z+ + b+). Otherwise stabilise by the sign of the
            # computed value (rounding can make it slightly negative).
            c = zp + (eps if b_pos is None else b_pos + eps)
            ra = _scaled(r, rule.alpha, dtype)
            if x_nonneg:
                s_pos = ra / c
            else:
                s_pos = ra / stabilize(zp if b_pos is None else zp + b_pos, STABILIZER)
            s_neg = None
            if rule.beta:
                # With z- = z - (z+ + b+) (bias-free terms when the rule leaves the bias out),
                # eps - z- = c - z: no extra forward op.
                if reduced:  # z - z+ would cancel catastrophically in reduced precision
                    zn = _negative_sum(op, x, w, x_nonneg)
                    gap = eps - (zn if b_neg is None else zn + b_neg)
                elif rule.bias or b is None:
                    gap = c - (full_z() if y is None else y)  # y = z where R != 0, see linear()
                else:
                    gap = c - (z_nobias if y is None else y - b)
                s_neg = _negative_share(r, rule.beta, gap, dtype)
            return _signed_pair_transpose(op, x, s_pos, s_neg, w, x_nonneg)

        return ab

    if isinstance(rule, (Flat, WSquare)):

        @_after_relevance
        def flat(r):
            g = tf.ones_like if isinstance(rule, Flat) else tf.square
            return op.transpose_mod(r / stabilize(_ones_forward(op, x, w, g), STABILIZER), w, g, x)

        return flat

    if isinstance(rule, ZBox):

        @_after_relevance
        def zbox(r):
            shape = tf.shape(x[:1])
            low = tf.broadcast_to(tf.constant(rule.low, dtype), shape)
            high = tf.broadcast_to(tf.constant(rule.high, dtype), shape)
            # F(l, W+) + F(h, W-) = F(l - h, W+) + F(h, W)
            z_box = (full_z() if rule.bias else z_nobias) - op.forward_mod(low - high, w, tf.nn.relu) - op.forward(high, w)
            s = r / stabilize(z_box, STABILIZER)
            c_all = op.transpose(s, w, x)
            c_pos = op.transpose_mod(s, w, tf.nn.relu, x)
            return x * c_all - low * c_pos - high * (c_all - c_pos)

        return zbox

    if isinstance(rule, Gamma):

        @_after_relevance
        def gamma_rule(r):
            gamma = tf.constant(rule.gamma, dtype)
            zp, zn = split_sums()
            if b is not None:
                b_pos, b_neg = _split(b)
                zp, zn = zp + b_pos, zn + b_neg
            z = full_z()
            zero = tf.zeros_like(z)
            s_pos = r * tf.where(z > 0, 1 / stabilize(z + gamma * zp, STABILIZER), zero)
            s_neg = r * tf.where(z < 0, 1 / stabilize(z + gamma * zn, STABILIZER), zero)
            q = op.transpose(s_pos + s_neg, w, x)
            pair = _signed_pair_transpose(op, x, s_pos, s_neg, w, x_nonneg, q=q)
            return x * q + gamma * pair

        return gamma_rule

    raise TypeError(f"no LRP backward pass for rule {rule!r} ({type(rule).__name__})")


def no_variable_gradients(backward):
    """A backward pass ``backward(r)`` that also answers for variables the forward read (a layer's
    own weights, a custom layer's kernel bound inside a raw operation): they get no gradient.
    Every custom gradient here returns its backward through it."""

    def grad(r, variables=None):
        rx = backward(r)
        return (rx, [None] * len(variables)) if variables else rx

    return grad


def _with_bias(z, b):
    """``z + b``: a channel bias (``bias_add``, as Keras adds it) or a bias of several axes
    broadcast from the right (``EinsumDense``'s ``bias_axes``)."""
    if b is None:
        return z
    return tf.nn.bias_add(z, b) if b.shape.rank == 1 else z + b


def fuses_relu(rule: Rule) -> bool:
    """Whether :func:`linear` with ``relu=True`` runs the rule on ``relu(z)`` instead of keeping ``z``."""
    return isinstance(rule, (Z, AlphaBeta)) or (isinstance(rule, Epsilon) and rule.bias)


def linear(x, op: LinearOp, w, b, rule: Rule, x_nonneg: bool = False, compute_dtype=None, relu: bool = False):
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
    relu : bool
        Return ``relu(z)`` instead, for a layer followed by a ReLU whose relevance is zero wherever
        the ReLU's output is zero (the planner checks this: every rule above multiplies by its
        input). Then the relevance at ``z <= 0`` is zero and, for ``z > 0``, ``z = relu(z)``: the
        epsilon and z rules divide by ``relu(z) + eps`` (two elementwise passes instead of four,
        and ``z`` need not be kept; Grappler also fuses the ReLU into the convolution).
    """
    reduced = compute_dtype is not None and tf.as_dtype(compute_dtype) != x.dtype
    if reduced:
        op = reduced_precision(op, compute_dtype)
    if relu:
        if not fuses_relu(rule):
            return passthrough(tf.nn.relu, linear(x, op, w, b, rule, x_nonneg))

        @tf.custom_gradient
        def lrp_linear_relu(x):
            z = op.forward(x, w)
            y = tf.nn.relu(_with_bias(z, b))
            return y, no_variable_gradients(_backward(rule, op, x, w, b, None, None, x_nonneg, reduced, y=y))

        return lrp_linear_relu(x)

    @tf.custom_gradient
    def lrp_linear(x):
        z_nobias = op.forward(x, w)
        z = _with_bias(z_nobias, b)
        return z, no_variable_gradients(_backward(rule, op, x, w, b, z_nobias, z, x_nonneg, reduced))

    return lrp_linear(x)


def add(xs, rule: Rule, nonneg, relu: bool = False):
    """``z = x_1 + ... + x_k`` (a Keras ``Add``) whose gradients are the ``rule``'s relevance.

    The rule on unit weights, computed per input without stacking the inputs (a copy of every
    input on the hot path of residual networks): ``R_k = x_k s`` for Z and epsilon,
    ``R_k = x_k+ s+ + x_k- s-`` for alpha-beta, ``R_k = R / k`` for flat and w^2. Returns ``None``
    for the other rules (the caller falls back to the general linear op). ``nonneg`` gives, per
    input, whether it is known to be ``>= 0``; ``relu`` returns ``relu(z)`` as in :func:`linear`.
    """
    if not isinstance(rule, (Z, Epsilon, AlphaBeta, Flat, WSquare)):
        return None
    k = len(xs)

    @tf.custom_gradient
    def lrp_add(*xs):
        z = tf.add_n(list(xs))
        y = tf.nn.relu(z) if relu else z
        dtype = z.dtype
        eps = tf.constant(STABILIZER, dtype)

        def shares(r):
            if isinstance(rule, (Flat, WSquare)):  # F(1, 1) = k for every output
                return [r / tf.constant(k + STABILIZER, dtype)] * k
            if isinstance(rule, Z):
                s = tf.math.divide_no_nan(r, y)
                return [x * s for x in xs]
            if isinstance(rule, Epsilon):  # an Add has no bias: bias=True and False agree
                s = r / (y + tf.constant(rule.epsilon, dtype)) if relu else r / stabilize(z, rule.epsilon)
                return [x * s for x in xs]
            parts = [x if known else tf.nn.relu(x) for x, known in zip(xs, nonneg)]
            c = tf.add_n(parts) + eps  # z+ sums non-negative values: stab() is the plain shift
            s_pos = _scaled(r, rule.alpha, dtype) / c
            if all(nonneg) or not rule.beta:
                return [p * s_pos for p in parts]
            # eps - z- = c - z (with a fused ReLU, y stands for z where r != 0, as in linear())
            s_neg = _negative_share(r, rule.beta, c - y, dtype)
            return [x * s_pos if known else x * tf.where(x > 0, s_pos, s_neg) for x, known in zip(xs, nonneg)]

        return y, _after_relevance(shares)

    return lrp_add(*xs)


def passthrough(fn: Callable, x):
    """Apply the elementwise ``fn`` in the forward pass; relevance passes through unchanged."""

    @tf.custom_gradient
    def lrp_passthrough(x):
        return fn(x), no_variable_gradients(lambda r: r)

    return lrp_passthrough(x)
