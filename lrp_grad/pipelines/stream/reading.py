"""Reading a dataset into checked batches: elements, dicts, labels, pairs of arrays, the length and the targets.

Anything ``explain_dataset`` accepts (a ``tf.data.Dataset``, a numpy array, a pair of arrays,
an iterable of images, ``(image, label)`` pairs or dicts, single or batched) becomes a stream of
``(x, labels, first_index)`` batches of one size, each checked (shape, dtype, finite values,
labels) before it is explained; an error names the dataset element at fault.
"""
from __future__ import annotations

import numpy as np

from ...errors import InvalidInputError


#: Keys a dict element may use for its image and its label (``tf.data`` pipelines of dicts).
IMAGE_KEYS = ("image", "images", "x", "input", "inputs", "pixels")
LABEL_KEYS = ("label", "labels", "y", "target", "class")


def _pair_of_arrays(data, input_rank):
    """``(images, labels)`` given as a tuple of two arrays is one batched element, not two elements:
    ``([(images, labels)], n)``; anything else is returned as it is, with ``None``."""
    if (isinstance(data, tuple) and len(data) == 2 and all(isinstance(v, np.ndarray) for v in data)
            and data[0].ndim == input_rank + 1 and data[1].ndim in (1, 2) and len(data[0]) == len(data[1])):
        return [data], len(data[0])
    return data, None


def _length(data, input_rank):
    """Number of images, when it can be known without reading the data."""
    if isinstance(data, np.ndarray):
        return len(data)
    try:
        import tensorflow as tf

        if isinstance(data, tf.data.Dataset):
            spec = data.element_spec
            if isinstance(spec, dict):  # dict elements: the image by its usual key names
                key = next((k for k in IMAGE_KEYS if k in spec), None)
                if key is None:
                    return None  # _from_dict names the keys when the elements are read
                spec = spec[key]
            spec = spec[0] if isinstance(spec, (tuple, list)) else spec
            n = int(data.cardinality())
            if getattr(spec, "shape", None) is None or spec.shape.rank != input_rank or n < 0:
                return None  # batched elements: cardinality counts batches
            return n
    except ImportError:  # pragma: no cover
        pass
    return len(data) if hasattr(data, "__len__") else None


def _batches(data, explainer, batch_size, target="auto"):
    """Regroup the stream into ``(x, labels, first_index)`` batches of ``batch_size``; checks every element.

    Batched elements (and whole arrays) are checked and sliced as blocks; single images are
    collected as they come and checked, stacked and labelled once per batch (vectorised): no
    per-image numpy work, only the unpacking of each element.

    Labels are read only when ``target`` uses them (``'auto'``, ``'label'``): then each must be a
    class of the explained output (an error names the element otherwise), and either every element
    has one or none has. ``-1`` in ``labels`` means "no label" (only ever set here, never taken
    from the data).
    """
    shape = tuple(explainer.input_shape)
    classes = (explainer.n_classes, explainer.signature.model_name) if _uses_labels(target) else None
    xs, ys, held, start, seen, first = [], [], 0, 0, 0, None
    for images, labels in _blocks(data, shape, batch_size, classes):
        if classes is not None and len(labels):
            first = _check_presence(labels, seen, first, target)
        seen += len(images)
        while len(images):
            take = min(batch_size - held, len(images))
            xs.append(images[:take])
            ys.append(labels[:take])
            held += take
            images, labels = images[take:], labels[take:]
            if held == batch_size:
                yield _joined(xs), _joined(ys), start
                start += held
                xs, ys, held = [], [], 0
    if held:
        yield _joined(xs), _joined(ys), start


def _uses_labels(target) -> bool:
    """Whether ``target`` reads the data's labels (else they are not even parsed)."""
    return isinstance(target, str) and target in ("auto", "label")


def _check_presence(labels, index, first, target):
    """Refuse a dataset where some elements have a label and others not (for ``target='auto'`` the
    choice between labels and predicted classes would change from batch to batch), and, for
    ``target='label'``, any element without one. ``first``: ``(has a label, dataset index)`` of the
    first element, or ``None`` before it. Returns ``first``."""
    has = labels >= 0
    if first is None:
        first = (bool(has[0]), index)
    if target == "label" and not first[0]:
        raise InvalidInputError(f"target='label' needs (image, label) elements; dataset element {first[1]} has no "
                                "label (images alone, or an array of them, have none). Use target='predicted' or a "
                                "class index.")
    odd = np.flatnonzero(has != first[0])
    if odd.size:
        i = index + int(odd[0])
        if target == "label":
            raise InvalidInputError(f"target='label' needs (image, label) elements; dataset element {i} has no "
                                    "label. Give every element a label, or use target='predicted' or a class index.")
        have, lack = (first[1], i) if first[0] else (i, first[1])
        raise InvalidInputError(
            f"dataset element {lack} has no label but element {have} has one: with target='auto' either every "
            "element has a label (each is explained for its label) or none has (each is explained for its "
            "predicted class). Give every element a label, or pass target='predicted' (labels are then not read).")
    return first


def _joined(parts):
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _blocks(data, shape, batch_size, classes=None):
    """Checked ``(images, class_labels)`` blocks in stream order: one per batched element, and runs of
    up to ``batch_size`` consecutive single images stacked into one. ``classes``: ``(number of
    classes, model name)`` to read and check the labels against, or ``None`` to ignore labels."""
    rank, index = len(shape), 0
    if isinstance(data, np.ndarray):
        _check_block(data, shape, 0)
        yield data, np.full(len(data), -1)
        return
    try:
        import tensorflow as tf

        if isinstance(data, tf.data.Dataset):
            data = data.as_numpy_iterator()
    except ImportError:  # pragma: no cover
        pass
    images, labels = [], []
    for element in data:
        if type(element) is tuple and len(element) == 2:  # the common case first: (image, label)
            image, label = element
        elif isinstance(element, dict):
            image, label = _from_dict(element)
        elif isinstance(element, (tuple, list)):
            if len(element) != 2:
                raise InvalidInputError(f"dataset elements must be images or (image, label) pairs, got a "
                                        f"{type(element).__name__} of length {len(element)}.")
            image, label = element
        else:
            image, label = element, None
        if type(image) is not np.ndarray:
            image = np.asarray(image)
        if image.ndim == rank:  # a single image: collected, checked with its run
            images.append(image)
            labels.append(label)
            if len(images) == batch_size:
                yield _single_block(images, labels, shape, index, classes)
                index += len(images)
                images, labels = [], []
            continue
        if images:
            yield _single_block(images, labels, shape, index, classes)
            index += len(images)
            images, labels = [], []
        block = image if image.ndim == rank + 1 else image[None]  # a wrong rank is named by the check
        _check_block(block, shape, index)
        y = (np.full(len(block), -1) if label is None or classes is None
             else _class_labels(label, len(block), index, classes))
        yield block, y
        index += len(block)
    if images:
        yield _single_block(images, labels, shape, index, classes)


def _single_block(images, labels, shape, index, classes=None):
    """Stack and check a run of single images (dataset indices from ``index``) with their labels, in
    one vectorised pass; when that fails, check them one by one so the error names the element."""
    n = len(images)
    try:
        block = np.stack(images)
        same_dtype = all(im.dtype == block.dtype for im in images)
    except ValueError:  # different shapes: found and named below
        block, same_dtype = None, False
    if same_dtype:
        _check_block(block, shape, index)
    else:
        for i, im in enumerate(images):
            _check_block(im[None], shape, index + i)
        block = np.stack(images)
    if classes is None or all(label is None for label in labels):
        return block, np.full(n, -1)
    if not any(label is None for label in labels):
        try:
            return block, _class_labels(np.asarray(labels), n, index, classes)
        except (InvalidInputError, ValueError):
            pass  # named below, element by element
    ys = [np.full(1, -1) if label is None else _class_labels(label, 1, index + i, classes)
          for i, label in enumerate(labels)]
    return block, np.concatenate(ys)


def _from_dict(element):
    """``(image, label or None)`` of a dict element, by the usual key names."""
    image_key = next((k for k in IMAGE_KEYS if k in element), None)
    if image_key is None:
        raise InvalidInputError(f"dataset element is a dict with keys {sorted(element)}; lrp_grad reads the image "
                                f"from one of {list(IMAGE_KEYS)} (and the label from one of {list(LABEL_KEYS)}). "
                                "Map the dataset to (image, label) pairs, e.g. ds.map(lambda d: (d['img'], d['lbl'])).")
    label_key = next((k for k in LABEL_KEYS if k in element), None)
    return element[image_key], None if label_key is None else element[label_key]


def _class_labels(label, count, index, classes):
    """Class indices of ``count`` images (dataset indices from ``index``) from their label entry:
    integers (or whole floats) in ``0..n-1``, or one-hot rows of length ``n`` (their argmax), where
    ``classes = (n, model name)`` (``n`` ``None``: not checked). A model with one output unit (a
    binary ``Dense(1, "sigmoid")`` classifier) takes labels 0 and 1, and its unit (index 0) is the
    target of both: the logit's relevance, positive for evidence of class 1. Anything else is an
    error naming the element and what a label must be."""
    n, model = classes
    valid = "" if n is None else f" in 0..{n - 1}"
    a = np.asarray(label)
    if a.ndim >= 1 and a.shape[-1] > 1 and a.size == count * a.shape[-1]:  # one-hot (or soft) rows
        rows = a.reshape(count, -1)
        numeric = a.dtype == bool or np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
        bad = (np.ones(count, bool) if not numeric
               else ~(np.all((rows == 0) | (rows == 1), axis=1) & (rows.sum(1) == 1)))
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise InvalidInputError(
                f"dataset element {index + r}: label of shape {a.shape} is neither class indices nor one-hot rows "
                f"(row {np.array2string(rows[r], threshold=12)} is not exactly one 1 and zeros elsewhere); pass "
                "integer class indices (for soft or smoothed labels: labels.argmax(-1)).")
        if n is not None and rows.shape[1] != n:
            raise InvalidInputError(
                f"dataset element {index}: one-hot labels of length {rows.shape[1]}, but model {model!r} has {n} "
                f"classes; pass one-hot rows of length {n} or integer class indices{valid}.")
        return rows.argmax(1)
    a = a.reshape(-1)
    if a.size != count:
        raise InvalidInputError(f"dataset element {index}: {a.size} label(s) for {count} image(s).")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InvalidInputError(f"dataset element {index}: labels must be integer class indices{valid} (or one-hot "
                                f"rows), got {a[:4]} (dtype {a.dtype}).")
    if np.issubdtype(a.dtype, np.floating):
        whole = np.isfinite(a) & (a == np.round(a))
        if not whole.all():
            i = int(np.flatnonzero(~whole)[0])
            raise InvalidInputError(
                f"dataset element {index + i}: labels must be integer class indices{valid}, got {a[i]} (dtype "
                f"{a.dtype}); float labels are read only when they are whole numbers. Pass integer labels or "
                "one-hot rows.")
    if n == 1:  # one output unit (Dense(1, "sigmoid")): 0/1 labels are binary, the unit is the target
        out = (a != 0) & (a != 1)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise InvalidInputError(
                f"dataset element {index + i}: label {a[i]} for model {model!r}, which has one output unit (a binary "
                "classifier): labels must be 0 or 1 (the unit is explained for both). Fix or drop such elements, or "
                "use target='predicted' (labels are then not read).")
        return np.zeros(count, np.int64)
    if n is not None:
        out = (a < 0) | (a >= n)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise InvalidInputError(
                f"dataset element {index + i}: label {int(a[i])} is out of range for model {model!r} with {n} "
                f"classes (valid: 0..{n - 1}). Fix or drop such elements (e.g. a -1 'no label' marker: "
                "ds.filter(lambda x, y: y >= 0)), or explain the predicted classes with target='predicted' (labels "
                "are then not read).")
    return a.astype(np.int64)


def _check_block(images, shape, index):
    """Validate a block of images (dataset indices from ``index``) in one vectorised pass."""
    if images.ndim != len(shape) + 1 or not all(d is None or d == s for d, s in zip(shape, images.shape[1:])):
        raise InvalidInputError(f"dataset element {index} has shape {images.shape[1:]}; the model takes {shape}.")
    if images.dtype == bool or not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise InvalidInputError(f"dataset element {index} has dtype {images.dtype}; images must hold real numbers.")
    if np.issubdtype(images.dtype, np.floating):
        finite = np.isfinite(images)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            raise InvalidInputError(f"dataset element {index + int(bad[0])} contains NaN or Inf (first at "
                                    f"{tuple(int(i) for i in bad[1:])}); relevance of non-finite inputs is undefined. "
                                    "Clean the data first.")


def _targets(target, labels, n):
    if isinstance(target, str) and target == "auto":
        return None if np.any(labels < 0) else labels.astype(np.int32)
    if isinstance(target, str) and target == "label":
        if np.any(labels < 0):
            raise InvalidInputError("target='label' needs (image, label) elements; this data has no labels. Use "
                                    "target='predicted' or a class index.")
        return labels.astype(np.int32)
    if target is None or (isinstance(target, str) and target == "predicted"):
        return None
    if isinstance(target, (int, np.integer)):
        return np.full(n, int(target), np.int32)
    raise InvalidInputError(f"target must be 'auto', 'label', 'predicted', None or an int class index, got {target!r}.")
