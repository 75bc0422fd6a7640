"""Forward-preserving rewrites of the layer graph, applied before the rules.

A canonizer maps a :class:`~lrp_grad._keras.Graph` to an equivalent one (same logits up to
float rounding) that LRP rules handle better. It never touches the user's layers: it replaces a
node's weights by a function computing new ones from the live variables on every call, or a
node's handler.

Built into the handlers (so always on, nothing to configure): fused activations are split from
their layer (the rule sees the pre-activation ``z``), and Dropout-like layers are the identity.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from . import handlers
from ._keras import Graph, activation_name, keras

__all__ = ["Canonizer", "FoldBatchNorm", "DEFAULT_CANONIZERS", "canonize"]


class Canonizer:
    """Base class: ``apply(graph) -> graph`` preserving the model's function."""

    def apply(self, graph: Graph) -> Graph:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class FoldBatchNorm(Canonizer):
    """Fold each BatchNormalization into the Dense/Conv layer right before it.

    Folding needs: the producer has a handler with a ``fold`` (Dense, Conv1D/2D, Conv2DTranspose,
    DepthwiseConv2D, SeparableConv2D), a linear activation, and the BatchNorm is the only consumer
    of its output. The folded layer computes ``x * (W * s) + (b * s + t)`` where
    ``y = x * s + t`` is the BatchNorm at inference; the BatchNorm becomes the identity.

    A BatchNorm that cannot be folded (e.g. DenseNet's pre-activation BatchNorm after a
    Concatenate) stays an elementwise affine layer ``y = s x + t`` of the ``norm`` family and gets
    the rule the composite gives that family (``Epsilon`` in the presets): its shift ``t``
    absorbs relevance like a bias.
    """

    def apply(self, graph: Graph) -> Graph:
        nodes = list(graph.nodes)
        producer = {t: i for i, node in enumerate(nodes) for t in node.outputs}
        consumers = Counter(t for node in nodes for t in node.inputs)
        consumers[graph.output_id] += 1
        for i, node in enumerate(nodes):
            if type(node.layer) is not keras.layers.BatchNormalization or len(node.inputs) != 1:
                continue
            axis = node.layer.axis if isinstance(node.layer.axis, (list, tuple)) else [node.layer.axis]
            rank = node.input_shapes[0].rank if node.input_shapes else None
            if len(axis) != 1 or rank is None or axis[0] not in (-1, rank - 1):
                continue
            (source,) = node.inputs
            j = producer.get(source)
            if j is None or consumers[source] != 1:
                continue
            prod = nodes[j]
            handler = prod.handler or handlers.handler_for(prod.layer)
            if handler is None or handler.fold is None or handler.weights is None:
                continue
            if activation_name(getattr(prod.layer, "activation", None)) != "linear":
                continue
            nodes[j] = replace(prod, params=_folded(prod, handler, node.layer))
            nodes[i] = replace(node, handler=handlers.IDENTITY)
        return replace(graph, nodes=tuple(nodes))


def _folded(node, handler, bn):
    """``params()`` of ``node`` with ``bn`` folded in, computed from the live variables."""
    previous = node.params

    def params():
        w, b = previous() if previous is not None else handler.weights(node.layer)
        scale, shift = handlers.batch_norm_affine(bn, w.dtype)
        return handler.fold(node.layer, w, b, scale, shift)

    return params


DEFAULT_CANONIZERS = (FoldBatchNorm(),)


def canonize(graph: Graph, canonizers) -> Graph:
    """Apply ``canonizers`` in order."""
    for canonizer in canonizers:
        graph = canonizer.apply(graph)
    return graph
