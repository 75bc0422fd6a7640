"""Activations in the rewritten pass: which pass relevance through, and how a layer's own is checked and applied.

Also which activations never give negative outputs (the next layer may skip the ``x-`` half),
which output heads are skipped (the logits are explained) and which have ``f(0) = 0`` (the
planner may fuse ReLUs below them).
"""
from __future__ import annotations

from . import propagate
from ..frontends import activation_name

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
    if ctx.fuse_relu or ctx.linear_only:
        return z  # the ReLU was applied inside the layer's LRP op
    if name == "linear" or (name in HEADS and ctx.is_output):
        return z  # a final softmax or sigmoid is skipped: the logits are explained
    return propagate.passthrough(fn, z)


def _fused_nonneg(layer, flags):
    return activation_name(layer.activation) in NONNEG
