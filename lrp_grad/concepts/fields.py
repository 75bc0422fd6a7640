"""Receptive fields: the input box a position of a layer's output can see, from the layers' geometry.

Convolutions, poolings, paddings, croppings and upsamplings are followed by their geometry and
elementwise layers position to position; where a layer's geometry is unknown the box is the whole
input (a superset, never too small).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..frontends import class_name
from .resolve import ConceptError, _plan_of, _resolve, _step

__all__ = ["receptive_field"]


def _spatial_rank(ex):
    return max(0, len(ex.input_shape) - 1)


def _conv_geometry(layer):
    """``(kernel, strides, dilation, padding)`` per spatial axis for conv/pooling layers, else None."""
    cls = class_name(layer)
    if cls in ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D",
               "SeparableConv2D"):
        return tuple(layer.kernel_size), tuple(layer.strides), tuple(layer.dilation_rate), layer.padding
    if "Pooling" in cls and not cls.startswith("Global"):
        pool = tuple(layer.pool_size)
        return pool, tuple(layer.strides), (1,) * len(pool), layer.padding
    return None


def _map_box(node, box, in_shape, out_shape):
    """Input-tensor box (per spatial axis ``[lo, hi]`` inclusive) that output box ``box`` reads;
    ``None`` means the whole input (unknown or global layers)."""
    layer, cls = node.layer, class_name(node.layer)
    n_sp = len(box)
    ins = tuple(in_shape[1:1 + n_sp]) if in_shape.rank is not None and in_shape.rank == n_sp + 2 else None
    outs = tuple(out_shape[1:1 + n_sp]) if out_shape.rank is not None and out_shape.rank == n_sp + 2 else None
    if ins is None or outs is None or None in ins or None in outs:
        return None
    geometry = _conv_geometry(layer)
    if geometry is not None:
        k, s, d, padding = geometry
        if padding == "causal":
            before = [(kk - 1) * dd for kk, dd in zip(k, d)]
        elif padding == "same":
            before = [max((o - 1) * ss + (kk - 1) * dd + 1 - i, 0) // 2
                      for o, ss, kk, dd, i in zip(outs, s, k, d, ins)]
        else:
            before = [0] * n_sp
        return tuple((lo * ss - b, hi * ss - b + (kk - 1) * dd)
                     for (lo, hi), ss, b, kk, dd in zip(box, s, before, k, d))
    if cls == "UpSampling2D" or cls == "UpSampling1D":
        f = tuple(np.atleast_1d(layer.size))
        return tuple((lo // ff, hi // ff) for (lo, hi), ff in zip(box, f))
    if cls in ("ZeroPadding2D", "ZeroPadding1D"):
        pads = np.reshape(np.asarray(layer.padding), (n_sp, 2))
        return tuple((lo - int(p[0]), hi - int(p[0])) for (lo, hi), p in zip(box, pads))
    if cls in ("Cropping2D", "Cropping1D"):
        crops = np.reshape(np.asarray(layer.cropping), (n_sp, 2))
        return tuple((lo + int(c[0]), hi + int(c[0])) for (lo, hi), c in zip(box, crops))
    if ins == outs:  # elementwise, normalisation, Add, Concatenate, ...: position to position
        return box
    return None


def receptive_field(ex, layer, position) -> tuple:
    """The input box that position ``position`` (spatial indices) of ``layer``'s output can see.

    Returns ``((start, stop), ...)`` per spatial input axis (half-open, clipped to the input). It
    follows convolutions, poolings, paddings, croppings and upsamplings by their geometry and
    elementwise layers position to position; a layer whose geometry is not known (or a global one:
    Dense, Flatten, global pooling) sees the whole input, so the box is never too small.
    """
    label = _resolve(ex, layer)
    steps = _plan_of(ex).steps
    node = _step(ex, label).node
    shape = tf.TensorShape(node.output_shapes[0])
    n_sp = _spatial_rank(ex)
    full = tuple((0, int(d)) for d in ex.input_shape[:n_sp])
    position = tuple(int(p) for p in np.atleast_1d(position)) if np.size(position) else ()
    if shape.rank != n_sp + 2:
        return full
    if len(position) != n_sp or any(not 0 <= p < int(d) for p, d in zip(position, shape[1:1 + n_sp])):
        raise ConceptError(f"position {position} is not a position of layer {label!r}'s output of spatial shape "
                           f"{tuple(shape[1:1 + n_sp])}.")
    producer = {t: s.node for s in steps for t in s.node.outputs}
    graph = _plan_of(ex).graph
    boxes = {node.outputs[0]: tuple((p, p) for p in position)}
    result = None
    for step in reversed(steps):
        nd = step.node
        t = nd.outputs[0] if nd.outputs else None
        if t not in boxes:
            continue
        box = boxes.pop(t)
        for k, src in enumerate(nd.inputs):
            in_shape = tf.TensorShape(nd.input_shapes[k]) if k < len(nd.input_shapes) else tf.TensorShape(None)
            mapped = _map_box(nd, box, in_shape, tf.TensorShape(nd.output_shapes[0]))
            if mapped is None:
                return full
            if src in graph.input_ids:
                result = mapped if result is None else tuple((min(a, c), max(b, d)) for (a, b), (c, d) in
                                                             zip(result, mapped))
            elif src in producer:
                old = boxes.get(src)
                boxes[src] = mapped if old is None else tuple((min(a, c), max(b, d)) for (a, b), (c, d) in
                                                              zip(old, mapped))
    if result is None:
        return full
    return tuple((max(0, lo), min(int(size), hi + 1)) for (lo, hi), (_, size) in zip(result, full))
