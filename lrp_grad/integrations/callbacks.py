"""Watch relevance while a model trains: a Keras callback writing LRP heatmaps to TensorBoard.

>>> cb = lrp_grad.callbacks.RelevanceCallback(x_val[:8], log_dir="logs/lrp")   # doctest: +SKIP
>>> model.fit(x, y, epochs=10, callbacks=[cb])                                # doctest: +SKIP

and then ``tensorboard --logdir logs`` (the ``tensorboard`` package is needed only to view).

One class serves both Keras packages: :class:`RelevanceCallback` is a ``keras.callbacks.Callback``
(Keras 3) and a ``tf_keras.callbacks.Callback`` at once, so ``model.fit`` of either accepts it;
the model it is given (``set_model``, called by ``fit``) decides nothing else. What it writes, after
every ``every``-th epoch, into event files in ``log_dir`` (TensorBoard's "Images" and "Scalars"
tabs):

``<name>/heatmaps`` (image)
    One image per logged epoch: the ``n`` inputs in a row with their heatmaps below, wrapped
    after ``ncols`` columns, with **one colour scale for all heatmaps** of that epoch (red =
    positive, blue = negative, white = 0 with ``scheme='lrp'``; see :mod:`lrp_grad.heatmap`), so
    maps can be compared within an epoch. Each epoch is scaled to its own ``max |R|``.
``<name>/image_<i>/logit``, ``.../relevance_sum``, ``.../conservation_gap``, ``.../target`` (scalars)
    Per image ``i``: the explained logit, the relevance summed over the image, the relative
    conservation gap ``|sum R - logit| / |logit|`` and the explained class (the predicted class
    unless ``target`` was given).

The step of every summary is Keras' 0-based epoch index, the step ``keras.callbacks.TensorBoard``
writes ``epoch_loss`` at: with ``every=2`` the summaries of epochs 2, 4, ... carry steps 1, 3, ...

Summaries are written with ``tf.summary.write`` in the format of TensorBoard's image and scalar
plugins, so no ``tensorboard`` package is needed to write them (only to view them). The callback
never changes the model (it only reads the current weights) and holds training up for one
explanation of ``x`` per logged epoch (the grid's PNG and the summaries are written by a background
thread while the next epoch trains; ``on_train_end`` waits for them): its
:class:`~lrp_grad.Explainer` is built once and its compiled pass traced once for
the whole training; it is rebuilt only for another model, a model whose layers changed (added,
removed, reconfigured, or an ``activation`` reassigned in place), or a
:class:`~lrp_grad.StaleExplainerError` (a BatchNorm folded through max pooling whose scales
changed sign).
"""
from __future__ import annotations

import numbers
import os
import pathlib

import numpy as np

from ..visual.colors import SCHEMES
from ..errors import InvalidInputError, InvalidTargetError, StaleExplainerError, UnsupportedModelError

__all__ = ["RelevanceCallback"]

#: Most images one callback explains and shows per epoch (one grid, four scalars per image).
MAX_IMAGES = 64


def _callback_bases() -> tuple:
    """The ``Callback`` classes of the available Keras packages (Keras 3 first, then tf-keras)."""
    from ..frontends import keras3, tf_keras

    bases = []
    if keras3.available:
        bases.append(keras3.keras.callbacks.Callback)
    bases.append(tf_keras.keras.callbacks.Callback)
    return tuple(bases)


def _summary_metadata(plugin: str):
    """SummaryMetadata naming a TensorBoard plugin (``'images'``, ``'scalars'``; version 0 content)."""
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = plugin
    return meta


def _check_x(x) -> np.ndarray:
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        x = x.numpy()
    try:
        a = np.array(x)  # a copy: later changes to the caller's array do not change what is logged
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"x could not be converted to an array: {e}") from None
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InvalidInputError(f"x has dtype {a.dtype}; it must be a batch of images of real numbers (float or "
                                "integer pixels).")
    if a.ndim not in (3, 4):
        raise InvalidInputError(f"x has shape {a.shape} (rank {a.ndim}); RelevanceCallback explains a batch of images "
                                "(n, H, W) or (n, H, W, C), e.g. x_val[:8]" +
                                (" (for one image pass x[None])" if a.ndim == 2 else "") + ".")
    if len(a) == 0:
        raise InvalidInputError(f"x is an empty batch (shape {a.shape}); pass at least one image, e.g. x_val[:8].")
    if len(a) > MAX_IMAGES:
        raise InvalidInputError(f"x has {len(a)} images; RelevanceCallback logs at most {MAX_IMAGES} per epoch (one "
                                f"grid, four scalars each): pass x[:{MAX_IMAGES}] or fewer, e.g. x_val[:8].")
    if not np.all(np.isfinite(a)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise InvalidInputError(f"x contains NaN or Inf (first at index {bad}); relevance of non-finite inputs is "
                                "undefined.")
    return a


def _check_target(target, n: int):
    if target is None:
        return None
    if hasattr(target, "numpy") and not isinstance(target, np.ndarray):
        target = target.numpy()
    t = np.asarray(target)
    if t.dtype == bool or not np.issubdtype(t.dtype, np.integer):
        raise InvalidTargetError(f"target must be None (the predicted class), an int class index or an int array "
                                 f"of shape (n,) = ({n},); got {target!r} with dtype {t.dtype}.")
    if t.ndim == 0:
        t = np.full((n,), int(t))
    elif t.shape != (n,):
        raise InvalidTargetError(f"target has shape {t.shape}; it must be an int or have shape (n,) = ({n},), one "
                                 "class index per image of x.")
    bad = np.flatnonzero(t < 0)
    if bad.size:
        raise InvalidTargetError(f"target[{int(bad[0])}] = {int(t[bad[0]])} is negative; class indices start at 0.")
    return t.astype(np.int32)


def _check_log_dir(log_dir) -> pathlib.Path:
    if isinstance(log_dir, bytes) or not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a folder path (str or os.PathLike), got {log_dir!r} "
                        f"({type(log_dir).__name__}).")
    if str(log_dir) == "":
        raise ValueError("log_dir is empty; pass the folder for the event files, e.g. log_dir='logs/lrp'.")
    path = pathlib.Path(log_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"log_dir {str(log_dir)!r} is a file, not a folder; TensorBoard event files need a folder "
                         "(pass another path).")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"log_dir {str(log_dir)!r} cannot be created: {str(parent)!r} is a file.")
            if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"log_dir {str(log_dir)!r} cannot be created: {str(parent)!r} is not writable.")
            break
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"log_dir {str(log_dir)!r} is not writable.")
    return path


def _positive_int(name: str, value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int ({what}), got {value!r}.")
    return int(value)


def _input_shape(model):
    """The model's input shapes without the batch axis (``None`` for unknown), or ``None`` when the
    model has no inputs yet (an unbuilt Sequential)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    return [tuple(None if d is None else int(d) for d in tuple(t.shape)[1:]) for t in inputs]


def _shown(shape) -> str:
    return "(batch, " + ", ".join("any" if d is None else str(d) for d in shape) + ")"


_BASES = _callback_bases()


class RelevanceCallback(*_BASES):
    """Log LRP heatmaps and relevance scalars of fixed images to TensorBoard while a model trains.

    Parameters
    ----------
    x : array_like
        The images to explain after each logged epoch, ``(n, H, W)`` or ``(n, H, W, C)`` shaped like
        the model's input, at most 64 (e.g. ``x_val[:8]``). Copied at construction.
    target : None, int or int array of shape (n,)
        The class to explain per image; default the class the model predicts at that epoch.
    rule : Rule, Composite or str, optional
        As for :class:`~lrp_grad.Explainer` (default ``AlphaBeta(2, 1)``).
    log_dir : str or os.PathLike
        Folder of the event files (created when first written); ``tensorboard --logdir`` it.
    every : int
        Log after every ``every``-th epoch (1-based: ``every=2`` logs after epochs 2, 4, ...).
    canonizers : sequence of Canonizer, optional
        As for :class:`~lrp_grad.Explainer`.
    scheme : {'lrp', 'seed'}
        Heatmap colours (:mod:`lrp_grad.heatmap`).
    name : str
        Prefix of the summary tags.
    ncols : int
        Images per row of the logged grid.
    zoom : int or None
        Enlarge every pixel of the grid to a ``zoom x zoom`` square; default: cells at least 96
        pixels wide.

    Attributes
    ----------
    explainer : Explainer or None
        The explainer in use (``None`` before training starts).
    builds : int
        How many explainers were built (1 for one model trained with any number of epochs).
    last : Explanation or None
        The explanation written last (images, relevance, targets, logits, report).
    written_steps : list of int
        The steps (epoch indices) written so far.
    """

    def __init__(self, x, target=None, *, rule=None, log_dir="logs/lrp", every: int = 1, canonizers=None,
                 scheme: str = "lrp", name: str = "relevance", ncols: int = 8, zoom: int | None = None):
        from ..core.canonizers import Canonizer
        from ..core.presets import as_composite
        from ..api.explainer import DEFAULT_RULE

        for base in _BASES:  # the Callback state of both packages (``model`` is this class's property)
            base.__init__(self)

        self.x = _check_x(x)
        self.target = _check_target(target, len(self.x))
        self.rule = as_composite(DEFAULT_RULE if rule is None else rule)
        if canonizers is not None:
            canonizers = tuple(canonizers)
            for c in canonizers:
                if not isinstance(c, Canonizer):
                    raise TypeError(f"canonizers must be lrp_grad.canonizers.Canonizer objects, got {c!r}.")
        self.canonizers = canonizers
        self.log_dir = _check_log_dir(log_dir)
        self.every = _positive_int("every", every, "log after every `every`-th epoch")
        if not isinstance(scheme, str) or scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(map(repr, SCHEMES))}, got {scheme!r}.")
        self.scheme = scheme
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name must be a non-empty str (the prefix of the summary tags), got {name!r}.")
        self.name = name.strip("/")
        self.ncols = _positive_int("ncols", ncols, "images per row of the grid")
        if zoom is None:
            zoom = max(1, -(-96 // self.x.shape[2]))
        self.zoom = _positive_int("zoom", zoom, "pixel size of the grid")
        self.explainer = None
        self.builds = 0
        self.last = None
        self.written_steps = []
        self._fingerprint = None
        self._writer = None

    @property
    def model(self):
        """The model being trained (``None`` before ``set_model``)."""
        return self._model

    @model.setter
    def model(self, model):
        self._model = model

    def __repr__(self):
        return (f"RelevanceCallback({len(self.x)} images {self.x.shape[1:]}, rule={self.rule.name}, "
                f"log_dir={str(self.log_dir)!r}, every={self.every})")

    # -------------------------------------------------------------------------------- Keras hooks

    def set_model(self, model):
        """Keep ``model`` and check ``x`` against its input (when the model is built)."""
        from ..frontends import package_of

        if package_of(model) is None:
            raise UnsupportedModelError(f"RelevanceCallback works with keras (Keras 3) and tf_keras models; got "
                                        f"{type(model).__name__} ({type(model).__module__}).")
        self._model = model
        self._check_against(_input_shape(model), model)

    def on_train_begin(self, logs=None):
        if _input_shape(self.model) is not None:  # an unbuilt Sequential is built by its first batch
            self._ensure_explainer()
        self._training = True

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        explanation = self.explain()  # needs this epoch's weights: before training goes on
        if getattr(self, "_training", False):
            # The grid, its PNG and the summaries are written by one background thread while the
            # next epoch trains: training waits for the explanation only.
            if getattr(self, "_pool", None) is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrp-grad-summaries")
                self._pending = []
            self._pending.append(self._pool.submit(self._write, explanation, int(epoch)))
        else:  # called by hand: written before returning
            self._write(explanation, int(epoch))

    def wait(self):
        """Block until every summary queued so far is written (``on_train_end`` does this); re-raise a
        writing error."""
        pending, self._pending = getattr(self, "_pending", []), []
        for future in pending:
            future.result()

    def on_train_end(self, logs=None):
        self._training = False
        try:
            self.wait()
        finally:
            if getattr(self, "_pool", None) is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    # -------------------------------------------------------------------------------- the work

    def _check_against(self, shapes, model):
        """``x`` against the model's input shapes (``None``: not known yet, checked at first use)."""
        if shapes is None:
            return
        if len(shapes) != 1:
            raise UnsupportedModelError(f"RelevanceCallback explains single-input image models; model {model.name!r} "
                                        f"has {len(shapes)} inputs.")
        want = shapes[0]
        got = self.x.shape[1:]
        if len(got) != len(want) or any(d is not None and d != s for d, s in zip(want, got)):
            hint = " (add the channel axis: x[..., None])" if got == tuple(want[:-1]) and want[-1] == 1 else ""
            raise InvalidInputError(f"x has shape {self.x.shape} but model {model.name!r} expects input "
                                    f"{_shown(want)}{hint}.")

    def _graph_fingerprint(self, model):
        """What the plan was built from: the model, its layers (nested ones too), the number of
        weights, and each layer's configuration and activation function (by identity: a layer's
        ``activation`` reassigned in place changes the explained computation, issue 21)."""
        def layer_key(layer):
            try:
                config = repr(layer.get_config())
            except Exception:  # noqa: BLE001 - a custom layer without get_config: its identity only
                config = None
            return id(layer), config, id(getattr(layer, "activation", None))

        flatten = getattr(model, "_flatten_layers", None)
        try:
            layers = list(flatten(include_self=False)) if callable(flatten) else list(model.layers)
        except TypeError:  # pragma: no cover - another signature
            layers = list(model.layers)
        return id(model), tuple(layer_key(layer) for layer in layers), len(model.weights)

    def _ensure_explainer(self):
        """The Explainer of the current model: built once, again only for another model or changed layers."""
        from ..api.explainer import Explainer

        model = self.model
        if model is None:
            raise RuntimeError("RelevanceCallback has no model: pass it to model.fit(..., callbacks=[...]) "
                               "(or call set_model(model) first).")
        fingerprint = self._graph_fingerprint(model)
        if self.explainer is None or fingerprint != self._fingerprint:
            self._check_against(_input_shape(model), model)
            ex = Explainer(model, rule=self.rule, canonizers=self.canonizers)
            if ex.n_inputs != 1 or not ex.is_classifier:
                raise UnsupportedModelError(
                    f"RelevanceCallback explains single-input classifiers with output (batch, classes); model "
                    f"{model.name!r} has {ex.n_inputs} input(s) and output shape {(None,) + ex.output_shape}.")
            self._check_against([ex.input_shape], model)
            if self.target is not None and np.any(self.target >= ex.n_classes):
                i = int(np.flatnonzero(self.target >= ex.n_classes)[0])
                raise InvalidTargetError(f"target[{i}] = {int(self.target[i])} is out of range for model "
                                         f"{model.name!r} with {ex.n_classes} classes (valid: 0..{ex.n_classes - 1}).")
            self.explainer, self._fingerprint = ex, fingerprint
            self.builds += 1
        return self.explainer

    def explain(self):
        """Explain ``x`` with the model as it is now (an :class:`~lrp_grad.Explanation`); what
        :meth:`on_epoch_end` logs."""
        ex = self._ensure_explainer()
        try:
            return ex.explain_images(self.x, self.target)
        except StaleExplainerError:
            self.explainer = None  # the plan cannot follow the new weights: plan again, once
            return self._ensure_explainer().explain_images(self.x, self.target)

    def _write(self, explanation, step: int):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        grid = explanation.grid_array(self.scheme, ncols=self.ncols, zoom=self.zoom)
        png = tf.image.encode_png(tf.constant(grid))
        image = tf.stack([tf.as_string(grid.shape[1]), tf.as_string(grid.shape[0]), png])  # width, height, PNGs
        scalars = {"logit": explanation.explained_logits, "relevance_sum": explanation.relevance_sums,
                   "conservation_gap": explanation.conservation_gaps, "target": explanation.targets}
        with self._writer.as_default(step=step):
            tf.summary.write(f"{self.name}/heatmaps", image, metadata=_summary_metadata("images"))
            scalar_meta = _summary_metadata("scalars")
            for i in range(len(explanation)):
                for key, values in scalars.items():
                    tf.summary.write(f"{self.name}/image_{i}/{key}", tf.constant(float(values[i]), tf.float32),
                                     metadata=scalar_meta)
        self._writer.flush()
        self.last = explanation
        self.written_steps.append(step)
        import threading

        self.writer_thread = threading.current_thread().name  # which thread wrote last (for tests)
