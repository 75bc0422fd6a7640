"""Concepts: which learned features (channels of a layer) carry a decision.

Concept Relevance Propagation (Achtibat et al., Nature Machine Intelligence 2023) on top of the
ordinary LRP pass:

- :func:`concept_relevance` -- ``(n, channels)``: the relevance arriving at each channel of a layer
  (summed over its positions), from the ordinary pass; optionally given a condition above it
  (sub-concepts: which lower features make up a channel).
- :func:`conditional` -- ``(n, k, *input_shape)``: the input relevance that flows through chosen
  channels of a layer (or through a channel of one layer and then one of a lower layer). One
  compiled call computes all ``k`` conditions: the forward pass and the backward pass above the
  highest conditioned layer run once; only the part below it runs per condition, vectorised over
  the conditions (``pfor``), so the layers' LRP-only intermediate terms that depend on the forward
  values alone (e.g. alpha-beta's ``z+``) are computed once as well.
- :func:`reference_samples` -- relevance (or activation) maximisation over a dataset, streamed with
  constant memory: per channel, the samples where it is most relevant (or active), with the
  receptive field of the position that made it so, and crops of it.
- :func:`receptive_field` -- the input box a position of a layer can see (from the layers'
  geometry; a superset where a layer's geometry is unknown).

The :class:`~lrp_grad.Explainer` methods ``concept_relevance``, ``conditional`` and
``subconcepts`` call these functions.

The conditional heatmaps of a layer's channels sum to the relevance that flows through that layer:
the backward pass of every rule is linear in the relevance arriving at a layer. When every path
from the input to the explained output passes through the layer (any layer of a plain CNN, a
residual block's output), that is the ordinary heatmap; a layer inside a residual branch
conditions only the relevance passing through it, not the skip connection's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ..core import planner
from ..core.survey import gate_only
from ..errors import InvalidInputError, InvalidTargetError, LRPError, LRPMemoryError
from ..api.passes import pad_to_bucket as _pad_to_bucket
from ..api.request import check_batch_size as _check_batch_size
from ..frontends import class_name

__all__ = [
    "ConceptError", "concept_relevance", "conditional", "subconcepts", "reference_samples", "ReferenceSamples",
    "receptive_field", "layer_channels",
]


class ConceptError(LRPError, ValueError):
    """A concept query names an unknown layer, a layer without channels, or a channel out of range."""


#: Layer classes whose output mixes positions and channels into one axis: they have no channels.
_NO_CHANNELS = ("Flatten", "Reshape", "Permute", "RepeatVector")


# ---------------------------------------------------------------------------------------------
# Layers and channels


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


# ---------------------------------------------------------------------------------------------
# The compiled conditional pass


def _spatial_sum(g):
    """``(n, ..., C) -> (n, C)``."""
    rank = g.shape.rank
    return g if rank == 2 else tf.reduce_sum(g, axis=list(range(1, rank - 1)))


def _function(ex, input_nonneg, mode, select, mask_shape, cond_labels, sum_labels, want_input):
    """``fn(*inputs, second, *masks) -> (input relevances, layer channel sums, logits)``.

    Without conditions the results have shape ``(n, ...)``; with ``L`` conditioned layers, each
    ``masks[j]`` is ``(k, C_j)`` and every result gets a leading axis of ``k`` (one per condition).
    """
    mask_shape = None if mask_shape is None else tuple(mask_shape[1:])
    key = ("concepts", input_nonneg, mode, select, mask_shape, cond_labels, sum_labels, want_input)
    if key in ex.passes.functions:
        return ex.passes.functions[key]
    plan = ex.passes.plan(input_nonneg)
    specs = ex.passes.input_specs() + [ex.passes.second_spec(select, mask_shape)]
    specs += [tf.TensorSpec((None, layer_channels(ex, lab)), ex.dtype) for lab in cond_labels]
    n_in = ex.n_inputs

    def concept_pass(*args):
        ex.passes.trace_count += 1  # runs only while tracing
        xs, second, masks = list(args[:n_in]), args[n_in], list(args[n_in + 1:])
        with tf.GradientTape(persistent=True) as tape:
            for x in xs:
                tape.watch(x)
            logits, layers = planner.run(plan, xs, collect=True)
        r0 = ex.passes.initial_relevance(logits, second, select, mode)
        sums_of = [layers[_plan_label(ex, lab)] for lab in sum_labels]
        zero = tf.UnconnectedGradients.ZERO
        if not cond_labels:
            sources = (xs if want_input else []) + sums_of
            grads = tape.gradient(logits, sources, output_gradients=r0, unconnected_gradients=zero)
            ins = grads[:n_in] if want_input else []
            return tuple(ins), tuple(_spatial_sum(g) for g in grads[len(ins):]), logits
        top = layers[_plan_label(ex, cond_labels[0])]
        # The backward pass above the highest condition: once for all conditions.
        r_top = tape.gradient(logits, top, output_gradients=r0, unconnected_gradients=zero)

        def one_condition(i):
            r, here = r_top * tf.gather(masks[0], i), top
            for lab, m in zip(cond_labels[1:], masks[1:]):
                below = layers[_plan_label(ex, lab)]
                r = tape.gradient(here, below, output_gradients=r, unconnected_gradients=zero) * tf.gather(m, i)
                here = below
            sources = (xs if want_input else []) + sums_of
            grads = tape.gradient(here, sources, output_gradients=r, unconnected_gradients=zero)
            ins = list(grads[:n_in]) if want_input else []
            return ins + [_spatial_sum(g) for g in grads[len(ins):]]

        k = tf.shape(masks[0])[0]
        from tensorflow.python.ops.parallel_for.control_flow_ops import pfor  # tf.vectorized_map without a fn input

        out = pfor(one_condition, k)
        ins = out[:n_in] if want_input else []
        return tuple(ins), tuple(out[len(ins):]), logits

    fn = tf.function(concept_pass, input_signature=specs, jit_compile=ex.jit_compile, autograph=False)
    ex.passes.functions[key] = fn
    return fn


def _prepare(ex, x, target, initial, what):
    xs, structure = ex.signature.inputs(x)
    n = len(xs[0])
    if ex.signature.per_class_targets(target, n) is not None:
        raise InvalidTargetError(f"{what} takes one target per sample (an int, (n,) ints or a mask); for several "
                                 "classes call it once per class.")
    mode, select, second = ex.signature.selection(target, initial, n)
    input_nonneg = tuple(bool(np.all(v >= 0)) for v in xs)
    return xs, structure, n, mode, select, second, input_nonneg


def _run(ex, x, target, initial, cond_labels, masks, sum_labels, want_input, batch_size, what):
    """Run the concept pass over ``x`` in chunks of images and of conditions; numpy results with
    the condition axis (if any) second: ``(n, k, ...)``."""
    _check_batch_size(batch_size)
    xs, structure, n, mode, select, second, input_nonneg = _prepare(ex, x, target, initial, what)
    fn = _function(ex, input_nonneg, mode, select, second.shape if select == "mask" else None,
                   cond_labels, sum_labels, want_input)
    shared = select == "mask" and second.shape[0] == 1
    k = masks[0].shape[0] if masks else 1
    rows = batch_size if batch_size is not None else ex.auto_batch_size()
    img_step = max(1, min(n, rows))
    cond_step = max(1, min(k, rows // img_step))
    ins_parts, sum_parts = [], []
    for a in range(0, n, img_step):
        chunk = [v[a:a + img_step] for v in xs]
        s = np.broadcast_to(second, (len(chunk[0]),) + second.shape[1:]) if shared else second[a:a + img_step]
        ins_c, sums_c = [], []
        for b in range(0, k, cond_step):
            ms = [m[b:b + cond_step] for m in masks]
            ins, sums = _call(ex, fn, chunk, s, ms)
            ins_c.append(ins)
            sums_c.append(sums)
        ins_parts.append([np.concatenate(p, axis=0) if masks else p[0] for p in zip(*ins_c)])
        sum_parts.append([np.concatenate(p, axis=0) if masks else p[0] for p in zip(*sums_c)])
    cat = 1 if masks else 0
    ins = [np.concatenate(p, axis=cat) for p in zip(*ins_parts)] if want_input else []
    sums = [np.concatenate(p, axis=cat) for p in zip(*sum_parts)]
    if masks:  # (k, n, ...) -> (n, k, ...)
        ins = [np.swapaxes(v, 0, 1) for v in ins]
        sums = [np.swapaxes(v, 0, 1) for v in sums]
    return ins, sums, structure


def _call(ex, fn, xs, second, masks):
    rows = len(xs[0])
    if ex.jit_compile:
        xs, second = [_pad_to_bucket(v) for v in xs], _pad_to_bucket(np.asarray(second))
    try:
        ins, sums, _ = fn(*[tf.constant(v) for v in xs], tf.constant(second),
                          *[tf.constant(m.astype(ex.dtype, copy=False)) for m in masks])
    except tf.errors.ResourceExhaustedError:
        k = masks[0].shape[0] if masks else 1
        raise LRPMemoryError(
            f"out of memory computing {k} condition(s) for {rows} samples with model {ex.model.name!r}; pass a "
            f"smaller batch_size= (images x conditions per call, e.g. batch_size={max(1, rows * k // 4)}).") from None
    cut = (lambda v: v.numpy()[:, :rows]) if masks else (lambda v: v.numpy()[:rows])
    return [cut(v) for v in ins], [cut(v) for v in sums]


# ---------------------------------------------------------------------------------------------
# Public functions (the Explainer methods of the same names call them)


def concept_relevance(ex, x, target=None, *, layer, condition=None, initial="logit", batch_size=None):
    """Relevance of each channel of ``layer`` (summed over its positions) for ``target``.

    Parameters
    ----------
    ex : Explainer
    x : array_like (list/dict for several inputs)
        A batch, as for :meth:`Explainer.__call__`.
    target : int, (n,) ints or a float mask, optional
        What is explained, as for :meth:`Explainer.__call__` (default: the predicted class).
    layer : str, layer, or a list of them
        Layer name(s) (or the model's layer objects); several layers are computed in the same pass.
    condition : dict, optional
        ``{upper layer: channel or [channels]}`` (one or more layers above ``layer``): the relevance
        of ``layer``'s channels given that only these channels' relevance is kept above: the
        sub-concepts of a concept.
    initial, batch_size :
        As for :meth:`Explainer.__call__`.

    Returns
    -------
    numpy.ndarray ``(n, channels)``, or a dict ``layer -> (n, channels)`` when ``layer`` is a list.
    """
    names = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not names:
        raise ConceptError("layer= is an empty list; name at least one layer.")
    labels = tuple(_resolve(ex, name) for name in names)
    for lab in labels:
        layer_channels(ex, lab)
    cond_labels, masks = (), []
    if condition is not None:
        if not isinstance(condition, dict) or not condition:
            raise ConceptError(f"condition must be a dict {{layer name: channel or [channels]}}, got {condition!r}.")
        cond_labels, masks = _conditions(ex, None, None, [condition])
        for lab in labels:
            _check_below(ex, cond_labels[-1], lab, "concept_relevance")
    _, sums, _ = _run(ex, x, target, initial, cond_labels, masks, labels, False, batch_size, "concept_relevance")
    if masks:
        sums = [v[:, 0] for v in sums]
    if isinstance(layer, (list, tuple)):
        return {getattr(k, "name", k): v for k, v in zip(names, sums)}
    return sums[0]


def conditional(ex, x, target=None, *, layer=None, channels=None, conditions=None, initial="logit",
                batch_size=None):
    """Conditional heatmaps: the input relevance that flows through chosen channels.

    Parameters
    ----------
    layer : str
        The layer whose channels condition the relevance.
    channels : int or list
        One heatmap per entry; an entry is a channel index or a list of channels kept together.
    conditions : list of dict, optional
        Instead of ``layer``/``channels``: one ``{layer: channel or [channels], ...}`` dict per
        heatmap, all naming the same layers (e.g. ``{"conv2": 5, "conv1": 3}``: the relevance that
        passes channel 5 of ``conv2`` and then channel 3 of ``conv1``).
    target, initial, batch_size :
        As for :meth:`Explainer.__call__` (one target per sample).

    Returns
    -------
    numpy.ndarray ``(n, k, *input_shape)`` (a list/dict of them for several inputs): ``k`` heatmaps
    per sample, in the order of ``channels``/``conditions``.
    """
    labels, masks = _conditions(ex, layer, channels, conditions)
    ins, _, structure = _run(ex, x, target, initial, labels, masks, (), True, batch_size, "conditional")
    return ex.signature.pack(ins, structure)


def subconcepts(ex, x, target=None, *, layer, channels, lower, initial="logit", batch_size=None):
    """Which channels of ``lower`` make up each of ``channels`` of ``layer``: ``(n, k, channels of lower)``.

    Entry ``[i, j, c]`` is the relevance of channel ``c`` of ``lower`` given that only the relevance
    of ``channels[j]`` of ``layer`` is kept (for sample ``i``).
    """
    labels, masks = _conditions(ex, layer, channels, None)
    low = _resolve(ex, lower)
    layer_channels(ex, low)
    _check_below(ex, labels[-1], low, "subconcepts")
    _, sums, _ = _run(ex, x, target, initial, labels, masks, (low,), False, batch_size, "subconcepts")
    return sums[0]


# ---------------------------------------------------------------------------------------------
# Receptive fields


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


# ---------------------------------------------------------------------------------------------
# Reference samples (relevance / activation maximisation)


@dataclass
class ReferenceSamples:
    """Per channel, the dataset samples where a channel of ``layer`` is most relevant (or active).

    Arrays have one row per channel in :attr:`channels` and ``top`` columns, best first; where the
    data had fewer than ``top`` samples the rest holds index ``-1`` and score ``-inf``.

    Attributes
    ----------
    layer : str
    by : {'relevance', 'activation'}
    channels : ndarray (c,)
    indices : ndarray (c, top) of int64
        Position of the sample in the data (0-based, in iteration order).
    scores : ndarray (c, top)
        Relevance of the channel (summed over its positions) for the sample's target, or its
        largest activation.
    positions : ndarray (c, top, spatial rank)
        The layer position of the channel's largest relevance (or activation) in that sample.
    boxes : ndarray (c, top, spatial rank, 2)
        The receptive field of that position in the input: ``[start, stop)`` per spatial axis.
    crops : list of list of ndarray, or None
        ``crops[i][j]``: the input sample ``indices[i, j]`` cut to ``boxes[i, j]`` (kept while
        streaming: memory grows with ``channels x top`` crops, not with the data).
    """

    layer: str
    by: str
    channels: np.ndarray
    indices: np.ndarray
    scores: np.ndarray
    positions: np.ndarray
    boxes: np.ndarray
    crops: list | None = None

    def __repr__(self):
        return (f"ReferenceSamples(layer={self.layer!r}, by={self.by!r}, channels={len(self.channels)}, "
                f"top={self.indices.shape[1]})")


def _ref_function(ex, input_nonneg, select, mask_shape, label, by):
    """``fn(x, second) -> (per channel score (n, C), per channel argmax position (n, C))``."""
    mask_shape = None if mask_shape is None else tuple(mask_shape[1:])
    key = ("reference", input_nonneg, select, mask_shape, label, by)
    if key in ex.passes.functions:
        return ex.passes.functions[key]
    plan = ex.passes.plan(input_nonneg)
    specs = ex.passes.input_specs() + [ex.passes.second_spec(select, mask_shape)]
    n_in = ex.n_inputs

    def ref_pass(*args):
        ex.passes.trace_count += 1
        xs, second = list(args[:n_in]), args[n_in]
        if by == "relevance":
            with tf.GradientTape() as tape:
                for x in xs:
                    tape.watch(x)
                logits, layers = planner.run(plan, xs, collect=True)
            a = layers[_plan_label(ex, label)]
            r0 = ex.passes.initial_relevance(logits, second, select, "logit")
            v = tape.gradient(logits, a, output_gradients=r0, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            score = _spatial_sum(v)
        else:  # activations only: no tape
            _, layers = planner.run(plan, xs, collect=True)
            v, score = layers[_plan_label(ex, label)], None
        c = tf.shape(v)[-1]
        flat = tf.reshape(v, [tf.shape(v)[0], -1, c])
        where = tf.argmax(flat, axis=1, output_type=tf.int32)
        if score is None:
            score = tf.reduce_max(flat, axis=1)
        return score, where

    fn = tf.function(ref_pass, input_signature=specs, jit_compile=False, autograph=False)
    ex.passes.functions[key] = fn
    return fn


def _merge_top(best_s, best_i, best_p, s, idx, pos, top):
    """Keep the ``top`` largest scores per channel: ``(c, top)`` running arrays with a batch ``(b, c)``."""
    all_s = np.concatenate([best_s, s.T], axis=1)
    all_i = np.concatenate([best_i, np.broadcast_to(idx[None, :], s.T.shape)], axis=1)
    all_p = np.concatenate([best_p, pos.transpose(1, 0, 2)], axis=1)
    # Stable: ties keep the earlier sample (lower index first).
    order = np.lexsort((all_i, -all_s), axis=1)[:, :top] if all_s.shape[1] else None
    take = lambda a: np.take_along_axis(a, order if a.ndim == 2 else order[..., None], axis=1)  # noqa: E731
    return take(all_s), take(all_i), take(all_p)


def reference_samples(ex, data, layer, channels=None, top=8, by="relevance", *, target="auto", batch_size=256,
                      crops=True):
    """The samples of ``data`` where each channel of ``layer`` is most relevant (or most active).

    Streams ``data`` once, keeping only the current best ``top`` per channel (memory does not grow
    with the data; with ``crops`` it holds ``channels x top`` receptive-field crops).

    Parameters
    ----------
    ex : Explainer
        A single-input explainer.
    data : array, (images, labels) arrays, tf.data.Dataset or iterable
        Images ``(n, ...)``, a pair of arrays ``(images, labels)``, or batches/elements of images or
        ``(image, label)`` pairs, as for :meth:`Explainer.explain_dataset`.
    layer : str
    channels : list of int, optional
        Channels to rank (default: all).
    top : int
    by : {'relevance', 'activation'}
        ``'relevance'``: the channel's relevance for the sample's target, summed over positions
        (relevance maximisation, CRP); ``'activation'``: its largest activation.
    target : 'auto', 'label', 'predicted' or int
        For ``by='relevance'``: the class explained per sample (``'auto'``: the labels when the data
        has them, else the prediction).
    batch_size : int
    crops : bool
        Also cut each reference sample to the receptive field of its best position.
    """
    from ..pipelines import stream  # noqa: PLC0415

    if ex.n_inputs != 1:
        raise ConceptError("reference_samples needs a single-input explainer.")
    if by not in ("relevance", "activation"):
        raise ConceptError(f"by={by!r} is not known; use 'relevance' (relevance maximisation) or 'activation'.")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ConceptError(f"top must be a positive int, got {top!r}.")
    _check_batch_size(batch_size)
    if batch_size is None:
        batch_size = 256
    data, _ = stream._pair_of_arrays(data, len(ex.input_shape))  # (images, labels) arrays: one element
    label = _resolve(ex, layer)
    c_all = layer_channels(ex, label)
    chans = np.arange(c_all) if channels is None else np.asarray(
        [int(np.flatnonzero(_channel_mask(ex, label, c, "reference_samples"))[0]) for c in np.ravel(channels)])
    node = _step(ex, label).node
    shape = tf.TensorShape(node.output_shapes[0])
    spatial = tuple(int(d) for d in shape[1:-1])
    n_sp = len(spatial)
    k = len(chans)
    best_s = np.full((k, 0), -np.inf)
    best_i = np.zeros((k, 0), np.int64)
    best_p = np.zeros((k, 0, n_sp), np.int64)
    kept = {}
    seen = 0
    fields = {}  # position -> receptive field (positions repeat across samples and channels)

    def field(position):
        if position not in fields:
            fields[position] = receptive_field(ex, label, position) if n_sp else ()
        return fields[position]

    for images, labels, start in stream._batches(data, ex, batch_size):
        n = len(images)
        if by == "relevance":
            select, second = ex.signature.target(stream._targets(target, labels, n), n)
        else:
            select, second = "index", np.full((n,), -1, np.int32)
        fn = _ref_function(ex, (bool(np.all(images >= 0)),), select, None, label, by)
        score, where = fn(tf.constant(images.astype(ex.dtype, copy=False)), tf.constant(second))
        score, where = score.numpy()[:, chans].astype(np.float64), where.numpy()[:, chans]
        pos = np.stack(np.unravel_index(where, spatial), axis=-1) if n_sp else np.zeros(where.shape + (0,), np.int64)
        idx = np.arange(start, start + n, dtype=np.int64)
        best_s, best_i, best_p = _merge_top(best_s, best_i, best_p, score, idx, pos, top)
        if crops:  # keep the crops of the samples still in the top
            for ci, j in np.argwhere((best_i >= start) & (best_i < start + n)):  # entries from this batch
                sl = tuple(slice(a, b) for a, b in field(tuple(int(v) for v in best_p[ci, j])))
                kept[(int(ci), int(best_i[ci, j]))] = np.array(images[int(best_i[ci, j]) - start][sl])
            alive = {(ci, int(i)) for ci in range(k) for i in best_i[ci]}
            kept = {kk: v for kk, v in kept.items() if kk in alive}
        seen += n
    if seen == 0:
        raise InvalidInputError("reference_samples got no samples from data.")
    width = best_s.shape[1]
    if width < top:
        pad = top - width
        best_s = np.concatenate([best_s, np.full((k, pad), -np.inf)], 1)
        best_i = np.concatenate([best_i, np.full((k, pad), -1, np.int64)], 1)
        best_p = np.concatenate([best_p, np.zeros((k, pad, n_sp), np.int64)], 1)
    boxes = np.zeros((k, top, n_sp, 2), np.int64)
    for ci in range(k):
        for j in range(top):
            if best_i[ci, j] >= 0:
                boxes[ci, j] = np.asarray(field(tuple(int(v) for v in best_p[ci, j])) or np.zeros((0, 2)))
    crop_list = None
    if crops:
        crop_list = [[kept.get((ci, int(best_i[ci, j]))) for j in range(top) if best_i[ci, j] >= 0]
                     for ci in range(k)]
    return ReferenceSamples(label, by, chans, best_i, best_s, best_p, boxes, crop_list)
