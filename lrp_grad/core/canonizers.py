"""Forward-preserving rewrites of the layer graph, applied before the rules.

A canonizer maps a :class:`~lrp_grad.frontends.Graph` to an equivalent one (same logits up to
float rounding) that LRP rules handle better. It never touches the user's layers: it replaces a
node's weights by a function computing new ones from the live variables on every call, or a
node's handler.

Built into the handlers (so always on, nothing to configure): fused activations are split from
their layer (the rule sees the pre-activation ``z``), and Dropout-like layers are the identity.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tensorflow as tf

from . import handlers
from ..frontends import Graph, activation_name, is_layer

__all__ = ["Canonizer", "FoldBatchNorm", "DEFAULT_CANONIZERS", "canonize"]


class Canonizer:
    """Base class: ``apply(graph) -> graph`` preserving the model's function."""

    def apply(self, graph: Graph) -> Graph:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class FoldBatchNorm(Canonizer):
    """Fold each BatchNormalization (at inference ``y = x * s + t``) into a neighbouring layer.

    1. Into the layer right before it, when that is a Dense/Conv1D/Conv2D/Conv2DTranspose/
       DepthwiseConv2D/SeparableConv2D with a linear activation whose only consumer is the
       BatchNorm: ``W' = W * s`` per output channel, ``b' = b * s + t``.
    2. Otherwise (typically Conv -> ReLU -> BatchNorm) into the next weighted layer, when the
       BatchNorm's output reaches a Dense, or a Conv1D/Conv2D with 'valid' padding, only through
       single-consumer MaxPooling/Flatten/Dropout layers: ``W' = W * s`` per input channel,
       ``b' = b + W t``. Max pooling commutes with the BatchNorm only when every ``s > 0``; this
       is checked when the plan is built and asserted on every call.

    The BatchNorm becomes the identity. A BatchNorm that fits neither (e.g. DenseNet's
    pre-activation BatchNorm between a Concatenate and a ReLU) stays an elementwise affine layer
    ``y = s x + t`` of the ``norm`` family and gets the rule the composite gives that family
    (``Epsilon`` in the presets): its shift ``t`` absorbs relevance like a bias.
    """

    def apply(self, graph: Graph) -> Graph:
        nodes = list(graph.nodes)
        producer = {t: i for i, node in enumerate(nodes) for t in node.outputs}
        consumers = {}
        for i, node in enumerate(nodes):
            for t in node.inputs:
                consumers.setdefault(t, []).append(i)
        consumers.setdefault(graph.output_id, []).append(-1)
        for i, node in enumerate(nodes):
            if not _is_foldable_bn(node):
                continue
            (source,) = node.inputs
            j = producer.get(source)
            if j is not None and len(consumers.get(source, ())) == 1 and _fold_backward(nodes, i, j):
                continue
            _fold_forward(nodes, i, consumers)
        return replace(graph, nodes=tuple(nodes))


def _is_foldable_bn(node) -> bool:
    if not is_layer(node.layer, "BatchNormalization") or len(node.inputs) != 1:
        return False
    axis = node.layer.axis if isinstance(node.layer.axis, (list, tuple)) else [node.layer.axis]
    rank = node.input_shapes[0].rank if node.input_shapes else None
    return len(axis) == 1 and rank is not None and axis[0] in (-1, rank - 1)


def _fold_backward(nodes, i, j) -> bool:
    prod = nodes[j]
    handler = prod.handler or handlers.handler_for(prod.layer)
    if handler is None or handler.fold is None or handler.weights is None:
        return False
    if activation_name(getattr(prod.layer, "activation", None)) != "linear":
        return False
    bn = nodes[i].layer
    previous = prod.params

    def params():
        w, b = previous() if previous is not None else handler.weights(prod.layer)
        scale, shift = handlers.batch_norm_affine(bn, w.dtype)
        return handler.fold(prod.layer, w, b, scale, shift)

    nodes[j] = replace(prod, params=params)
    nodes[i] = replace(nodes[i], handler=handlers.IDENTITY)
    return True


_MAX_POOLS = ("MaxPooling1D", "MaxPooling2D", "GlobalMaxPooling1D", "GlobalMaxPooling2D")


def _fold_forward(nodes, i, consumers) -> bool:
    """Fold BatchNorm node ``i`` into the next Dense / valid Conv; see :class:`FoldBatchNorm`."""
    bn = nodes[i].layer
    tensor, needs_positive, flattened = nodes[i].outputs[0], False, None
    while True:
        users = consumers.get(tensor, [])
        if len(users) != 1 or users[0] < 0:
            return False
        k = users[0]
        node = nodes[k]
        if node.handler is not None or len(node.inputs) != 1:
            return False
        layer = node.layer
        if is_layer(layer, *_MAX_POOLS):
            needs_positive = True
        elif is_layer(layer, "Flatten") and flattened is None:
            dims = list(node.input_shapes[0])[1:-1]
            if any(d is None for d in dims):
                return False
            flattened = int(np.prod(dims)) if dims else 1
        elif is_layer(layer, "Dropout"):
            pass
        else:
            break
        tensor = node.outputs[0]
    if is_layer(layer, "Dense"):
        if node.input_shapes[0].rank != 2:
            return False
    elif is_layer(layer, "Conv1D", "Conv2D"):
        if layer.padding != "valid" or flattened is not None or getattr(layer, "groups", 1) != 1:
            return False
    else:
        return False
    if needs_positive:
        scale, _ = handlers.batch_norm_affine(bn, tf.float64)
        if not bool(np.all(scale.numpy() > 0)):
            return False
    handler = handlers.handler_for(layer)
    previous = node.params
    repeat = flattened or 1

    def params():
        w, b = previous() if previous is not None else handler.weights(layer)
        scale, shift = handlers.batch_norm_affine(bn, w.dtype)
        if needs_positive:
            scale = _assert_positive(scale, bn)
        scale, shift = tf.tile(scale, [repeat]), tf.tile(shift, [repeat])
        # W acts on s x + t: scale its input channels, move W t into the bias.
        w_scaled = w * scale[:, None]
        w_sum = tf.reduce_sum(w, axis=list(range(w.shape.rank - 2))) if w.shape.rank > 2 else w
        moved = tf.linalg.matvec(w_sum, shift, transpose_a=True)
        return w_scaled, moved if b is None else b + moved

    nodes[k] = replace(node, params=params)
    nodes[i] = replace(nodes[i], handler=handlers.IDENTITY)
    return True


def _assert_positive(scale, bn):
    message = (f"BatchNormalization {bn.name!r} was folded through a max pooling, which needs every "
               "scale gamma/sqrt(var+eps) > 0; its weights changed since the Explainer was built. "
               "Build a new Explainer.")
    with tf.control_dependencies([tf.debugging.assert_positive(scale, message=message)]):
        return tf.identity(scale)


DEFAULT_CANONIZERS = (FoldBatchNorm(),)


def canonize(graph: Graph, canonizers) -> Graph:
    """Apply ``canonizers`` in order."""
    for canonizer in canonizers:
        graph = canonizer.apply(graph)
    return graph
