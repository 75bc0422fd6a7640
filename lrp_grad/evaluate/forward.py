"""The compiled forward pass that region perturbation calls once per step and batch.

An evaluation of ``steps`` regions runs the model ``2 * steps + 1`` times per batch (SRG), so what
a call costs beyond the model's own arithmetic is paid a hundred times over. An eager Keras call
dispatches op by op and cost two to four times a compiled call on the small models of
``benchmarks/evaluation_cost.py``; so the forward pass runs as a ``tf.function`` whose batch axis
is unknown: one trace per image shape and dtype, shared by every batch size (the last, smaller
batch of an array and every batch of a stream reuse it).

The compiled functions are cached per model, held weakly by it (the traced functions reach the
model only through a weak proxy), so repeated evaluations of one model trace once and a deleted
model takes its functions along. They read the model's variables on every call, so changed
weights are seen; a model whose layers were changed in place (a layer's ``activation``
reassigned) needs a new model, as for :func:`lrp_grad.explain`. The user's model is only called,
never changed. :mod:`lrp_grad.evaluate.baselines` keeps its compiled input-gradient pass in the
same cache.

Anything that is not a Keras model (a callable ``model(x, training=False)``), or a Keras 3 model on
another backend than TensorFlow, is called eagerly.
"""
from __future__ import annotations

import threading
import weakref

import numpy as np

__all__ = ["compiled_call", "compiled_logits"]

#: model -> {"call" | "logits": CompiledForward}; held weakly by the model.
_CACHE = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class CompiledForward:
    """``f(x) -> numpy`` array of ``call(tensor)``, traced once per image shape and dtype.

    ``traces`` counts the traces (the Python function runs only while tracing). The
    gradient-registry entries a trace registers (the rewritten model's custom gradients; see
    :func:`lrp_grad.api.passes._custom_gradient_names`) are dropped when this object is collected.
    """

    def __init__(self, call, prepare=None):
        from ..api.passes import _forget_gradients

        self._call = call
        self._prepare = prepare
        self._functions = {}
        self.traces = 0
        self._gradient_names = set()
        weakref.finalize(self, _forget_gradients, self._gradient_names)

    def _traced(self, v):
        import tensorflow as tf

        from ..api.passes import _custom_gradient_names

        out = self._call(v)
        self.traces += 1
        self._gradient_names |= _custom_gradient_names(tf.compat.v1.get_default_graph())
        return out

    def function(self, shape, dtype):
        """The traced function for images of ``shape`` (without the batch axis) and ``dtype``.

        The concrete function itself is kept and called: it skips the argument binding and trace
        lookup a ``tf.function`` call does (~0.15 ms a call here), which the one signature makes
        unnecessary."""
        import tensorflow as tf

        key = (tuple(shape), np.dtype(dtype).str)
        fn = self._functions.get(key)
        if fn is None:
            spec = tf.TensorSpec((None,) + tuple(shape), tf.as_dtype(np.dtype(dtype)))
            # autograph=False: a model call has no tensor-dependent Python control flow to convert.
            traced = tf.function(self._traced, input_signature=[spec], autograph=False)
            fn = self._functions[key] = traced.get_concrete_function()
        return fn

    def __call__(self, x):
        x = np.asarray(x) if self._prepare is None else self._prepare(x)
        return self.function(x.shape[1:], x.dtype)(x).numpy()


def _cached(model, kind, build):
    with _LOCK:
        try:
            per_model = _CACHE.setdefault(model, {})
        except TypeError:  # not weak-referenceable or not hashable: build per evaluation
            return build()
        if kind not in per_model:
            per_model[kind] = build()
        return per_model[kind]


def _compilable(model) -> bool:
    """A tf-keras model, or a Keras 3 model on the TensorFlow backend (on another backend its call
    cannot be traced by TensorFlow, so it runs eagerly as before)."""
    from ..frontends import is_model, keras3, package_of

    if not is_model(model):
        return False
    return package_of(model) != "keras" or keras3._backend_problem() is None


def compiled_call(model):
    """``f(x) -> numpy``: ``model(x, training=False)``, compiled for a Keras model (cached per model),
    eager for any other callable."""
    if not _compilable(model):
        return lambda x: np.asarray(model(x, training=False))

    def build():
        try:
            proxy = weakref.proxy(model)
        except TypeError:
            proxy = model
        return CompiledForward(lambda v: proxy(v, training=False))

    return _cached(model, "call", build)


class _Logits(CompiledForward):
    """The logits of a model ending in softmax/sigmoid: lrp_grad's rewritten model (which skips the
    final softmax or sigmoid), read through the Explainer that :func:`lrp_grad.explain` caches for
    the model with the default options, compiled without the relevance pass.

    Inputs are cast and checked as :meth:`Explainer.forward` does. A plan that became stale (a
    BatchNorm folded through a max pooling whose scales changed sign since) is built again, once,
    as :func:`lrp_grad.explain` does."""

    def __init__(self, model):
        self._model = weakref.ref(model) if _weakrefable(model) else (lambda: model)
        super().__init__(self._rewritten, self._inputs)
        self._explainer = None
        self._build()

    def _build(self):
        from ..api.cache import _cached_explainer
        from ..api.passes import _forget_gradients

        self._explainer, self._shared = _cached_explainer(self._model(), None, None, None, None)
        self._functions = {}
        _forget_gradients(self._gradient_names)  # of the dropped traces

    def _inputs(self, x):
        return self._explainer.signature.inputs(x)[0][0]

    def _rewritten(self, v):
        from ..core import planner

        out, _ = planner.run(self._explainer.passes.signed_plan, [v])
        return out

    def __call__(self, x):
        import tensorflow as tf

        from ..api.cache import _evict
        from ..api.passes import raise_if_stale
        from ..errors import StaleExplainerError

        try:
            try:
                return super().__call__(x)
            except tf.errors.InvalidArgumentError as e:
                raise_if_stale(e)
                raise
        except StaleExplainerError:
            model = self._model()
            if not self._shared or model is None:
                raise
            _evict(model, self._explainer)
            self._build()
            return super().__call__(x)


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def compiled_logits(model):
    """``f(x) -> numpy`` logits of a Keras model ending in softmax/sigmoid (cached per model); raises
    :class:`~lrp_grad.errors.UnsupportedLayerError` when lrp_grad cannot rewrite the model."""
    return _cached(model, "logits", lambda: _Logits(model))
