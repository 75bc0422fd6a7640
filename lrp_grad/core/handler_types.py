"""What a handler is: the Context a layer call is built with and the Handler record (kinds, families).

The registry (:mod:`lrp_grad.handlers`, which describes the kinds) and the built-in handlers
(:mod:`lrp_grad.core.layers`, :mod:`lrp_grad.core.raw_ops`) share these types, together with the
few checks that several built-in handlers use.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import tensorflow as tf

__all__ = ["Context", "Handler", "KINDS", "FAMILIES"]

KINDS = ("linear", "passthrough", "gradient", "identity", "gate", "forward")
#: Families of rule-taking layers; composites map rules to them. ``'attention'`` (products of two
#: signals: attention cores, matrix products and einsums of two tensors) takes the attention
#: rules (:class:`~lrp_grad.core.rules.AttnLRP`, :class:`~lrp_grad.core.rules.CPLRP`), the others
#: the linear rules.
FAMILIES = ("dense", "conv", "pool", "norm", "merge", "attention")


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
        For handlers that read gates (``gate`` handlers, products of two tensors): which input is
        the gate, as the planner read it from the graph (:func:`lrp_grad.gating.gate_index`), or
        why none could be told.
    linear_only : bool
        The layer's own activation (a Python function, ``Dense(activation=my_gelu)``) is applied
        by the calls after it, traced into its operations: the layer computes its linear part only.
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
    linear_only: bool = False


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
        One of :data:`KINDS` (see :mod:`lrp_grad.handlers`).
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
    reads_gate : bool
        The planner reads which input is a gate (``ctx.gate``) for this non-``gate`` handler too
        (a product of two tensors: CP-LRP holds its gate, the attention weights, constant).
    fixed_gate : int or None
        For ``gate`` handlers whose gate is always the same input (the divisor of ``x / y``, a
        scale held constant): the planner does not read it from the graph.
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
    reads_gate: bool = False
    fixed_gate: int | None = None

    @property
    def gated(self) -> bool:
        """Whether the planner reads which input is a gate for it (``ctx.gate``)."""
        return self.kind == "gate" or self.reads_gate

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Handler kind must be one of {KINDS}, got {self.kind!r}.")
        if self.kind == "linear" and self.family not in FAMILIES:
            raise ValueError(f"a linear Handler needs family in {FAMILIES}, got {self.family!r}.")


# ---------------------------------------------------------------------------------------------
# Checks several built-in handlers share


def _channels_last(layer, ctx=None):
    fmt = getattr(layer, "data_format", "channels_last")
    if fmt != "channels_last":
        return f"data_format={fmt!r}; only 'channels_last' is supported"
    return None


def _static(shape):
    return tuple(shape)[1:]


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
