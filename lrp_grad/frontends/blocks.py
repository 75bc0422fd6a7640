"""Splits a layer made of other layers into its parts, so that every part gets its own rule.

``MultiHeadAttention`` (both Keras packages build it from the same sublayers and equations)
becomes five calls: its query, key and value projections (``EinsumDense`` sublayers: linear
layers under the user's rules), the attention core (an
:class:`~lrp_grad.frontends.graph.AttentionCore`: the ``'attention'`` family's rule) and its
output projection. The parts are labelled ``'<layer>/query'``, ``'<layer>/key'``,
``'<layer>/value'``, ``'<layer>/attention'`` and ``'<layer>/output'``.
"""
from __future__ import annotations

import tensorflow as tf

from ..errors import UnsupportedModelError
from .graph import AttentionCore, Node

__all__ = ["split_attention"]

#: Argument names of MultiHeadAttention's tensors (positional or keyword) -> their role.
_ROLES = {"0": "query", "query": "query", "1": "value", "value": "value", "2": "key", "key": "key"}


def _refuse(layer, why: str):
    return UnsupportedModelError(
        f"layer '{layer.name}' (MultiHeadAttention) {why}; lrp_grad explains MultiHeadAttention called as "
        "mha(query, value[, key]) without masks, dropout at inference only. Call it without that argument, "
        "or explain the model up to the layer before (Explainer(model, output=...)).")


def split_attention(layer, in_ids, out_ids, arg_names, kwargs, label, in_shapes) -> list:
    """The five nodes of a ``MultiHeadAttention`` call (see the module docstring).

    ``in_ids``/``arg_names``/``in_shapes``: the call's input tensors, the argument each was passed
    as, and their shapes; ``kwargs``: its non-tensor keyword arguments. Refuses masks, causal
    masks, returned attention scores and a flash-attention-only layer, naming the layer.
    """
    roles = {}
    for t, name, shape in zip(in_ids, arg_names, in_shapes):
        role = _ROLES.get(name)
        if role is None:
            raise _refuse(layer, f"is called with the tensor argument {name!r}")
        roles[role] = (t, shape)
    if "query" not in roles or "value" not in roles or not arg_names:
        raise _refuse(layer, "is called without a recognisable query and value")
    roles.setdefault("key", roles["value"])
    for flag in ("use_causal_mask", "return_attention_scores"):
        if kwargs.get(flag):
            raise _refuse(layer, f"is called with {flag}=True")
    if len(out_ids) != 1:
        raise _refuse(layer, "returns its attention scores")
    base = out_ids[0]
    ids = {part: f"{base}:{part}" for part in ("query", "key", "value", "attention")}
    dense = {"query": layer._query_dense, "key": layer._key_dense, "value": layer._value_dense}
    shapes = {part: tf.TensorShape(dense[part].compute_output_shape(roles[part][1])) for part in dense}
    nodes = [Node(dense[part], (roles[part][0],), (ids[part],), f"{label}/{part}", (tf.TensorShape(roles[part][1]),),
                  (shapes[part],)) for part in ("query", "key", "value")]
    out_shape = shapes["query"][:-1].concatenate(shapes["value"][-1:])
    scores_rank = 2 * len(layer._attention_axes) + 2
    core = AttentionCore(
        name=f"{layer.name}/attention", symbol="MultiHeadAttention attention",
        dot_equation=layer._dot_product_equation, combine_equation=layer._combine_equation,
        scale=1.0 / float(layer._key_dim) ** 0.5, softmax=lambda s: layer._softmax(s),
        softmax_axes=tuple(int(a) % scores_rank for a in layer._softmax.axis), source=layer)
    nodes.append(Node(core, (ids["query"], ids["key"], ids["value"]), (ids["attention"],), f"{label}/attention",
                      (shapes["query"], shapes["key"], shapes["value"]), (out_shape,)))
    final = tf.TensorShape(layer._output_dense.compute_output_shape(out_shape))
    nodes.append(Node(layer._output_dense, (ids["attention"],), (base,), f"{label}/output", (out_shape,), (final,)))
    return nodes
