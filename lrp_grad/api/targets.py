"""Checks the targets, masks and initial relevance of a request against the explained output."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..errors import InvalidTargetError

__all__ = ["TargetChecks", "INITIAL_MODES"]

INITIAL_MODES = ("logit", "one")


class TargetChecks:
    """The target checks of :class:`~lrp_grad.api.request.Signature`, which mixes them in; they read
    its ``output_name``, ``output_shape``, ``n_classes``, ``is_classifier``, ``model_output``,
    ``model_name`` and ``dtype``."""

    def target(self, target, n: int):
        """``('index', (n,) int32)`` (``-1``: the predicted class) or ``('mask', array)``."""
        if target is None:
            if self.is_classifier:
                return "index", np.full((n,), -1, np.int32)  # -1: the predicted class, chosen in the graph
            if all(d == 1 for d in self.output_shape):  # one number per sample (e.g. a regression)
                return "mask", np.ones((1,) * (len(self.output_shape) + 1), self.dtype)
            raise InvalidTargetError(
                f"output {self.output_name!r} has shape {self.out_shown()}, which has no predicted class; pass "
                "target= a channel index (last axis, summed over the other axes) or a mask broadcastable to the "
                "output (the explained quantity is sum(output * mask) per sample).")
        t = np.asarray(target.numpy() if isinstance(target, tf.Tensor) else target)
        if (t.dtype == bool or np.issubdtype(t.dtype, np.floating)) and t.ndim > 0:
            return "mask", self.mask(t, n)
        if t.ndim == 0 and not np.issubdtype(t.dtype, np.integer) or t.dtype == bool:
            raise InvalidTargetError(
                f"target must be an int or an integer array of shape (n,) = ({n},), or a float/bool mask "
                f"shaped like the output {self.out_shown()}; got {target!r} with dtype {t.dtype}."
            )
        if not np.issubdtype(t.dtype, np.integer):
            raise InvalidTargetError(
                f"target must be an int, an integer array of shape (n,) = ({n},), or a float/bool mask "
                f"broadcastable to the output {self.out_shown()}; got {target!r} with dtype {t.dtype}."
            )
        if self.n_classes is None:
            raise InvalidTargetError(
                f"output {self.output_name!r} has shape {self.out_shown()} (one number per sample): it is "
                "explained without a target (or with a float mask); got an integer target.")
        if t.ndim == 0:
            t = np.full((n,), int(t))
        elif t.shape != (n,):
            raise InvalidTargetError(
                f"target has shape {t.shape} but must be an int or have shape (n,) = ({n},), one "
                "class index per sample (or, as floats, a mask broadcastable to the output "
                f"{self.out_shown()})."
            )
        bad = np.flatnonzero((t < 0) | (t >= self.n_classes))
        if bad.size:
            i = int(bad[0])
            units = ("classes" if self.is_classifier and self.model_output else
                     f"channels on the last axis of output {self.output_name!r}")
            binary = (" It has one output unit (a binary classifier): target 0 explains that unit for both "
                      "classes (positive relevance: evidence for class 1), e.g. target=np.zeros(n, int); "
                      "explain_dataset reads 0/1 labels that way." if self.n_classes == 1 else "")
            raise InvalidTargetError(
                f"target[{i}] = {int(t[i])} is out of range for model {self.model_name!r} with "
                f"{self.n_classes} {units} (valid: 0..{self.n_classes - 1}).{binary}"
            )
        return "index", t.astype(np.int32)

    def mask(self, m: np.ndarray, n: int) -> np.ndarray:
        """A mask as ``(n or 1, ...)`` of the output's rank + 1, checked against the output shape.

        Per sample: the output's rank + 1 with ``n`` (or 1) rows; shared: the output's rank. Axes
        of size 1 broadcast. A float vector of length ``n`` for a classifier is refused: it could
        be class indices stored as floats, or a mask over the classes."""
        rank = len(self.output_shape)
        shown = self.out_shown()
        if self.is_classifier and self.n_classes > 1 and m.ndim == 1 and m.dtype != bool and len(m) == n:
            raise InvalidTargetError(
                f"target is a float array of shape {m.shape}, which is ambiguous for a classifier: class indices "
                "must be integers (target.astype(int)); a mask over the classes shared by all samples needs a "
                f"batch axis, shape (1, {self.n_classes}).")
        if m.ndim == rank + 1:
            if m.shape[0] not in (n, 1):
                raise InvalidTargetError(
                    f"target mask has shape {m.shape}: a per-sample mask needs n = {n} rows (axis 0 is "
                    f"{m.shape[0]}); the output is {shown}.")
        elif m.ndim == rank:
            m = m[None]
        else:
            raise InvalidTargetError(
                f"target mask has shape {m.shape} (rank {m.ndim}) but output {self.output_name!r} is {shown}: "
                f"pass a per-sample mask (n, ...) of rank {rank + 1} or a shared mask of rank {rank} (axes of "
                "size 1 broadcast).")
        for axis, (size, out) in enumerate(zip(m.shape[1:], self.output_shape), start=1):
            if size != 1 and out is not None and size != out:
                raise InvalidTargetError(
                    f"target mask of shape {m.shape[1:]} per sample does not broadcast to output "
                    f"{self.output_name!r} of shape {shown}: axis {axis} is {size}, the output's is {out}.")
        m = m.astype(self.dtype)
        if not np.all(np.isfinite(m)):
            raise InvalidTargetError("target mask contains NaN or Inf.")
        return m

    def initial(self, initial, target, n: int):
        """``(mode, None)`` for a named mode or a callable, ``('array', r0)`` for explicit relevance."""
        full = (n,) + self.output_shape
        if isinstance(initial, str):
            if initial not in INITIAL_MODES:
                raise InvalidTargetError(
                    f"initial={initial!r} is not known; use 'logit' (the target logit, default), "
                    "'one' (1 at the target), a callable (logits, target) -> relevance, or an "
                    f"array of shape {'(n, classes)' if self.is_classifier else '(n, ...)'} = {full}."
                )
            return initial, None
        if callable(initial):
            return initial, None
        r0 = np.asarray(initial)
        if not (np.issubdtype(r0.dtype, np.floating) or np.issubdtype(r0.dtype, np.integer)) or r0.dtype == bool:
            raise InvalidTargetError(f"initial relevance array has dtype {r0.dtype}; it must be real numbers.")
        if r0.shape == self.output_shape:
            r0 = np.broadcast_to(r0, full)
        if r0.shape != full:
            if self.is_classifier:
                want = f"(n, classes) = {full} or (classes,) = ({self.n_classes},)"
            else:
                want = f"(n, ...) = {full} or the shape of one output, {self.output_shape}"
            raise InvalidTargetError(f"initial relevance array has shape {r0.shape}; it must be {want}.")
        if target is not None:
            raise InvalidTargetError(
                "pass either target= or an initial relevance array, not both: the array already "
                "says how much relevance starts at each class."
            )
        if not np.all(np.isfinite(r0)):
            raise InvalidTargetError("initial relevance array contains NaN or Inf.")
        return "array", r0.astype(self.dtype)

    def selection(self, target, initial, n: int):
        """``(mode, select, second)`` for the compiled pass from one target per sample and ``initial``."""
        mode, r0 = self.initial(initial, target, n)
        if r0 is not None:
            return mode, "array", r0
        select, second = self.target(target, n)
        if callable(mode) and select == "mask":
            raise InvalidTargetError("a callable initial= takes class/channel targets, not a mask; pass "
                                     "initial='logit' or 'one' with a mask.")
        return mode, select, second

    def per_class_targets(self, target, n):
        """``(n, k)`` class indices when several targets per image are asked for, else ``None``."""
        if isinstance(target, str):
            if target != "all":
                raise InvalidTargetError(f"target={target!r} is not known; use an int, an int array, or 'all'.")
            if self.n_classes is None:
                raise InvalidTargetError(f"target='all' needs an output with classes or channels; output "
                                         f"{self.output_name!r} has shape {self.out_shown()}.")
            return np.tile(np.arange(self.n_classes, dtype=np.int32), (n, 1))
        if target is None or isinstance(target, (int, np.integer)):
            return None
        t = np.asarray(target.numpy() if isinstance(target, tf.Tensor) else target)
        if t.ndim != 2 or not np.issubdtype(t.dtype, np.integer) or t.dtype == bool:
            return None
        if t.shape == (n, 1):
            raise InvalidTargetError(
                f"target has shape {t.shape}, which is ambiguous: for one class per image pass shape (n,) = "
                f"({n},) (e.g. target.ravel()); for several classes per image pass (n, k) with k >= 2, or "
                "call once per class."
            )
        if t.shape[0] != n:
            raise InvalidTargetError(
                f"target has shape {t.shape}; for several classes per image it must be (n, k) with n = {n}."
            )
        k = t.shape[1]
        if k == self.n_classes and np.all((t == 0) | (t == 1)):
            # An integer one-hot (or multi-hot) array, e.g. np.eye(classes, dtype=int)[y]: read as k
            # classes per image it would explain classes 0 and 1 over and over, and a float one-hot
            # is a mask: too close to be told apart, so neither reading is guessed.
            units = ("class", "classes") if self.is_classifier and self.model_output else (
                f"channel of output {self.output_name!r}", "channels")
            rows = "one-hot rows" if np.all(t.sum(1) == 1) else "rows of 0s and 1s"
            raise InvalidTargetError(
                f"target is an integer array of shape {t.shape} of {rows}, one column per {units[0]} ({k} "
                f"{units[1]}): it is ambiguous, as {k} class indices per image it would explain only classes 0 "
                f"and 1, {k} times. For one class per image pass the class indices, target.argmax(1) (shape ({n},)); "
                "for a mask over the classes pass target.astype(float); for every class pass target='all'.")
        self.target(t.reshape(-1), t.size)  # dtype and range, with the usual messages
        return t.astype(np.int32)
