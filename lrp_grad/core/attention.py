"""LRP backward passes for what transformers add to linear layers: products of two signals, a softmax
inside the network, and normalisations with their scale held constant.

Like :mod:`lrp_grad.core.propagate` (the linear layers), each function returns the forward value
wrapped in ``tf.custom_gradient``, so that the "gradient" arriving at the output is the relevance
there and the one leaving towards the inputs is the rule's relevance. The attention rules are
:class:`~lrp_grad.core.rules.AttnLRP` (Achtibat et al. 2024) and
:class:`~lrp_grad.core.rules.CPLRP` (Ali et al. 2022).

Cost: a product's backward is its two vector-Jacobian products (what a plain gradient computes)
plus elementwise work; the softmax and normalisation rules are elementwise and reductions. So an
AttnLRP pass costs about one gradient pass.
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from .propagate import no_variable_gradients, stabilize
from .rules import CPLRP, Epsilon, Rule, Z

__all__ = ["product", "softmax", "normalization"]


def _share(r, z, rule: Rule):
    """``R / stab(z)``: the relevance per unit of the output, under the rule's stabiliser."""
    if isinstance(rule, Z):
        return tf.math.divide_no_nan(r, z)
    return r / stabilize(z, rule.epsilon)


def product(fn: Callable, a, b, rule: Rule, constant: int | None = None):
    """``z = fn(a, b)``, bilinear in ``a`` and ``b`` (a matrix product, an einsum of two tensors,
    an elementwise product), whose gradients are the rule's relevance.

    Each factor gets ``x * dz/dx^T (R / stab(z))``, the epsilon rule over the sum of products
    with the whole product as one term; under AttnLRP (uniform rule) each takes half. ``constant``
    (``0`` or ``1``) names a factor held constant (CP-LRP's attention weights): it gets nothing
    and the other factor all. The two vector-Jacobian products are the ones a plain gradient of
    ``fn`` computes.
    """
    held = constant if isinstance(rule, CPLRP) else None

    @tf.custom_gradient
    def lrp_product(a, b):
        z = fn(a, b)

        def grad(r):
            s = _share(r, z, rule)
            with tf.GradientTape() as tape:  # only its gradients are used: the forward is pruned
                tape.watch([a, b])
                again = fn(a, b)
            ga, gb = tape.gradient(again, [a, b], output_gradients=s)
            if held == 0:
                return tf.zeros_like(a), b * gb
            if held == 1:
                return a * ga, tf.zeros_like(b)
            half = tf.constant(0.5, z.dtype)
            return half * (a * ga), half * (b * gb)

        return z, no_variable_gradients(grad)

    return lrp_product(a, b)


#: The highest rank TensorFlow's CPU (oneDNN) softmax kernel takes; higher ones are computed on a
#: rank-2 view (HaloNet's and VOLO's rank-6 attention scores).
_SOFTMAX_MAX_RANK = 5


def softmax_any_rank(x, axis):
    """A softmax of ``x`` over ``axis`` (an int or a tuple) computed on the rank-2 view
    ``(rows, normalised entries)``: the normalised axes moved last and flattened, then put back."""
    rank = x.shape.rank
    axes = sorted({int(a) % rank for a in ((axis,) if isinstance(axis, int) else axis)})
    rest = [a for a in range(rank) if a not in axes]
    moved = tf.transpose(x, rest + axes) if rest + axes != list(range(rank)) else x
    shape = tf.shape(moved)
    flat = tf.reshape(moved, tf.stack([-1, tf.reduce_prod(shape[len(rest):])]))
    s = tf.reshape(tf.nn.softmax(flat, axis=-1), shape)
    return tf.transpose(s, [(rest + axes).index(a) for a in range(rank)]) if rest + axes != list(range(rank)) else s


def softmax(fn: Callable, x, axis):
    """``s = fn(x)``, a softmax over ``axis`` (an int or a tuple), with the AttnLRP softmax rule
    ``R_x = x * (R - s * sum_axis R)`` (Achtibat et al. 2024, Prop. 3.1: the first-order Taylor
    term at ``x``; the rest, a bias, is absorbed). Above rank 5 the forward is
    :func:`softmax_any_rank` (TensorFlow's CPU kernel refuses those ranks)."""

    @tf.custom_gradient
    def lrp_softmax(x):
        s = fn(x) if x.shape.rank <= _SOFTMAX_MAX_RANK else softmax_any_rank(x, axis)

        def grad(r):
            return x * (r - s * tf.reduce_sum(r, axis=axis, keepdims=True))

        return s, no_variable_gradients(grad)

    return lrp_softmax(x)


def normalization(forward: Callable, x, factor: Callable, center: Callable | None, rule: Rule,
                  offset=None):
    """``y = forward(x)``, a normalisation ``y = c(x) * f(x) + beta`` whose scale ``f`` (``gamma``
    over the standard deviation or root mean square) is held constant.

    Then ``y`` is linear in ``x`` (``c`` centres, or is the identity), and the rule is the epsilon
    (or Z) rule of that linear map: ``R_x = x * c^T(f * R / stab(y))``, with the bias ``beta``
    absorbing its share (``Epsilon(bias=False)`` leaves ``offset`` out of the denominator). This is
    AttnLRP's and CP-LRP's treatment of LayerNorm (both hold the scale constant).

    Parameters
    ----------
    forward : callable
        The layer's own computation (so the rewritten forward equals the model's).
    factor : callable
        ``factor(x)``: the per-element scale ``f``, broadcastable to ``x``.
    center : callable or None
        ``center(v)``: subtracts the mean over the normalised axes (self-adjoint); ``None`` for
        norms that do not centre (RMS norms).
    offset : tf.Tensor or None
        ``beta``, for ``Epsilon(bias=False)``.
    """
    if not isinstance(rule, (Z, Epsilon)):
        raise TypeError(f"a normalisation takes Z or Epsilon, got {rule!r}")

    @tf.custom_gradient
    def lrp_normalization(x):
        y = forward(x)

        def grad(r):
            z = y if (isinstance(rule, Z) or rule.bias or offset is None) else y - offset
            v = _share(r, z, rule) * factor(x)
            return x * (v if center is None else center(v))

        return y, no_variable_gradients(grad)

    return lrp_normalization(x)
