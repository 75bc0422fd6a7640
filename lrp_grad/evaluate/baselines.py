"""Gradient-based attributions to compare LRP against, computed in batches (issue 22).

Every function explains the *logit* of ``target`` (``None``: the class the model predicts on
``x``); for a model ending in softmax or sigmoid the logits are the input of that final activation,
like :func:`~lrp_grad.evaluate.region_perturbation` with ``output="logit"``. The model inputs of a
method (the images themselves, the points of the integration path, the noisy copies) are stacked
and differentiated ``batch_size`` rows at a time: one GradientTape pass per batch, never one per
image. Results are float64 arrays shaped like ``x``.

Definitions:

* ``gradient``: ``d logit_t / dx``.
* ``gradient_x_input``: ``x * d logit_t / dx``.
* ``integrated_gradients``: ``(x - b) * sum_k w_k grad(b + a_k (x - b))`` with ``a_k = k / steps``,
  ``k = 0..steps`` and trapezoidal weights (``w_0 = w_steps = 1 / (2 steps)``, else ``1 / steps``):
  ``steps + 1`` gradients per image. Exact for a linear model; on a smooth model the error of the
  completeness sum ``sum(IG) - (f(x) - f(b))`` shrinks like ``1 / steps**2``.
* ``smoothgrad``: the mean gradient at ``x + noise_s``, ``s = 1..samples``, Gaussian noise of
  standard deviation ``noise * (max(x_i) - min(x_i))`` (the image's own range); image ``i`` always
  draws from ``np.random.default_rng([seed, i])``, so the result does not depend on ``batch_size``.
"""
from __future__ import annotations

import numbers

import numpy as np

from ..errors import InvalidInputError, InvalidTargetError, UnsupportedModelError
from .common import _broadcast_finite, _has_probability_output
from .region import _check_images, _check_target, _positive_int

__all__ = ["gradient", "gradient_x_input", "integrated_gradients", "smoothgrad", "logit_function"]

_DEFAULT_BATCH = 256


def logit_function(model):
    """A TensorFlow-differentiable ``f(x) -> logits``: the model itself, or for a functional model
    ending in softmax/sigmoid (a ``Softmax`` layer, or a layer with that activation) the model up to
    the input of that activation. The model is never modified."""
    return _logit_parts(model)[0]


def _logit_parts(model, called=None):
    """``(f, sync)``: :func:`logit_function`'s ``f`` and ``sync()``, which copies the model's last
    layer's current weights into the linear copy of it that ``f`` ends in (a no-op when there is none).
    ``called``: what ``f`` calls when it is the model itself (default ``model``; a weak proxy of it
    for a cached ``f``). Otherwise ``f`` holds the model's layers, not the model."""
    if not _has_probability_output(model):
        called = model if called is None else called
        return (lambda x: called(x, training=False)), _no_sync
    last = model.layers[-1]
    try:
        import importlib

        from ..frontends import package_of

        K = importlib.import_module(package_of(model))
        body = K.Model(model.inputs[0], last.input) if _is_functional(model) else None
    except Exception:  # noqa: BLE001 - any failure means: cannot read the logits this way
        body = None
    if body is None:
        raise UnsupportedModelError(
            f"model {model.name!r} ends in softmax/sigmoid but its logits cannot be read (it is not a functional or "
            "Sequential model whose last layer can be cut); pass a model that outputs logits.")
    from ..frontends import is_layer

    if is_layer(last, "Softmax") or is_layer(last, "Activation"):
        return (lambda x: body(x, training=False)), _no_sync
    config = dict(last.get_config(), activation="linear")
    head = type(last).from_config(config)
    head.build(last.input.shape)
    head.set_weights(last.get_weights())
    return (lambda x: head(body(x, training=False))), (lambda: head.set_weights(last.get_weights()))


def _no_sync():
    pass


def _is_functional(model) -> bool:
    return hasattr(model, "inputs") and model.inputs is not None and len(model.inputs) == 1


class _GradientPass:
    """``d logit[r, t_r] / dx`` of a model compiled once per image shape, cached per model (weakly,
    see :mod:`lrp_grad.evaluate.forward`), so that the batches of a stream (and repeated calls) do
    not trace again. ``traces`` counts the traces."""

    def __init__(self, model, dtype):
        import weakref

        try:
            proxy = weakref.proxy(model)
        except TypeError:
            proxy = model
        self.fn, self.sync = _logit_parts(model, proxy)
        self.dtype = dtype
        self.xla = False
        self.functions = {}
        self.traces = 0

    def _grad(self, v, tt):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(v)
            logits = self.fn(v)
        self.traces += 1
        return tape.gradient(logits, v, output_gradients=tf.one_hot(tt, logits.shape[-1], dtype=logits.dtype))

    def function(self, shape):
        import tensorflow as tf

        key = (tuple(shape), self.xla)
        if key not in self.functions:
            spec = [tf.TensorSpec((None,) + tuple(shape), self.dtype), tf.TensorSpec((None,), tf.int64)]
            fn = tf.function(self._grad, input_signature=spec, jit_compile=True if self.xla else None, autograph=False)
            self.functions[key] = fn.get_concrete_function()
        return self.functions[key]

    def __call__(self, v, tt):
        import tensorflow as tf

        try:
            return self.function(v.shape[1:])(v, tt)
        except tf.errors.InvalidArgumentError as e:
            # No CPU kernel for the gradient of a grouped convolution (ConvNeXt, RegNet); XLA has one.
            if self.xla or "grouped convolutions are not supported" not in str(e):
                raise
            self.xla = True
            return self.function(v.shape[1:])(v, tt)


def _gradient_pass(model, dtype) -> _GradientPass:
    from .forward import _cached

    return _cached(model, ("gradient", dtype.name), lambda: _GradientPass(model, dtype))


def _gradients(grads: _GradientPass, x: np.ndarray, t: np.ndarray, batch_size: int) -> np.ndarray:
    """``d logit[r, t_r] / dx`` of every row ``r`` of ``x``, ``batch_size`` rows per tape pass."""
    import tensorflow as tf

    out = np.empty(x.shape, np.float64)
    for first in range(0, len(x), batch_size):
        v = tf.constant(x[first:first + batch_size], grads.dtype)
        tt = tf.constant(t[first:first + batch_size], tf.int64)
        out[first:first + len(v)] = grads(v, tt).numpy()
    return out


def _prepare(model, x, target, batch_size, where):
    """Checked images (float), the compiled gradient pass, targets ``(n,)``, the batch size and the logits."""
    import tensorflow as tf

    x = _check_images(x, where)
    batch_size = _positive_int(batch_size, "batch_size", where, allow_none=True) or _DEFAULT_BATCH
    target = _check_target(target, len(x), where)
    dtype = model.inputs[0].dtype if getattr(model, "inputs", None) else tf.float32
    dtype = tf.as_dtype(dtype) if tf.as_dtype(dtype).is_floating else tf.float32
    grads = _gradient_pass(model, dtype)
    grads.sync()  # the last layer's current weights, when the logits end in a copy of it
    fn = grads.fn
    logits = np.concatenate([np.asarray(fn(tf.constant(x[i:i + batch_size], dtype)), np.float64)
                             for i in range(0, len(x), batch_size)]) if len(x) else np.zeros((0, 1))
    if logits.ndim != 2:
        raise InvalidInputError(f"{where} needs a classifier with output shape (n, classes); this model returns "
                                f"shape {logits.shape}.")
    if target is None:
        target = logits.argmax(1)
    elif len(target) and target.max() >= logits.shape[1]:
        bad = int(np.argmax(target >= logits.shape[1]))
        raise InvalidTargetError(f"{where}: target[{bad}] = {int(target[bad])} but the model has {logits.shape[1]} "
                                 f"outputs; pass class indices 0..{logits.shape[1] - 1}.")
    return x, grads, target.astype(np.int64), batch_size, logits


def gradient(model, x, target=None, *, batch_size: int | None = None) -> np.ndarray:
    """``d logit_target / dx`` per image, shaped like ``x`` (float64). ``batch_size`` images per pass
    (default 256)."""
    x, compiled, t, batch_size, _ = _prepare(model, x, target, batch_size, "gradient")
    return _gradients(compiled, x, t, batch_size)


def gradient_x_input(model, x, target=None, *, batch_size: int | None = None) -> np.ndarray:
    """``x * d logit_target / dx`` per image, shaped like ``x`` (float64)."""
    x, compiled, t, batch_size, _ = _prepare(model, x, target, batch_size, "gradient_x_input")
    return _gradients(compiled, x, t, batch_size) * x


def _baseline_array(baseline, x: np.ndarray, where: str) -> np.ndarray:
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        if not np.isfinite(baseline):
            raise ValueError(f"{where}: baseline={baseline!r} is not finite; pass a finite number or an array.")
        return np.full(x.shape, float(baseline))
    if isinstance(baseline, (bool, str)) or baseline is None:
        raise ValueError(f"{where}: baseline={baseline!r} is not understood; pass a number (e.g. 0.0) or an array "
                         f"broadcastable to x's shape {x.shape} (one image {x.shape[1:]} or one per image).")
    b = np.asarray(baseline, np.float64)
    return _broadcast_finite(b, x.shape, f"{where}: baseline has shape {b.shape}, which does not broadcast to x's "
                             f"shape {x.shape}; pass one image {x.shape[1:]} or one per image {x.shape}.",
                             f"{where}: baseline has NaN or infinite values.")


def integrated_gradients(model, x, target=None, *, steps: int = 32, baseline=0.0,
                         batch_size: int | None = None) -> np.ndarray:
    """Integrated gradients along the straight path from ``baseline`` to ``x`` (trapezoidal rule).

    Parameters
    ----------
    steps : int
        Intervals of the path; ``steps + 1`` gradients per image.
    baseline : float or array
        A number (every pixel), or an array broadcastable to ``x`` (one image, or one per image).
    batch_size : int or None
        Model inputs (path points of possibly several images) per gradient pass (default 256).

    Returns float64 ``(x - baseline) * average gradient``, shaped like ``x``; its sum over an image
    approximates ``logit_t(x) - logit_t(baseline)`` (exactly for a linear model).
    """
    where = "integrated_gradients"
    x, compiled, t, batch_size, _ = _prepare(model, x, target, batch_size, where)
    steps = _positive_int(steps, "steps", where)
    b = _baseline_array(baseline, x, where)
    alphas = np.arange(steps + 1) / steps
    weights = np.full(steps + 1, 1.0 / steps)
    weights[[0, -1]] /= 2
    n = len(x)
    # Rows ordered image-major: image i's path points are rows i*(steps+1) .. i*(steps+1)+steps.
    path = b[:, None] + alphas[None, :, None, None, None] * (x - b)[:, None]
    grads = _gradients(compiled, path.reshape((-1,) + x.shape[1:]).astype(x.dtype), np.repeat(t, steps + 1),
                       batch_size).reshape(path.shape)
    return (x - b) * np.einsum("k,nk...->n...", weights, grads) if n else np.zeros(x.shape)


def smoothgrad(model, x, target=None, *, samples: int = 16, noise: float = 0.15, seed: int = 0,
               batch_size: int | None = None, times_input: bool = False) -> np.ndarray:
    """SmoothGrad: the gradient averaged over ``samples`` noisy copies of each image.

    Parameters
    ----------
    samples : int
        Noisy copies per image.
    noise : float
        Standard deviation of the Gaussian noise as a fraction of the image's range
        ``max(x_i) - min(x_i)`` (``0``: the plain gradient).
    seed : int
        Image ``i`` draws its noise from ``np.random.default_rng([seed, i])``.
    batch_size : int or None
        Model inputs (noisy copies) per gradient pass (default 256).
    times_input : bool
        Multiply the averaged gradient by ``x`` (SmoothGrad x input).
    """
    where = "smoothgrad"
    x, compiled, t, batch_size, _ = _prepare(model, x, target, batch_size, where)
    samples = _positive_int(samples, "samples", where)
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not np.isfinite(noise) or noise < 0:
        raise ValueError(f"{where}: noise must be a number >= 0 (a fraction of the image's value range, e.g. 0.15), "
                         f"got {noise!r}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{where}: seed must be an integer >= 0, got {seed!r}.")
    if not isinstance(times_input, bool):
        raise ValueError(f"{where}: times_input must be True or False, got {times_input!r}.")
    noisy = np.empty((len(x), samples) + x.shape[1:], np.float64)
    for i in range(len(x)):
        sigma = float(noise) * float(x[i].max() - x[i].min())
        noisy[i] = x[i] + np.random.default_rng([int(seed), i]).normal(0.0, 1.0, noisy.shape[1:]) * sigma
    grads = _gradients(compiled, noisy.reshape((-1,) + x.shape[1:]).astype(x.dtype), np.repeat(t, samples),
                       batch_size).reshape(noisy.shape)
    mean = grads.mean(1)
    return mean * x if times_input else mean
