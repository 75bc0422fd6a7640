"""Turns a Keras model into an LRP forward pass: a plan (checked up front) and its execution."""
from __future__ import annotations

from dataclasses import dataclass, replace

from . import handlers
from ..frontends import Graph, Node, activation_name, class_name
from .composites import RuleMap
from .presets import as_composite
from .survey import survey, unsupported

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
    UnsupportedModelError, UnsupportedLayerError
        As :func:`lrp_grad.core.survey.survey`; also for a layer whose configuration its rule
        cannot take (a LayerNormalization under alpha-beta).
    InvalidRuleError
        When the composite leaves a layer without a rule or gives one of the wrong kind.
    """
    # 1.-3. Walk, canonize, find the handlers, refuse what cannot be explained (core.survey).
    composite = as_composite(rule)
    surveyed = survey(model, canonizers, compute_dtype, output)
    graph, found = surveyed.graph, surveyed.entries

    # 4. Give every rule-taking layer its rule, and ask its handler again now that the rule is
    #    known (a LayerNormalization takes Z or Epsilon only).
    assigned = composite.assign(surveyed.rule_taking)
    linear = [(node, handler, replace(ctx, rule=r))
              for (node, handler, ctx), r in zip((e for e in found if e[1].kind == "linear"), assigned)]
    problems = [(node, why) for node, handler, ctx in linear if (why := handler.check(node.layer, ctx))]
    if problems:
        raise unsupported(graph, problems)
    rules = iter(assigned)

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


def _zero_safe(graph, steps, consumers) -> dict:
    """Tensor id -> whether the relevance arriving at it is zero wherever its value is zero.

    True when every consumer hands a zero input zero relevance: a linear layer whose rule scales
    with its input, or a routing/elementwise layer with that property whose own output is safe.
    The model output is not (the initial relevance is arbitrary). Steps run in forward order, so
    walking them backwards decides every consumer before its producer.
    """
    safe = {}
    for step in reversed(steps):
        for out in step.node.outputs:  # several for a split
            ok = out != graph.output_id
            for j in consumers.get(out, ()):
                consumer = steps[j]
                if consumer.handler.kind == "linear":
                    ok = ok and bool(getattr(consumer.context.rule, "scales_with_input", False))
                else:
                    zz = consumer.handler.zero_in_zero_out
                    ok = (ok and bool(zz(consumer.node.layer) if callable(zz) else zz)
                          and all(safe[o] for o in consumer.node.outputs))
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
