"""Turns a Keras model into an LRP forward pass: a plan (checked up front) and its execution."""
from __future__ import annotations

from dataclasses import dataclass, replace

from . import gating, handlers
from .frontends import Graph, Node, activation_name, class_name, is_model, layer_label, walk
from .canonizers import DEFAULT_CANONIZERS, canonize
from .composites import RuleMap, as_composite
from .errors import UnsupportedLayerError

__all__ = ["Step", "Plan", "build_plan", "run"]


@dataclass(frozen=True)
class Step:
    """One layer call of the rewritten forward pass, with everything decided up front."""

    node: Node
    handler: handlers.Handler
    context: handlers.Context


@dataclass(frozen=True)
class Plan:
    """The whole rewritten model: its (canonized) graph and one :class:`Step` per layer call."""

    graph: Graph
    steps: tuple

    @property
    def rules(self) -> RuleMap:
        """Layer label -> rule for the rule-taking layers, in forward order (printable)."""
        return RuleMap(
            (s.node.label, class_name(s.node.layer), s.handler.family, s.context.rule)
            for s in self.steps if s.handler.kind == "linear"
        )


def _unsupported(graph, problems):
    lines = "\n".join(f"  - {layer_label(layer)}: {why}" for layer, why in problems)
    return UnsupportedLayerError(
        f"{len(problems)} layer(s) of model {graph.model.name!r} cannot be explained:\n{lines}\n"
        f"Supported layer classes: {', '.join(handlers.supported_layers())}.\n"
        "For a custom layer, register a handler: lrp_grad.register_handler(LayerClass, "
        "'passthrough' | 'gradient' | 'identity' | lrp_grad.handlers.Handler(...)).",
        [(layer.name, class_name(layer), why) for layer, why in problems],
    )


def build_plan(model, rule, input_nonneg=False, canonizers=None, compute_dtype=None, output=None) -> Plan:
    """Check the whole model and decide, per layer call, the handler, rule and input signs.

    Parameters
    ----------
    model : keras.Model or tf_keras.Model
        Sequential or Functional model (Keras 3 or tf-keras), with any number of inputs.
    rule : Rule, Composite or str
        A rule for every rule-taking layer, a composite, or a preset name.
    input_nonneg : bool or tuple of bool
        Whether the model input is known to be ``>= 0`` (per input for several inputs).
    canonizers : sequence of Canonizer, optional
        Forward-preserving rewrites; default :data:`~lrp_grad.canonizers.DEFAULT_CANONIZERS`.
    compute_dtype : str, optional
        Reduced precision for the linear ops (``'bfloat16'``, ``'float16'``).
    output : str or int, optional
        What to explain (see :func:`lrp_grad.frontends.walk`): an output name or index, or a layer name.

    Raises
    ------
    UnsupportedModelError
        For subclassed models, several outputs without ``output``, an unknown output, Keras 3 on
        another backend, quantized layers.
    UnsupportedLayerError
        Listing every layer without a handler or with an unsupported configuration.
    InvalidRuleError
        When the composite leaves a layer without a rule.
    """
    composite = as_composite(rule)

    # 1. Walk the layer graph (this also rejects unsupported model kinds) and canonize it.
    graph = walk(model, output)
    graph = canonize(graph, DEFAULT_CANONIZERS if canonizers is None else canonizers)

    # 2. Find every layer's handler and every product's gate.
    producers = {t: node for node in graph.nodes for t in node.outputs}
    handler_of = lambda node: node.handler or handlers.handler_for(node.layer)  # noqa: E731
    entries = []
    for node in graph.nodes:
        handler = handler_of(node)
        ctx = handlers.Context(is_output=graph.output_id in node.outputs, params=node.params,
                               input_shapes=node.input_shapes, compute_dtype=compute_dtype)
        if handler is not None and handler.kind == "gate":
            gate, why = gating.gate_index(node, producers, handler_of)
            ctx = replace(ctx, gate=gate, gate_problem=why)
        entries.append((node, handler, ctx))

    # 3. Collect all problems so the user sees them at once. A layer on a branch that only feeds
    #    gates gets no relevance: without a handler (or with an unsupported setting) it is still
    #    computed, by its own forward (handlers.FORWARD_ONLY).
    problems, found = [], []
    gate_only = _gate_only(graph, entries)
    for i, (node, handler, ctx) in enumerate(entries):
        if i in gate_only and (handler is None or handler.check(node.layer, ctx)):
            found.append((node, handlers.FORWARD_ONLY, ctx))
            continue
        if handler is None:
            hint = " (a subclassed model used as a layer)" if is_model(node.layer) else ""
            problems.append((node.layer, f"no handler for this layer class{hint}"))
        else:
            why = handler.check(node.layer, ctx)
            if why:
                problems.append((node.layer, why))
        found.append((node, handler, ctx))
    if problems:
        raise _unsupported(graph, problems)

    # 4. Give every rule-taking layer its rule.
    linear = [(node.label, node.layer, h.family) for node, h, _ in found if h.kind == "linear"]
    rules = iter(composite.assign(linear))

    # 5. Propagate the sign knowledge (lets the split rules skip the x- half).
    flags = input_nonneg if isinstance(input_nonneg, tuple) else (input_nonneg,) * len(graph.input_ids)
    nonneg = {t: bool(f) for t, f in zip(graph.input_ids, flags)}
    steps = []
    for node, handler, ctx in found:
        flags = tuple(nonneg.get(t, False) for t in node.inputs)
        rule_here = next(rules) if handler.kind == "linear" else None
        ctx = replace(ctx, rule=rule_here, nonneg=flags)
        out_flag = bool(handler.nonneg(node.layer, flags))
        for t in node.outputs:
            nonneg[t] = out_flag
        steps.append(Step(node, handler, ctx))
    return Plan(graph, _fuse_relus(graph, steps))


def _gate_only(graph, entries) -> set:
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


def _zero_safe(graph, steps, consumers) -> dict:
    """Tensor id -> whether the relevance arriving at it is zero wherever its value is zero.

    True when every consumer hands a zero input zero relevance: a linear layer whose rule scales
    with its input, or a routing/elementwise layer with that property whose own output is safe.
    The model output is not (the initial relevance is arbitrary). Steps run in forward order, so
    walking them backwards decides every consumer before its producer.
    """
    safe = {}
    for step in reversed(steps):
        (out,) = step.node.outputs
        ok = out != graph.output_id
        for j in consumers.get(out, ()):
            consumer = steps[j]
            if consumer.handler.kind == "linear":
                ok = ok and bool(getattr(consumer.context.rule, "scales_with_input", False))
            else:
                zz = consumer.handler.zero_in_zero_out
                ok = ok and bool(zz(consumer.node.layer) if callable(zz) else zz) and safe[consumer.node.outputs[0]]
        safe[out] = ok
    return safe


def _fuse_relus(graph, steps) -> tuple:
    """Let linear layers apply the ReLU after them inside their LRP op where that is exact.

    A layer's own ``activation='relu'``, or a plain ReLU layer reached through identity layers
    (e.g. a folded BatchNorm) as the sole consumer, is fused when the relevance at the ReLU's
    output is zero wherever that output is zero (:func:`_zero_safe`); the ReLU layer's step then
    passes its input on. See :func:`lrp_grad.propagate.linear` for what this saves.
    """
    consumers = {}
    for i, step in enumerate(steps):
        for t in step.node.inputs:
            consumers.setdefault(t, []).append(i)
    safe = _zero_safe(graph, steps, consumers)
    steps = list(steps)
    for i, step in enumerate(steps):
        if not (step.handler.kind == "linear" and step.handler.fuses_relu):
            continue
        own = activation_name(getattr(step.node.layer, "activation", None))
        (t,) = step.node.outputs
        if own == "relu":
            if safe[t]:
                steps[i] = replace(step, context=replace(step.context, fuse_relu=True))
            continue
        if own != "linear":
            continue
        while t != graph.output_id and len(consumers.get(t, ())) == 1:
            j = consumers[t][0]
            nxt = steps[j]
            if nxt.handler.kind == "identity" and nxt.handler is not handlers.FUSED_RELU:
                (t,) = nxt.node.outputs
                continue
            if nxt.handler.kind == "passthrough" and handlers.is_plain_relu(nxt.node.layer) and safe[nxt.node.outputs[0]]:
                steps[i] = replace(step, context=replace(step.context, fuse_relu=True))
                steps[j] = replace(nxt, handler=handlers.FUSED_RELU)
            break
    return tuple(steps)


def run(plan: Plan, x, collect: bool = False):
    """Execute the rewritten forward pass on ``x`` (a tensor, or a list of one per model input).

    Returns the output tensor and, with ``collect``, a dict ``label -> output tensor`` of every
    layer call (in forward order), whose gradients are the per-layer relevances.
    """
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    tensors = dict(zip(plan.graph.input_ids, xs))
    collected = {}
    for step in plan.steps:
        inputs = [tensors[t] for t in step.node.inputs]
        out = step.handler.apply(step.node.layer, inputs, step.context)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        tensors.update(zip(step.node.outputs, outs))
        if collect:
            collected[step.node.label] = outs[0]
    return tensors[plan.graph.output_id], collected
