"""Turns a Keras model into an LRP forward pass: a plan (checked up front) and its execution."""
from __future__ import annotations

from dataclasses import dataclass

from . import handlers
from ._keras import Graph, Node, layer_label, walk
from .errors import UnsupportedLayerError
from .rules import Rule

__all__ = ["Step", "Plan", "build_plan", "run"]


@dataclass(frozen=True)
class Step:
    """One layer call of the rewritten forward pass, with everything decided up front."""

    node: Node
    handler: handlers.Handler
    context: handlers.Context


@dataclass(frozen=True)
class Plan:
    """The whole rewritten model: its graph and one :class:`Step` per layer call."""

    graph: Graph
    steps: tuple

    @property
    def rules(self) -> dict:
        """Layer label -> rule, for the layers a rule applies to (in forward order)."""
        return {s.node.label: s.context.rule for s in self.steps if s.handler.kind == "linear"}


def _unsupported(graph, problems):
    lines = "\n".join(f"  - {layer_label(layer)}: {why}" for layer, why in problems)
    return UnsupportedLayerError(
        f"{len(problems)} layer(s) of model {graph.model.name!r} cannot be explained:\n{lines}\n"
        f"Supported layer classes: {', '.join(handlers.supported_layers())}.\n"
        "For a custom layer, register a handler: lrp_grad.register_handler(LayerClass, "
        "'passthrough' | 'gradient' | 'identity' | lrp_grad.handlers.Handler(...)).",
        [(layer.name, type(layer).__name__, why) for layer, why in problems],
    )


def build_plan(model, rule: Rule, input_nonneg: bool = False) -> Plan:
    """Check the whole model and decide, per layer call, the handler, rule and input signs.

    Parameters
    ----------
    model : tf_keras.Model
        Single-input, single-output Sequential or Functional model.
    rule : Rule
        The rule applied to every weighted (``linear``) layer.
    input_nonneg : bool
        Whether the model input is known to be ``>= 0``.

    Raises
    ------
    UnsupportedModelError
        For Keras 3, subclassed or multi-input/output models.
    UnsupportedLayerError
        Listing every layer without a handler or with an unsupported configuration.
    """
    # 1. Walk the layer graph (this also rejects unsupported model kinds).
    graph = walk(model)

    # 2. Find every layer's handler; collect all problems so the user sees them at once.
    problems, found = [], []
    for node in graph.nodes:
        handler = handlers.handler_for(node.layer)
        is_output = graph.output_id in node.outputs
        if handler is None:
            problems.append((node.layer, "no handler for this layer class"))
        else:
            why = handler.check(node.layer, is_output)
            if why:
                problems.append((node.layer, why))
        found.append((node, handler, is_output))
    if problems:
        raise _unsupported(graph, problems)

    # 3. Propagate the sign knowledge and attach the rule to the weighted layers.
    nonneg = {graph.input_id: bool(input_nonneg)}
    steps = []
    for node, handler, is_output in found:
        flags = tuple(nonneg.get(t, False) for t in node.inputs)
        ctx = handlers.Context(rule if handler.kind == "linear" else None, flags, is_output)
        out_flag = bool(handler.nonneg(node.layer, flags))
        for t in node.outputs:
            nonneg[t] = out_flag
        steps.append(Step(node, handler, ctx))
    return Plan(graph, tuple(steps))


def run(plan: Plan, x, collect: bool = False):
    """Execute the rewritten forward pass on ``x``.

    Returns the output tensor and, with ``collect``, a dict ``label -> output tensor`` of every
    layer call (in forward order), whose gradients are the per-layer relevances.
    """
    tensors = {plan.graph.input_id: x}
    collected = {}
    for step in plan.steps:
        inputs = [tensors[t] for t in step.node.inputs]
        out = step.handler.apply(step.node.layer, inputs, step.context)
        (out_id,) = step.node.outputs
        tensors[out_id] = out
        if collect:
            collected[step.node.label] = out
    return tensors[plan.graph.output_id], collected
