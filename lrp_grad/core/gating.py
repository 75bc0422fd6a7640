"""Which input of a product is the gate: decided from the layer graph, not from shapes.

Most products in real networks are of two kinds, both exact when all relevance goes to one
input (the *signal*) and none to the other (the *gate*):

1. **A tensor times a function of itself** computed elementwise (hard-swish written as
   ``x * relu6(x + 3) / 6``, swish as ``x * sigmoid(x)``): the product is an elementwise
   activation of ``x``, and relevance passes through it to ``x``. The gate is the input that is
   reached from the other one (or from a common tensor) through elementwise layers only.
2. **Gating** (squeeze-and-excitation, attention masks): one input comes through a sigmoid,
   hard-sigmoid (also written by hand, ``relu6(x + 3) / 6``) or softmax, possibly followed by
   reshapes and constant arithmetic. That input is the gate, whatever its spatial size (SE gates
   are ``1 x 1`` maps, as are the feature maps of small inputs).

Anything else, e.g. the product of two independent feature maps (a gated MLP) or of two gates,
has no gate: it takes AttnLRP's uniform rule, half of the relevance to each factor
(:func:`lrp_grad.core.transformer_layers.uniform_product`).
"""
from __future__ import annotations

from ..frontends import RawOp, activation_name, is_layer

__all__ = ["GATE_ACTIVATIONS", "gate_index"]

#: Activations whose output is a gate (in ``[0, 1]``: a share of the signal that passes).
GATE_ACTIVATIONS = frozenset(("sigmoid", "hard_sigmoid", "sparse_sigmoid", "softmax", "clip"))

#: Raw operations with constants that neither make nor break a gate (``g * 0.5``, ``g + 1``).
_CONSTANT_ARITHMETIC = ("add", "subtract", "multiply", "divide", "negative")


def _elementwise(node, handler) -> bool:
    """Whether a node is a one-tensor elementwise map (relevance passes through it)."""
    return (handler is not None and handler.kind in ("passthrough", "identity") and len(node.inputs) == 1
            and len(node.outputs) == 1)


def _chain(tensor, producers, handler_of) -> list:
    """``tensor`` and the tensors it is computed from through elementwise nodes, nearest first."""
    out = [tensor]
    while tensor in producers:
        node = producers[tensor]
        if not _elementwise(node, handler_of(node)):
            break
        tensor = node.inputs[0]
        out.append(tensor)
    return out


def _activation_of(layer) -> str | None:
    """The activation a node applies last (its own ``activation``, an Activation layer, a raw op)."""
    if isinstance(layer, RawOp):
        return layer.activation if layer.kind == "activation" else None
    if is_layer(layer, "Softmax"):
        return "softmax"
    fn = getattr(layer, "activation", None)
    return activation_name(fn) if fn is not None else None


def _bounded_relu(layer) -> bool:
    if isinstance(layer, RawOp):
        return layer.kind == "activation" and layer.activation == "relu6"
    if is_layer(layer, "ReLU"):
        return layer.max_value is not None
    return _activation_of(layer) == "relu6"


def _shift(layer) -> bool:
    return isinstance(layer, RawOp) and layer.kind in ("add", "subtract") and layer.n_tensors == 1


def _through_gate(tensor, producers, handler_of) -> bool:
    """Whether ``tensor`` comes out of a gate activation, through routing layers (reshapes,
    broadcasts) and constant arithmetic only. A bounded ReLU of a shifted tensor
    (``relu6(x + 3)``) is a hard sigmoid written by hand."""
    while tensor in producers:
        node = producers[tensor]
        layer = node.layer
        if _activation_of(layer) in GATE_ACTIVATIONS:
            return True
        if _bounded_relu(layer):
            source = producers.get(node.inputs[0]) if len(node.inputs) == 1 else None
            return source is not None and _shift(source.layer)
        handler = handler_of(node)
        routing = handler is not None and handler.kind in ("gradient", "identity")
        constant = isinstance(layer, RawOp) and layer.kind in _CONSTANT_ARITHMETIC and layer.n_tensors == 1
        if len(node.inputs) != 1 or not (routing or constant):
            return False
        tensor = node.inputs[0]
    return False


def gate_index(node, producers, handler_of):
    """``(index, None)`` of the gate input of a two-input product node, or ``(None, why)``.

    ``producers`` maps tensor id -> the node computing it; ``handler_of(node)`` is the node's
    handler (or ``None``).
    """
    if len(node.inputs) != 2:
        return None, (f"a product of {len(node.inputs)} tensors; only products of two (a signal and a gate) "
                      "are supported")
    a, b = node.inputs
    if a == b:
        return 1, None  # x * x: an elementwise function of x
    chain_a, chain_b = (_chain(t, producers, handler_of) for t in (a, b))
    if a in chain_b:
        return 1, None  # b = f(a) elementwise: the product is an activation of a
    if b in chain_a:
        return 0, None
    gates = [i for i, t in enumerate((a, b)) if _through_gate(t, producers, handler_of)]
    if set(chain_a) & set(chain_b):  # f(x) * g(x), both elementwise of x
        return (gates[0] if len(gates) == 1 else 1), None
    if len(gates) == 1:
        return gates[0], None
    if len(gates) == 2:
        return None, ("both inputs come through a sigmoid/softmax gate; cannot tell which one is the gated "
                      "signal (no LRP rule splits the relevance of a product of two signals)")
    return None, ("a product of two independent signals: neither input comes through a sigmoid, hard-sigmoid "
                  "or softmax gate, nor is one an elementwise function of the other (x * f(x)); no LRP rule "
                  "splits the relevance of such a product. Supported are gating (x * sigmoid(...), e.g. "
                  "squeeze-and-excitation) and elementwise products like hard-swish x * relu6(x + 3) / 6")
