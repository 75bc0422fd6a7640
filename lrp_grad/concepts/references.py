"""Reference samples: per channel, the samples of a dataset where it is most relevant (or active), streamed once.

Relevance (or activation) maximisation with constant memory: only the current best ``top`` per
channel are kept, with the receptive field of the position that made each one the best and,
optionally, a crop of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ..core import planner
from ..errors import InvalidInputError
from ..api.request import check_batch_size as _check_batch_size
from .fields import receptive_field
from ..api.passes import raise_if_stale as _raise_if_stale
from .relevance import _spatial_sum, explainer_of
from .resolve import ConceptError, _channel_mask, _plan_label, _resolve, _step, layer_channels

__all__ = ["ReferenceSamples", "reference_samples"]


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
        ex.passes.traced()  # runs only while tracing
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
        A single-input explainer (or a Keras model: its explainer with the default options).
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

    ex = explainer_of(ex, "reference_samples")
    if ex.n_inputs != 1:
        raise ConceptError("reference_samples needs a single-input explainer.")
    if by not in ("relevance", "activation"):
        raise ConceptError(f"by={by!r} is not known; use 'relevance' (relevance maximisation) or 'activation'.")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ConceptError(f"top must be a positive int, got {top!r}.")
    batch_size = _check_batch_size(batch_size)
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

    for images, labels, start in stream._batches(data, ex, batch_size, target if by == "relevance" else None):
        n = len(images)
        if by == "relevance":
            select, second = ex.signature.target(stream._targets(target, labels, n), n)
        else:
            select, second = "index", np.full((n,), -1, np.int32)
        fn = _ref_function(ex, (bool(np.all(images >= 0)),), select, None, label, by)
        try:
            score, where = fn(tf.constant(images.astype(ex.dtype, copy=False)), tf.constant(second))
        except tf.errors.InvalidArgumentError as e:
            _raise_if_stale(e)  # the model changed since the Explainer was built: StaleExplainerError
            raise
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
