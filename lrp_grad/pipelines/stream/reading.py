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
            spec = spec[0] if isinstance(spec, (tuple, list)) else spec
            n = int(data.cardinality())
            if spec.shape.rank != input_rank or n < 0:  # batched elements: cardinality counts batches
                return None
            return n
    except ImportError:  # pragma: no cover
        pass
    return len(data) if hasattr(data, "__len__") else None


def _batches(data, explainer, batch_size):
    """Regroup the stream into ``(x, labels, first_index)`` batches of ``batch_size``; checks every element.

    Batched elements (and whole arrays) are checked and sliced as blocks; single images are
    collected as they come and checked, stacked and labelled once per batch (vectorised): no
    per-image numpy work, only the unpacking of each element.
    """
    shape = tuple(explainer.input_shape)
    xs, ys, held, start = [], [], 0, 0
    for images, labels in _blocks(data, shape, batch_size):
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


def _joined(parts):
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _blocks(data, shape, batch_size):
    """Checked ``(images, class_labels)`` blocks in stream order: one per batched element, and runs of
    up to ``batch_size`` consecutive single images stacked into one."""
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
                yield _single_block(images, labels, shape, index)
                index += len(images)
                images, labels = [], []
            continue
        if images:
            yield _single_block(images, labels, shape, index)
            index += len(images)
            images, labels = [], []
        block = image if image.ndim == rank + 1 else image[None]  # a wrong rank is named by the check
        y = np.full(len(block), -1) if label is None else _class_labels(label, len(block), index)
        _check_block(block, shape, index)
        yield block, y
        index += len(block)
    if images:
        yield _single_block(images, labels, shape, index)


def _single_block(images, labels, shape, index):
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
    if all(label is None for label in labels):
        return block, np.full(n, -1)
    if not any(label is None for label in labels):
        try:
            return block, _class_labels(np.asarray(labels), n, index)
        except (InvalidInputError, ValueError):
            pass  # named below, element by element
    ys = [np.full(1, -1) if label is None else _class_labels(label, 1, index + i) for i, label in enumerate(labels)]
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


def _class_labels(label, count, index):
    """Class indices from a label entry: ints, or one-hot rows (argmax), for ``count`` images."""
    a = np.asarray(label)
    if a.ndim >= 1 and a.shape[-1] > 1 and a.size == count * a.shape[-1]:  # one-hot (or soft) rows
        rows = a.reshape(count, -1)
        if not np.all((rows == 0) | (rows == 1)) or not np.all(rows.sum(1) == 1):
            raise InvalidInputError(f"dataset element {index}: label of shape {a.shape} is neither class indices "
                                    "nor one-hot rows (exactly one 1 per row); pass integer class labels.")
        return rows.argmax(1)
    a = a.reshape(-1)
    if a.size != count:
        raise InvalidInputError(f"dataset element {index}: {a.size} label(s) for {count} image(s).")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or
                               (np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a)))):
        raise InvalidInputError(f"dataset element {index}: labels must be integer class indices, got {a[:4]} "
                                f"(dtype {a.dtype}).")
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
