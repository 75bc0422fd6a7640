"""What a concept query names: layer names to plan labels, channel counts, channel masks and conditions.

Every function of :mod:`lrp_grad.concepts` resolves its ``layer=``, ``channels=`` and
``conditions=`` arguments here and refuses what has no concepts (a model input, a layer without a
channel axis, a gate-only branch, a channel out of range) with a :class:`ConceptError`.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..core.survey import gate_only
from ..errors import LRPError
from ..frontends import class_name

__all__ = ["ConceptError", "layer_channels"]


class ConceptError(LRPError, ValueError):
    """A concept query names an unknown layer, a layer without channels, or a channel out of range."""


#: Layer classes whose output mixes positions and channels into one axis: they have no channels.
_NO_CHANNELS = ("Flatten", "Reshape", "Permute", "RepeatVector")


def _plan_of(ex):
    return ex.passes.signed_plan


def _resolve(ex, name) -> str:
    """The plan label of layer ``name`` (a layer name, ``'outer/inner'`` or ``'name#k'``)."""
    plan = _plan_of(ex)
    from ..frontends import is_layer_class  # noqa: PLC0415

    if is_layer_class(type(name)):  # a layer object: by its name
        name = name.name
    if not isinstance(name, str):
        raise ConceptError(f"layer must be a layer name (str) or a layer of the model, got {name!r} of type "
                           f"{type(name).__name__}.")
    labels = list(_labels(ex))
    if name in labels:
        return name
    base = [lab for lab in labels if lab.split("#")[0] == name or lab.split("#")[0].rsplit("/", 1)[-1] == name]
    if len(base) == 1:
        return base[0]
    if len(base) > 1:
        raise ConceptError(f"layer {name!r} is called {len(base)} times in model {ex.model.name!r}; name one call: "
                           f"{', '.join(repr(b) for b in base)}.")
    try:
        found = ex.model.get_layer(name)
    except (ValueError, KeyError):
        found = None
    if name in ex.input_names or (found is not None and class_name(found) == "InputLayer"):
        raise ConceptError(f"layer {name!r} is a model input; its relevance is the heatmap itself (call the "
                           "explainer); concepts live in hidden layers.")
    inner = [lab for lab in labels if lab.startswith(name + "/")]
    if found is not None and inner:  # a nested model: its output layer stands for it
        outs = getattr(found, "outputs", None) or []
        history = getattr(outs[0], "_keras_history", None) if len(outs) == 1 else None
        op = getattr(history, "operation", None) or getattr(history, "layer", None)
        match = [lab for lab in inner if op is not None and lab.split("#")[0] == f"{name}/{op.name}"]
        if len(match) == 1:
            return match[0]
        raise ConceptError(f"layer {name!r} is a nested model; name one of its layers, e.g. "
                           f"{', '.join(repr(lab) for lab in inner[-3:])}.")
    if found is not None:
        raise ConceptError(f"layer {name!r} of model {ex.model.name!r} does not lead to the explained output "
                           f"{ex.output_name!r}, so it receives no relevance; choose a layer below it.")
    close = [lab for lab in labels if name.lower() in lab.lower()][:8] or labels[-8:]
    raise ConceptError(f"model {ex.model.name!r} has no layer {name!r}; layers include: "
                       f"{', '.join(repr(c) for c in close)}.")


def _labels(ex) -> dict:
    """Concept label -> plan label of every layer call, in forward order. A shared layer's calls are
    ``'name#1'``, ``'name#2'``, ... (the plan labels its first call by the plain name)."""
    plan = _plan_of(ex)
    cached = getattr(ex, "_concept_labels", None)
    if cached is not None and cached[0] is plan:
        return cached[1]
    plain = [s.node.label for s in plan.steps]
    shared = {lab for lab in plain if any(other.startswith(lab + "#") for other in plain)}
    out = {(f"{lab}#1" if lab in shared else lab): lab for lab in plain}
    ex._concept_labels = (plan, out)
    return out


def _plan_label(ex, label) -> str:
    return _labels(ex)[label]


def _step(ex, label):
    plan_label = _plan_label(ex, label)
    return next(s for s in _plan_of(ex).steps if s.node.label == plan_label)


def _gate_only(ex) -> set:
    """Plan labels of the layer calls whose output reaches the explained output only through the
    gate input of a product (squeeze-and-excitation branches, attention weights): no relevance."""
    plan = _plan_of(ex)
    cached = getattr(ex, "_concept_gate_only", None)
    if cached is None or cached[0] is not plan:
        entries = [(s.node, s.handler, s.context) for s in plan.steps]
        cached = (plan, {plan.steps[i].node.label for i in gate_only(plan.graph, entries)})
        ex._concept_gate_only = cached
    return cached[1]


def layer_channels(ex, layer) -> int:
    """The number of channels (last axis of the output) of ``layer``; refuses layers without channels."""
    label = _resolve(ex, layer)
    step = _step(ex, label)
    if step.node.label in _gate_only(ex):
        raise ConceptError(f"layer {label!r} ({class_name(step.node.layer)}) only feeds the gate of a product "
                           "(e.g. a squeeze-and-excitation branch): LRP gives gates no relevance, so its channels "
                           "carry none; choose a layer on the signal path.")
    shape = step.node.output_shapes[0] if step.node.output_shapes else None
    shape = None if shape is None else tf.TensorShape(shape)
    cls = class_name(step.node.layer)
    if cls in _NO_CHANNELS:
        raise ConceptError(f"layer {label!r} ({cls}) has no channels: its output axis mixes positions and "
                           "channels; choose the layer before it (e.g. the last convolution).")
    if shape is None or shape.rank is None or shape.rank < 2 or shape[-1] is None:
        raise ConceptError(f"layer {label!r} ({cls}) has no channel axis (output shape {shape}); concepts are "
                           "the channels (last axis) of a layer's output.")
    return int(shape[-1])


def _as_list(channels) -> list:
    """A channel index alone, or any iterable of them (list, tuple, range, array) as a list."""
    if isinstance(channels, (str, bytes, dict)) or not hasattr(channels, "__iter__") or (
            isinstance(channels, np.ndarray) and channels.ndim == 0):
        return [channels]
    return list(channels)


def _channel_mask(ex, label, channels, what) -> np.ndarray:
    """A 0/1 vector over the layer's channels: one channel (int) or several (a list)."""
    c = layer_channels(ex, label)
    ids = _as_list(channels)
    if not ids:
        raise ConceptError(f"{what}: an empty channel list for layer {label!r}.")
    m = np.zeros(c, np.float32)
    for v in ids:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ConceptError(f"{what}: channel {v!r} of layer {label!r} is not an integer.")
        if not 0 <= int(v) < c:
            raise ConceptError(f"{what}: channel {int(v)} is out of range for layer {label!r} "
                               f"({class_name(_step(ex, label).node.layer)}) with {c} channels (valid: 0..{c - 1}).")
        m[int(v)] = 1.0
    return m


def _order(ex) -> dict:
    return {label: i for i, label in enumerate(_labels(ex))}


def _ancestors(ex, label) -> set:
    """Labels of the layer calls ``label``'s output depends on."""
    steps = _plan_of(ex).steps
    canonical = {plan_label: label for label, plan_label in _labels(ex).items()}
    producer = {t: canonical[s.node.label] for s in steps for t in s.node.outputs}
    inputs = {canonical[s.node.label]: s.node.inputs for s in steps}
    seen, todo = set(), [label]
    while todo:
        for t in inputs[todo.pop()]:
            p = producer.get(t)
            if p is not None and p not in seen:
                seen.add(p)
                todo.append(p)
    return seen


def _check_below(ex, upper, lower, what):
    if lower == upper or lower not in _ancestors(ex, upper):
        raise ConceptError(f"{what}: layer {lower!r} is not below layer {upper!r} (its output does not feed "
                           f"{upper!r}); relevance reaches it only after the condition is applied elsewhere.")


def _conditions(ex, layer, channels, conditions):
    """Normalise to ``(labels top-down, [mask per label] per condition)``."""
    if conditions is None:
        if layer is None or channels is None:
            raise ConceptError("conditional() needs layer= and channels= (a list of channel indices), or "
                               "conditions= (a list of {layer: channel or [channels]} dicts).")
        label = _resolve(ex, layer)
        chans = _as_list(channels)
        conditions = [{label: c} for c in chans]
    elif layer is not None or channels is not None:
        raise ConceptError("pass either layer= and channels=, or conditions=, not both.")
    if isinstance(conditions, dict):
        conditions = [conditions]
    conditions = list(conditions)
    if not conditions:
        raise ConceptError("no conditions: pass at least one channel.")
    resolved = []
    for i, cond in enumerate(conditions):
        if not isinstance(cond, dict) or not cond:
            raise ConceptError(f"conditions[{i}] must be a non-empty dict {{layer name: channel or [channels]}}, "
                               f"got {cond!r}.")
        resolved.append({_resolve(ex, k): v for k, v in cond.items()})
    order = _order(ex)
    labels = sorted(resolved[0], key=lambda lab: -order[lab])
    for i, cond in enumerate(resolved):
        if set(cond) != set(labels):
            raise ConceptError(f"conditions[{i}] names layers {sorted(cond)} but conditions[0] names {sorted(labels)}; "
                               "the conditions of one call must name the same layers (make one call per set).")
    for upper, lower in zip(labels, labels[1:]):
        _check_below(ex, upper, lower, "conditions")
    masks = [np.stack([_channel_mask(ex, lab, cond[lab], f"conditions[{i}]") for i, cond in enumerate(resolved)])
             for lab in labels]
    return tuple(labels), masks
