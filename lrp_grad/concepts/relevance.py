"""Concept relevance and conditional heatmaps: the compiled conditional pass and the functions that run it.

One compiled call computes all ``k`` conditions: the forward pass and the backward pass above the
highest conditioned layer run once; only the part below it runs per condition, vectorised over
the conditions (``pfor``). :func:`concept_relevance`, :func:`conditional` and :func:`subconcepts`
are the public functions (the :class:`~lrp_grad.Explainer` methods of the same names call them).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..core import planner
from ..errors import InvalidTargetError, LRPMemoryError
from ..api.passes import pad_to_bucket as _pad_to_bucket
from ..api.passes import raise_if_stale as _raise_if_stale
from ..api.request import check_batch_size as _check_batch_size
from .resolve import ConceptError, _check_below, _conditions, _plan_label, _resolve, layer_channels

__all__ = ["concept_relevance", "conditional", "subconcepts"]


def explainer_of(ex, what: str):
    """``ex`` itself for an :class:`~lrp_grad.Explainer`; for a Keras model, the explainer that
    :func:`lrp_grad.explain` caches for it (default options), so repeated calls on a model reuse
    one compiled pass instead of tracing a new one each time."""
    from ..api.cache import _cached_explainer  # noqa: PLC0415
    from ..api.explainer import Explainer  # noqa: PLC0415
    from ..frontends import is_model  # noqa: PLC0415

    if isinstance(ex, Explainer):
        return ex
    if is_model(ex):
        return _cached_explainer(ex, None, None, None, None)[0]
    raise ConceptError(f"{what}() takes an lrp_grad.Explainer (or a Keras model) first, got {type(ex).__name__}; "
                       f"pass ex = lrp_grad.Explainer(model) and call {what}(ex, x, ...).")


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
            ex.passes.traced()  # runs only while tracing
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
        ex.passes.traced()  # runs only while tracing
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
    batch_size = _check_batch_size(batch_size)
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
    except tf.errors.InvalidArgumentError as e:
        _raise_if_stale(e)  # the model changed since the Explainer was built: StaleExplainerError
        raise
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
        Or a Keras model (its explainer with the default options is built once and reused).
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
    ex = explainer_of(ex, "concept_relevance")
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
    ex = explainer_of(ex, "conditional")
    labels, masks = _conditions(ex, layer, channels, conditions)
    ins, _, structure = _run(ex, x, target, initial, labels, masks, (), True, batch_size, "conditional")
    return ex.signature.pack(ins, structure)


def subconcepts(ex, x, target=None, *, layer, channels, lower, initial="logit", batch_size=None):
    """Which channels of ``lower`` make up each of ``channels`` of ``layer``: ``(n, k, channels of lower)``.

    Entry ``[i, j, c]`` is the relevance of channel ``c`` of ``lower`` given that only the relevance
    of ``channels[j]`` of ``layer`` is kept (for sample ``i``).
    """
    ex = explainer_of(ex, "subconcepts")
    labels, masks = _conditions(ex, layer, channels, None)
    low = _resolve(ex, lower)
    layer_channels(ex, low)
    _check_below(ex, labels[-1], low, "subconcepts")
    _, sums, _ = _run(ex, x, target, initial, labels, masks, (low,), False, batch_size, "subconcepts")
    return sums[0]
