"""Surveys a model for LRP: walks and canonizes it, finds every layer's handler and gate, and
refuses, all at once, what cannot be explained."""
from __future__ import annotations

from dataclasses import dataclass, replace

from . import gating, handlers
from ..errors import UnsupportedLayerError, UnsupportedModelError
from ..frontends import TRAINING_NOTE, Graph, RawOp, activation_name, class_name, is_layer, is_model, layer_label, walk
from .canonizers import DEFAULT_CANONIZERS, canonize

__all__ = ["Survey", "survey", "gate_only", "unsupported"]


@dataclass(frozen=True)
class Survey:
    """A canonized graph and, per layer call in forward order, ``(node, handler, context)``.

    ``rule_taking`` lists the ``(label, layer, family)`` of the layers a composite gives a rule.
    """

    graph: Graph
    entries: tuple

    @property
    def rule_taking(self) -> list:
        return [(node.label, node.layer, h.family) for node, h, _ in self.entries if h.kind == "linear"]


def survey(model, canonizers=None, compute_dtype=None, output=None) -> Survey:
    """Walk ``model`` (the explained ``output``), canonize it and find every call's handler.

    Raises
    ------
    UnsupportedModelError
        For subclassed models, several outputs without ``output``, an unknown output, Keras 3 on
        another backend, quantized layers.
    UnsupportedLayerError
        Listing every layer without a handler or with an unsupported configuration.
    """
    # 1. Walk the layer graph (this also rejects unsupported model kinds) and canonize it.
    graph = walk(model, output, look_inside=_look_inside)
    _check_connected(graph)
    graph = canonize(graph, DEFAULT_CANONIZERS if canonizers is None else canonizers)

    # 2. Find every layer's handler and every product's gate.
    producers = {t: node for node in graph.nodes for t in node.outputs}
    handler_of = lambda node: node.handler or handlers.handler_for(node.layer)  # noqa: E731
    entries, from_shapes = [], set()
    for node in graph.nodes:
        handler = handler_of(node)
        if _from_shapes(node, from_shapes):  # computed from shapes alone (tf.shape(x)[0] // 2): no relevance
            from_shapes.update(node.outputs)
            handler = handlers.FORWARD_ONLY
        ctx = handlers.Context(is_output=graph.output_id in node.outputs, params=node.params, linear_only=node.linear_only,
                               input_shapes=node.input_shapes, compute_dtype=compute_dtype)
        if handler is not None and handler.fixed_gate is not None:
            ctx = replace(ctx, gate=handler.fixed_gate)
        elif handler is not None and handler.gated:
            gate, why = gating.gate_index(node, producers, handler_of)
            ctx = replace(ctx, gate=gate, gate_problem=why)
        entries.append((node, handler, ctx))

    # 3. Collect all problems so the user sees them at once. A layer on a branch that only feeds
    #    gates gets no relevance: without a handler (or with an unsupported setting) it is still
    #    computed, by its own forward (handlers.FORWARD_ONLY).
    problems, found = [], []
    only_gates = gate_only(graph, entries)
    for i, (node, handler, ctx) in enumerate(entries):
        if node.note == TRAINING_NOTE or node.refusal:
            problems.append((node, node.refusal or TRAINING_NOTE))
            found.append((node, handler, ctx))
            continue
        if i in only_gates and (handler is None or handler.check(node.layer, ctx)):
            found.append((node, handlers.FORWARD_ONLY, ctx))
            continue
        if handler is None:
            hint = " (a subclassed model used as a layer)" if is_model(node.layer) else ""
            why = handlers.subclass_problem(node.layer) or f"no handler for this layer class{hint}"
            problems.append((node, f"{why}; {node.note}" if node.note else why))
        else:
            why = handler.check(node.layer, ctx)
            if why:
                problems.append((node, why))
        found.append((node, handler, ctx))
    if problems:
        raise unsupported(graph, problems)
    return Survey(graph, tuple(found))


def _from_shapes(node, from_shapes) -> bool:
    """Whether a raw operation's result depends on tensor shapes only, not values: it reads only
    shapes (``tf.shape``), or all its tensor operands are such results (``tf.shape(x)[0] // 2``)."""
    op = node.layer
    if not isinstance(op, RawOp):
        return False
    return op.kind == "shape" or (bool(node.inputs) and all(t in from_shapes for t in node.inputs))


def _check_connected(graph):
    """Every call's inputs are model inputs or outputs of earlier calls; a graph the walk could not
    order (a nested model fed by a structure it did not follow) is refused by name, not run."""
    made = set(graph.input_ids)
    for node in graph.nodes:
        missing = [t for t in node.inputs if t not in made]
        if missing:
            raise UnsupportedModelError(
                f"model {graph.model.name!r}: the input of {layer_label(node.layer)} at {node.label!r} is not made by "
                "any layer lrp_grad walked before it (a nested model fed through a structure, e.g. a dict, that "
                "the walk does not follow). Feed the nested model a plain tensor, or explain it on its own.")
        made.update(node.outputs)


def _look_inside(layer):
    """Whether the front end should run a layer's ``call`` and explain what it calls: a layer
    without a handler (a subclassed block, a ``Lambda``), or an ``Activation`` of a user function;
    ``'activation'`` for a layer with a handler whose own activation is a user function (the layer
    then computes its linear part and the function is traced after it)."""
    if handlers.handler_for(layer) is None:
        return not is_model(layer)
    user_activation = activation_name(getattr(layer, "activation", None)).startswith("function ")
    if is_layer(layer, "Activation"):
        return user_activation
    return "activation" if user_activation else False


def gate_only(graph, entries) -> set:
    """Indices of the nodes whose outputs reach the explained output only through gate inputs
    (or not at all): they receive no relevance. Consumers come after their producers, so one
    backward sweep decides every tensor."""
    relevant, gate_only = {graph.output_id}, set()
    for i in reversed(range(len(entries))):
        node, handler, ctx = entries[i]
        if not any(t in relevant for t in node.outputs):
            gate_only.add(i)
            continue
        for k, t in enumerate(node.inputs):
            if not (handler is not None and handler.kind == "gate" and ctx.gate == k):
                relevant.add(t)
    return gate_only



def _where(node) -> str:
    """How a problem line names a layer call: ``'name' (Class)``, and its path in the model when that
    differs from the name (a layer of a nested model, ``'block/conv'``; a shared layer's ``'conv#2'``)."""
    label = layer_label(node.layer)
    return label if node.label == getattr(node.layer, "name", None) else f"{label} at '{node.label}'"


def unsupported(graph, problems):
    lines = "\n".join(f"  - {_where(node)}: {why}" for node, why in problems)
    return UnsupportedLayerError(
        f"{len(problems)} layer(s) of model {graph.model.name!r} cannot be explained:\n{lines}\n"
        f"Supported layer classes: {', '.join(handlers.supported_layers())}.\n"
        "For a custom layer, register a handler: lrp_grad.register_handler(LayerClass, "
        "'passthrough' | 'gradient' | 'identity' | lrp_grad.handlers.Handler(...)).",
        [(node.layer.name, class_name(node.layer), why) for node, why in problems],
    )
