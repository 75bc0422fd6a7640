"""Looking inside a layer's ``call`` when it reads the batch size.

The front ends explain a layer without a handler by running its ``call`` on symbolic inputs
(:func:`lrp_grad.frontends.keras3.functionalize`). Symbolic inputs have an unknown batch size, and
many layers of the model zoos read it: ``ops.tile(class_token, (ops.shape(x)[0], 1, 1))``, a
window partition ``reshape(x, (B * nW, ws, ws, C))``. On an unknown size that arithmetic fails.

Such a layer is traced twice, at two small batch sizes (:data:`SIZES`), and the two traces are
compared call by call. They must have the same calls; every setting or constant operand that
differs must be the batch size times a whole number ``m`` in both (a shape entry ``m * B``, a
constant repeated ``m * B`` times along one axis). The first trace is kept, with those entries
turned back into the run's batch size (read from an input of the operation when it runs) and the
sizes in its tensor shapes back to ``None``. Anything else that depends on the batch size
(``B // 2``, a branch on ``B``) is refused by name.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import tensorflow as tf

from .graph import RawOp

__all__ = ["SIZES", "BatchLinkError", "batch_sizes", "unknown_size", "unlink_shape", "linked_op", "linked_constant",
           "compare_kwargs"]

#: The two batch sizes a batch-reading layer is traced at (small: constants such as a class token
#: repeated per image are materialised at these sizes).
SIZES = (3, 5)


class BatchLinkError(ValueError):
    """The two traces differ in a way that is not the batch size times a whole number."""


def batch_sizes(shapes, size):
    """``shapes`` (``tf.TensorShape`` per input) with an unknown batch axis set to ``size``."""
    out = []
    for s in shapes:
        dims = list(s.as_list()) if s.rank else []
        if dims and dims[0] is None:
            dims[0] = size
        out.append(tf.TensorShape(dims))
    return out


def unknown_size(constants, is_graph_tensor) -> bool:
    """Whether an operation's settings hold an unknown size: a shape such as ``(None, -1, 12, 64)``
    recorded from ``ops.shape(x)[0]`` on a symbolic tensor, which cannot be replayed."""
    if is_graph_tensor(constants):
        return False
    if isinstance(constants, (list, tuple)):
        if any(v is None for v in constants) and any(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                     for v in constants):
            return True
        return any(unknown_size(v, is_graph_tensor) for v in constants)
    if isinstance(constants, dict):
        return any(unknown_size(v, is_graph_tensor) for v in constants.values())
    return False


def _multiple(a, b):
    """``m`` when ``a = m * SIZES[0]`` and ``b = m * SIZES[1]`` (``m >= 1``), else ``None``."""
    s1, s2 = SIZES
    if isinstance(a, int) and isinstance(b, int) and a > 0 and a % s1 == 0 and b % s2 == 0 and a // s1 == b // s2:
        return a // s1
    return None


def unlink_shape(s1, s2, what):
    """The shape of a tensor from its two traces: sizes that scale with the batch become ``None``."""
    if s1.rank != s2.rank:
        raise BatchLinkError(f"{what} has rank {s1.rank} at one batch size and {s2.rank} at another")
    if s1.rank is None:
        return s1
    dims = []
    for a, b in zip(s1.as_list(), s2.as_list()):
        if a == b:
            dims.append(a)
        elif _multiple(a, b):
            dims.append(None)
        else:
            raise BatchLinkError(f"{what} has shape {tuple(s1.as_list())} at batch size {SIZES[0]} and "
                                 f"{tuple(s2.as_list())} at batch size {SIZES[1]}")
    return tf.TensorShape(dims)


def _batch_axis(s1, s2):
    """``(axis, m)`` of the first axis whose size is ``m`` times the batch size in both traces."""
    if s1.rank is None or s1.rank != s2.rank:
        return None
    for axis, (a, b) in enumerate(zip(s1.as_list(), s2.as_list())):
        m = _multiple(a, b)
        if m:
            return axis, m
    return None


def _array(v):
    if isinstance(v, np.ndarray):
        return v
    if isinstance(v, (tf.Tensor, tf.Variable)) and hasattr(v, "numpy"):
        try:
            return v.numpy()
        except Exception:  # noqa: BLE001 - a symbolic value: not a constant
            return None
    return None


def _differences(x, y, is_graph_tensor, path=()):
    """The entries where two traces' settings differ: ``[(path, ('int', m) | ('tile', axis, m, block))]``."""
    if x is y or (is_graph_tensor(x) and is_graph_tensor(y)):
        return []
    if isinstance(x, bool) or isinstance(y, bool) or x is None or y is None or isinstance(x, (str, float)):
        if x == y and type(x) is type(y):
            return []
        raise BatchLinkError(f"setting {x!r} at batch size {SIZES[0]} is {y!r} at batch size {SIZES[1]}")
    if isinstance(x, (int, np.integer)) and isinstance(y, (int, np.integer)):
        if x == y:
            return []
        m = _multiple(int(x), int(y))
        if m is None:
            raise BatchLinkError(f"a size {int(x)} at batch size {SIZES[0]} is {int(y)} at batch size {SIZES[1]}, "
                                 "not a whole multiple of the batch size")
        return [(path, ("int", m))]
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        if len(x) != len(y):
            raise BatchLinkError(f"a list of {len(x)} entries at batch size {SIZES[0]} has {len(y)} at batch size "
                                 f"{SIZES[1]}")
        return [d for i, (a, b) in enumerate(zip(x, y)) for d in _differences(a, b, is_graph_tensor, path + (i,))]
    if isinstance(x, dict) and isinstance(y, dict):
        if set(x) != set(y):
            raise BatchLinkError("its settings have different keys at two batch sizes")
        return [d for k in x for d in _differences(x[k], y[k], is_graph_tensor, path + (k,))]
    a, b = _array(x), _array(y)
    if a is not None and b is not None:
        if a.shape == b.shape:
            if a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
                return []
            raise BatchLinkError(f"a constant of shape {a.shape} has other values at another batch size")
        found = _batch_axis(tf.TensorShape(a.shape), tf.TensorShape(b.shape))
        if found is None or unlink_shape(tf.TensorShape(a.shape), tf.TensorShape(b.shape), "a constant").as_list().count(None) != 1:
            raise BatchLinkError(f"a constant of shape {a.shape} at batch size {SIZES[0]} has shape {b.shape} at "
                                 f"batch size {SIZES[1]}")
        axis, m = found
        block = np.take(a, range(m), axis=axis)
        reps = [1] * a.ndim
        reps[axis] = SIZES[0]
        if not np.array_equal(np.tile(block, reps), a, equal_nan=a.dtype.kind in "fc"):
            raise BatchLinkError(f"a constant of shape {a.shape} differs between the images of a batch")
        return [(path, ("tile", axis, m, block))]
    if type(x) is type(y):
        return []  # an object the operation holds (a dtype policy): not a batch-dependent value
    raise BatchLinkError(f"setting {type(x).__name__} at batch size {SIZES[0]} is {type(y).__name__} at batch size "
                         f"{SIZES[1]}")


def _put(structure, path, value):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(structure, dict):
        return {**structure, head: _put(structure[head], rest, value)}
    items = list(structure)
    items[head] = _put(items[head], rest, value)
    return tuple(items) if isinstance(structure, tuple) else items


def _get(structure, path):
    for p in path:
        structure = structure[p]
    return structure


def linked_op(op1: RawOp, op2: RawOp, in1, in2, is_graph_tensor) -> RawOp:
    """The operation of the first trace, replaying with the run's batch size.

    ``in1``/``in2`` are its tensor operands' shapes in the two traces.
    """
    out_shape = unlink_shape(tf.TensorShape(op1.out_shape), tf.TensorShape(op2.out_shape), f"the output of {op1.symbol}")
    op = replace(op1, out_shape=tuple(out_shape.as_list()) if out_shape.rank is not None else None)
    if op1.rebind is None:
        if op1.constants is None and op2.constants is None:
            return op
        raise BatchLinkError(f"operation {op1.symbol} cannot be replayed at another batch size")
    subs = _differences(op1.constants, op2.constants, is_graph_tensor)
    if not subs:
        return op
    source = next(((i, found) for i, (a, b) in enumerate(zip(in1, in2)) if (found := _batch_axis(a, b))), None)
    if source is None:
        raise BatchLinkError(f"operation {op1.symbol} uses the batch size but none of its tensor operands has it")
    index, (axis, per) = source

    def transform(constants, tensors):
        batch = tf.shape(tensors[index])[axis] // per
        for path, sub in subs:
            if sub[0] == "int":
                value = sub[1] * batch
            else:
                _, ax, m, block = sub
                reps = [1] * block.ndim
                reps[ax] = batch
                old = _get(constants, path)
                value = tf.tile(tf.constant(block, dtype=getattr(old, "dtype", None)), reps)
            constants = _put(constants, path, value)
        return constants

    return replace(op, fn=op1.rebind(transform))


def linked_constant(c1, c2, ref1, ref2, is_graph_tensor):
    """``make(ref) -> tensor``: a constant operand of a call from its two traces (``c2`` is ``None``
    outside a two-size trace), repeated along the axis where it scales with the batch (a learned
    query tiled per image) as often as the run's batch size; ``ref1``/``ref2`` are the two traces'
    shapes of a tensor operand of the same call, whose dynamic shape gives that batch size."""
    array = _array(c1)
    const = np.asarray(c1 if array is None else array)
    subs = [] if c2 is None else _differences(c1, c2, is_graph_tensor)
    if not subs:
        return lambda ref: tf.constant(const)
    (_, (_, axis, m, block)), = subs
    source = _batch_axis(ref1, ref2)
    if source is None:
        raise BatchLinkError("a constant operand scales with the batch size but no tensor operand shows it")
    ref_axis, per = source

    def make(ref):
        reps = [1] * block.ndim
        reps[axis] = tf.shape(ref)[ref_axis] // per
        return tf.tile(tf.constant(block), reps)
    return make


def compare_kwargs(kw1, kw2, is_graph_tensor, what):
    """Refuse a layer called with settings that change with the batch size."""
    try:
        if _differences(dict(kw1 or {}), dict(kw2 or {}), is_graph_tensor):
            raise BatchLinkError("")
    except BatchLinkError:
        raise BatchLinkError(f"{what} is called with settings that change with the batch size") from None
