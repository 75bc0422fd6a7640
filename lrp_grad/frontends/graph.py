"""The neutral description of a model that both Keras front ends produce and the core reads.

A :class:`Graph` is a list of :class:`Node` calls in execution order. A node's ``layer`` is the
Keras layer object (its weights and settings are read by the handlers through attributes both
Keras packages share) or a :class:`RawOp`: a tensor operation recorded in the graph that is not a
layer (``x + y``, ``x * 2``, ``tf.reshape`` in tf-keras' ``TFOpLambda``; ``keras.ops.*`` in
Keras 3), already reduced by its front end to a canonical kind and a replay function.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

__all__ = ["Node", "Graph", "RawOp", "AttentionCore", "RAW_KINDS", "ZERO_GRADIENT", "SHAPE_ONLY", "gradient_cut",
           "class_name", "layer_label", "snake_case"]


@dataclass(frozen=True)
class Node:
    """One call of a layer (or raw operation) in the model graph: which tensors it reads and
    writes (by id).

    ``handler`` and ``params`` are empty after the walk; canonizers set them to replace the
    layer's handler or its weights without touching the layer.
    """

    layer: object
    inputs: tuple
    outputs: tuple
    label: str  # 'outer/inner' path of the layer name, with '#k' for the k-th call of a shared layer
    input_shapes: tuple = ()  # tf.TensorShape per input, batch axis included
    output_shapes: tuple = ()  # tf.TensorShape per output, batch axis included
    handler: object = None
    params: object = None
    arg_names: tuple = ()  # per input: the argument it was passed as ('0', '1', 'key', 'mask/0')
    note: str = ""  # why the front end could not look inside this layer's call (for the refusal)
    refusal: str = ""  # why this call cannot be explained whatever its handler (the survey refuses it)
    linear_only: bool = False  # its activation (a Python function) is traced into the calls after it


@dataclass(frozen=True)
class Graph:
    """A model as a list of nodes in execution order, from its inputs to the one output explained.

    ``output_id`` is the tensor explained: the model's output, one of several outputs, or a hidden
    layer's output (the nodes it does not depend on are left out).
    """

    model: object
    nodes: tuple
    input_ids: tuple  # one tensor id per model input, in the model's order
    output_id: str
    input_shapes: tuple  # per input, without the batch axis; entries may be None
    dtypes: tuple  # per input
    n_outputs: int | None  # size of the last axis of an output of rank >= 2 (classes, channels)
    output_shape: tuple = ()  # without the batch axis
    input_names: tuple = ("input",)
    package: str = "tf_keras"  # which front end walked it: 'tf_keras' or 'keras'
    output_name: str = "output"
    output_names: tuple = ()  # all of the model's outputs

    # The single-input view most of the product uses.
    @property
    def input_id(self) -> str:
        return self.input_ids[0]

    @property
    def input_shape(self) -> tuple:
        return self.input_shapes[0]

    @property
    def dtype(self) -> str:
        return self.dtypes[0]

    @property
    def input_name(self) -> str:
        return self.input_names[0]


#: Canonical kinds of raw operations. ``arith`` ops (add, subtract, multiply, divide, negative)
#: are told apart further by how many of their operands are tensors (see :class:`RawOp`).
#: ``cut``: the operation's gradient is zero or undefined (:func:`gradient_cut`); it is refused.
RAW_KINDS = ("add", "subtract", "multiply", "divide", "negative", "route", "mean", "sum", "activation",
             "product", "resize", "cut", "shape", "other")

#: Operations on floats whose gradient is zero (or undefined) everywhere, by the last part of their
#: name in either package (``keras.ops.round``, ``tf.math.round``, ``tf.compat.v1.floor_div``):
#: relevance cannot flow back through them. The value says why.
ZERO_GRADIENT = {
    **dict.fromkeys(["round", "rint", "floor", "ceil", "trunc", "sign", "floor_divide", "floordiv", "floor_div"],
                    "it is piecewise constant"),
    "stop_gradient": "it stops the gradient by design",
}


def _no_gradient_dtype(dtype) -> bool:
    """Whether values of ``dtype`` (a name or a ``tf.DType``) carry no gradient: integers, bool, strings."""
    name = str(getattr(dtype, "name", dtype))
    return name in ("bool", "string") or name.startswith(("int", "uint", "qint", "quint"))


#: Operations that read only the shape of a tensor (``tf.shape``, ``tf.size``, ``zeros_like``): their result never
#: depends on the values, so it carries no relevance and cuts nothing (kind ``'shape'``; a class
#: token repeated ``tf.shape(x)[0]`` times).
SHAPE_ONLY = frozenset(("shape", "shape_n", "size", "rank", "zeros_like", "ones_like"))


def gradient_cut(name: str, is_cast: bool, out_dtype, in_dtypes) -> str | None:
    """Why a raw operation has no gradient (so it would give all-zero relevance), or ``None``.

    ``name`` is the operation's name without its module (``'round'``), ``out_dtype`` its recorded
    output dtype and ``in_dtypes`` those of its tensor operands. Cut are: the operations of
    :data:`ZERO_GRADIENT`; a cast to an integer or bool dtype; any other operation that turns its
    operands into integer or bool values (``argmax``, comparisons, logical operations). An operation
    that keeps an integer dtype (slicing a ``uint8`` model input, which is explained in float32) is
    not: the cut is where the integers are made.
    """
    if name in SHAPE_ONLY:
        return None
    if name in ZERO_GRADIENT:
        return f"its gradient is zero everywhere ({ZERO_GRADIENT[name]})"
    out = str(getattr(out_dtype, "name", out_dtype))
    if not _no_gradient_dtype(out):
        return None
    if is_cast:
        return f"it casts to {out}, and integer and bool values carry no gradient"
    if all(str(getattr(d, "name", d)) != out for d in in_dtypes):
        return f"its result is {out}, and integer and bool values carry no gradient"
    return None


@dataclass(frozen=True, eq=False)
class RawOp:
    """A tensor operation in the model graph that is not a layer.

    Attributes
    ----------
    name : str
        Its name in the graph (e.g. ``'tf.__operators__.add'``, ``'add_1'``).
    symbol : str
        The function the user called: ``'tf.math.multiply'``, ``'keras.ops.add'``; error
        messages name the operation by it.
    kind : str
        One of :data:`RAW_KINDS`; ``'other'`` for operations lrp_grad does not know.
    fn : callable
        ``fn(*tensors) -> tensor``: replays the operation on new tensors (one per entry of the
        node's inputs, in order), with its constant operands and options bound.
    n_tensors : int
        How many operands are tensors of the graph (the rest are constants).
    activation : str or None
        For ``kind='activation'``: the canonical activation name (``'relu'``, ``'sigmoid'``).
    axes : tuple of int or None
        For ``'mean'``/``'sum'``: the reduced axes, non-negative, ``None`` for all axes; for a
        softmax: the normalised axes.
    keepdims : bool
        For ``'mean'``/``'sum'``.
    batch_axis : int
        For ``'mean'``/``'sum'``: the axis of the reduced tensor that holds the batch; 1 for a list of
        tensors reduced as one (``tf.reduce_sum([a, b], axis=0)``, an ``add_n``) or a tensor stacked
        from them along axis 0, else 0.
    out_shape : tuple or None
        The static output shape (batch axis included).
    cut : str or None
        For ``kind='cut'``: why the operation has no gradient (see :func:`gradient_cut`).
    interpolation : str or None
        For ``kind='resize'``: the method, lower case (``'bilinear'``, ``'nearest'``, ``'area'``).
    source : object
        The front end's own object (a ``TFOpLambda`` layer or a Keras 3 ``Operation``).
    constants : object
        The operation's settings and constant operands as one nested structure (its graph tensors
        left in place), which :func:`lrp_grad.frontends.tracing` compares between two traces of a
        layer at different batch sizes.
    rebind : callable or None
        ``rebind(transform) -> fn``: a replay function whose ``constants`` are first passed through
        ``transform(constants, tensors)`` (which puts the run's batch size where the trace had its own).
    """

    name: str
    symbol: str
    kind: str
    fn: Callable
    n_tensors: int
    activation: str | None = None
    axes: tuple | None = None
    keepdims: bool = False
    out_shape: tuple | None = None
    source: object = None
    cut: str | None = None
    constants: object = None
    rebind: Callable | None = None
    interpolation: str | None = None
    batch_axis: int = 0

    def __repr__(self):
        return f"RawOp({self.symbol}, name={self.name!r}, kind={self.kind!r})"


@dataclass(frozen=True, eq=False)
class AttentionCore:
    """The attention of a ``MultiHeadAttention`` layer between its projections:
    ``softmax(einsum(dot, k, q * scale)) -> einsum(combine, weights, v)``.

    The front end splits the layer into its query, key, value and output projections (its own
    ``EinsumDense`` sublayers, which take the linear layers' rules) and this core (the
    ``'attention'`` family's rule); the node's inputs are the projected ``(q, k, v)``.

    Attributes
    ----------
    name, symbol : str
        ``'<layer>/attention'`` and ``'MultiHeadAttention attention'`` for messages.
    dot_equation, combine_equation : str
        The layer's einsum equations for the scores and for the weighted values.
    scale : float
        The factor on the queries (``1 / sqrt(key_dim)``).
    softmax : callable
        ``softmax(scores) -> weights``: the layer's own softmax (its forward).
    softmax_axes : tuple of int
        The axes the softmax normalises, non-negative, of the scores.
    source : object
        The ``MultiHeadAttention`` layer.
    """

    name: str
    symbol: str
    dot_equation: str
    combine_equation: str
    scale: float
    softmax: Callable
    softmax_axes: tuple
    source: object = None


def class_name(layer) -> str:
    """The class name of a layer, or the function a raw operation calls (``'keras.ops.add'``)."""
    return layer.symbol if isinstance(layer, (RawOp, AttentionCore)) else type(layer).__name__


def layer_label(layer) -> str:
    """``'name' (ClassName)``, the way every error message names a layer (or raw operation)."""
    if isinstance(layer, (RawOp, AttentionCore)):
        return f"'{layer.name}' (operation {layer.symbol})"
    return f"'{layer.name}' ({type(layer).__name__})"


def snake_case(name: str) -> str:
    """``'ExpandDims'`` -> ``'expand_dims'`` (Keras 3 names an op function after its class)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
