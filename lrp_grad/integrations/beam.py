"""Apache Beam: LRP relevance maps of a whole ``PCollection`` with ``RunInference``.

>>> import apache_beam as beam                                                   # doctest: +SKIP
>>> from apache_beam.ml.inference.base import RunInference                       # doctest: +SKIP
>>> from lrp_grad.beam import LRPModelHandler                                    # doctest: +SKIP
>>> results = images | RunInference(LRPModelHandler("model.keras", rule="epsilon_plus_flat"))  # doctest: +SKIP

Every element gives one ``PredictionResult(example, inference, model_id)`` whose ``inference`` is
``{"relevance": array shaped like the image, "logits": (classes,) array, "target": int}``. Keyed
elements ``(key, image)`` go through Beam's ``KeyedModelHandler(LRPModelHandler(...))``.

Needs the optional dependency Apache Beam: ``pip install "lrp-grad[beam]"``.
"""
from __future__ import annotations

import os
import sys
import threading

try:
    import apache_beam  # noqa: F401  (the package itself first: a missing install fails here)
    from apache_beam.metrics import Metrics
    from apache_beam.ml.inference import base as _beam_base
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult
except ImportError as _e:  # pragma: no cover - exercised by tests/test_beam.py with a blocked import
    raise ImportError(
        'lrp_grad.beam needs Apache Beam, which is an optional dependency: pip install "lrp-grad[beam]" '
        f'(or pip install "apache-beam>=2.60"). The import failed with: {_e}'
    ) from None

import numpy as np

from ..errors import InvalidInputError, InvalidRuleError, InvalidTargetError, ModelFileError, UnsupportedModelError

__all__ = ["LRPModelHandler", "METRICS_NAMESPACE", "WriteNpyShards", "read_npy_shards"]

#: Namespace of the Beam metrics of :class:`LRPModelHandler` (RunInference's own ones included).
METRICS_NAMESPACE = "BeamML_LRP"

_MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
_TARGET_CHOICES = "None or 'predicted' (the predicted class), 'label' (elements are (image, label) pairs) or an int class index"


def _is_uri(path: str) -> bool:
    """Whether ``path`` names a file of a Beam filesystem other than the local one (gs://, s3://, ...)."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme != "file"


def _positive_int(name: str, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"LRPModelHandler({name}={value!r}): {name} must be a positive int or None.")
    return int(value)


def _check_uri(model_uri) -> str:
    if not isinstance(model_uri, (str, os.PathLike)):
        raise ModelFileError(f"LRPModelHandler(model_uri={model_uri!r}): model_uri must be the path or URI (str) "
                             f"of a .keras or .h5 model file, got a {type(model_uri).__name__}.")
    uri = os.fspath(model_uri)
    if _is_uri(uri):
        if not uri.lower().endswith(_MODEL_SUFFIXES):
            raise ModelFileError(f"LRPModelHandler(model_uri={uri!r}): a remote model must be one .keras or .h5 "
                                 "file (SavedModel folders are read from local paths only).")
        return uri
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    if not os.path.exists(local):
        raise ModelFileError(f"LRPModelHandler(model_uri={uri!r}): no such file or folder. Give the path of a "
                             ".keras or .h5 file (or a SavedModel folder), or the URI of one on a filesystem the "
                             "workers can read (gs://..., s3://...).")
    if not os.path.isdir(local) and not local.lower().endswith(_MODEL_SUFFIXES):
        raise ModelFileError(f"LRPModelHandler(model_uri={uri!r}): unknown model file type "
                             f"{os.path.splitext(local)[1]!r}; lrp_grad loads .keras and .h5 files and SavedModel "
                             "folders.")
    return uri

def _check_rule(rule):
    from ..core.presets import as_composite

    if rule is None:
        return None
    try:
        as_composite(rule)
    except InvalidRuleError as e:
        raise InvalidRuleError(f"LRPModelHandler(rule={rule!r}): {e}") from None
    return rule

def _check_target_choice(target):
    if target is None or (isinstance(target, str) and target in ("predicted", "label")):
        return None if target == "predicted" else target
    if isinstance(target, (int, np.integer)) and not isinstance(target, (bool, np.bool_)):
        if target < 0:
            raise InvalidTargetError(f"LRPModelHandler(target={target!r}): a class index must be >= 0.")
        return int(target)
    raise InvalidTargetError(f"LRPModelHandler(target={target!r}): target must be {_TARGET_CHOICES}.")

def _check_image(image, shape, shown, ex, where):
    try:
        a = np.asarray(image)
    except (ValueError, TypeError) as e:
        raise InvalidInputError(f"{where()}: the image could not be converted to an array ({e}).") from None
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InvalidInputError(f"{where()} has dtype {a.dtype} ({_describe(image)}); images must hold real numbers "
                                f"(float or integer pixels), shape {shown}.")
    if a.ndim != len(shape) or not all(d is None or d == s for d, s in zip(shape, a.shape)):
        hint = ""
        if a.ndim == len(shape) + 1 and a.shape[0] == 1 and all(d is None or d == s for d, s in zip(shape, a.shape[1:])):
            hint = " Each element is one image without a batch axis (RunInference batches them): drop it, image[0]."
        elif a.ndim == len(shape) + 1:
            hint = (" Each element is one image (RunInference batches them); split a batch into its images first, "
                    "e.g. beam.FlatMap(list).")
        elif shape and shape[-1] == 1 and a.ndim == len(shape) - 1 and all(
                d is None or d == s for d, s in zip(shape[:-1], a.shape)):
            hint = " Add the channel axis: image[..., None]."
        raise InvalidInputError(f"{where()} has shape {a.shape}; model {ex.model.name!r} takes images of shape "
                                f"{shown}.{hint}")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        bad = tuple(int(v) for v in np.argwhere(~np.isfinite(a))[0])
        raise InvalidInputError(f"{where()} contains NaN or Inf (first at {bad}: {a[bad]}); relevance of non-finite "
                                "inputs is undefined. Clean the data first.")
    return a

def _check_label(label, ex, where):
    a = np.asarray(label)
    n = ex.n_classes
    if a.ndim == 1 and a.shape[0] == n and n > 1 and np.issubdtype(a.dtype, np.number):  # a one-hot row
        if not (np.all((a == 0) | (a == 1)) and a.sum() == 1):
            raise InvalidInputError(f"{where()} has label {a.tolist()}: a label of length {n} must be a one-hot row "
                                    "(exactly one 1); or give the class index.")
        return int(a.argmax())
    if (a.ndim != 0 or a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or (
            np.issubdtype(a.dtype, np.floating) and np.isfinite(a) and float(a) == round(float(a))))):
        raise InvalidInputError(f"{where()} has label {label!r} ({_describe(label)}); a label must be a class index "
                                f"(an int, 0..{n - 1}) or a one-hot row of length {n}.")
    value = int(a)
    if not 0 <= value < n:
        raise InvalidInputError(f"{where()} has label {value}, out of range for model {ex.model.name!r} with {n} "
                                f"classes (valid: 0..{n - 1}).")
    return value


class LRPModelHandler(ModelHandler):
    """A Beam ``ModelHandler`` that explains a Keras classifier with LRP inside ``RunInference``.

    Parameters
    ----------
    model_uri : str or path
        The model: a ``.keras`` or ``.h5`` file of Keras 3 or tf-keras (loaded with
        :func:`lrp_grad.load_model`), a local SavedModel folder, or the URI of a ``.keras``/``.h5``
        file on a filesystem Beam can read (``gs://``, ``s3://``, ``hdfs://``, ...), which each
        worker copies to a temporary local file before loading. A local path must exist when the
        handler is built; on a remote runner it must also exist on the workers (use a URI there).
    rule : Rule, Composite or str, optional
        As :class:`lrp_grad.Explainer` (a rule, a composite or a preset name such as
        ``"epsilon_plus_flat"``); default ``AlphaBeta(2, 1)``. Checked here, at construction.
    target : None, 'predicted', 'label' or int
        What to explain. ``None`` / ``'predicted'``: each image's predicted class. An int: that
        class for every image (checked against the model's classes when it is loaded).
        ``'label'``: every element is an ``(image, label)`` pair (a tuple or list of two), and the
        label, a class index (any integer type, or an integral float) or a one-hot row, is the
        explained class. The ``PredictionResult.example`` is the element as given (the pair).
    jit_compile : bool or None
        As :class:`lrp_grad.Explainer` (``None``: XLA on GPU/TPU only).
    min_batch_size, max_batch_size : int, optional
        Bounds of the batches Beam's ``BatchElements`` forms (returned by
        :meth:`batch_elements_kwargs`); Beam's defaults (1 and 10000, adaptive) otherwise. A batch
        larger than :meth:`lrp_grad.Explainer.auto_batch_size` (from the free memory) is explained in
        chunks of that size.
    max_batch_duration_secs : int, optional
        Streaming pipelines: the longest a batch is buffered (Beam's ``BatchElements``).
    env_vars : dict of str, optional
        Environment variables set on each worker before the model is loaded (e.g.
        ``{"TF_CPP_MIN_LOG_LEVEL": "2"}``).

    Notes
    -----
    The model is loaded and the :class:`~lrp_grad.Explainer` built once per worker *process*, in
    :meth:`load_model`, and shared by the threads of that process (Beam's ``shared.Shared``); the
    compiled pass has a free batch axis, so batches of any size (in particular the same sizes
    again) are not traced again (on CPU; with XLA, one program per power-of-two bucket). The handler
    does not share one model across processes (:meth:`share_model_across_processes` is ``False``,
    so Beam's ``model_copies``/``large_model`` do not apply): LRP is compute-bound and a shared copy
    would run every process's batches in one server process, sending images and relevance maps
    through pickling; a classifier is small enough to be loaded by every process.

    Errors name the element and the fix: an element of the wrong shape, dtype, with NaN/Inf or a
    bad label fails the pipeline with an :class:`~lrp_grad.InvalidInputError` naming its key
    (under ``KeyedModelHandler``) or its index in the batch, and the expected vs. given value.
    Bad arguments are refused here, at construction, naming the argument and the value.

    Beam metrics (namespace :data:`METRICS_NAMESPACE`): RunInference's own (``num_inferences``,
    ``inference_request_batch_size``, ``load_model_latency_milli_secs``, ...) and
    ``lrp_traces`` (how many times a compiled pass was traced; one per worker process and input
    sign pattern when nothing retraces) and ``lrp_explainers`` (explainers that ran a batch: one
    per worker process).
    """

    def __init__(self, model_uri, rule=None, *, target=None, jit_compile: bool | None = None,
                 min_batch_size: int | None = None, max_batch_size: int | None = None,
                 max_batch_duration_secs: int | None = None, env_vars: dict | None = None):
        self._model_uri = _check_uri(model_uri)
        self._rule = _check_rule(rule)
        self._target = _check_target_choice(target)
        if jit_compile not in (None, True, False):
            raise ValueError(f"LRPModelHandler(jit_compile={jit_compile!r}): jit_compile must be True, False or None.")
        self._jit_compile = jit_compile
        min_batch_size = _positive_int("min_batch_size", min_batch_size)
        max_batch_size = _positive_int("max_batch_size", max_batch_size)
        if min_batch_size is not None and max_batch_size is not None and min_batch_size > max_batch_size:
            raise ValueError(f"LRPModelHandler(min_batch_size={min_batch_size}, max_batch_size={max_batch_size}): "
                             "min_batch_size must not exceed max_batch_size.")
        max_batch_duration_secs = _positive_int("max_batch_duration_secs", max_batch_duration_secs)
        if env_vars is not None and (not isinstance(env_vars, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items())):
            raise ValueError(f"LRPModelHandler(env_vars={env_vars!r}): env_vars must be a dict of str to str.")
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                         max_batch_duration_secs=max_batch_duration_secs, env_vars=dict(env_vars or {}))

    # ---------------------------------------------------------------------------------------------
    # Construction-time checks


    def __repr__(self):
        target = "'predicted'" if self._target is None else repr(self._target)
        return f"LRPModelHandler({self._model_uri!r}, rule={self._rule!r}, target={target})"

    # ---------------------------------------------------------------------------------------------
    # ModelHandler

    def load_model(self):
        """Load the model and build the :class:`~lrp_grad.Explainer` (once per worker process)."""
        from ..api.explainer import Explainer
        from ..frontends import load_model

        local = self._local_model_path()
        try:
            model = load_model(local)
        finally:
            if _is_uri(self._model_uri):  # the worker's temporary copy: the model is in memory now
                import shutil

                shutil.rmtree(os.path.dirname(local), ignore_errors=True)
        ex = Explainer(model, rule=self._rule, jit_compile=self._jit_compile)
        if ex.n_inputs != 1 or not ex.is_classifier:
            raise UnsupportedModelError(
                f"LRPModelHandler explains single-input classifiers with output (batch, classes); model "
                f"{model.name!r} from {self._model_uri!r} has {ex.n_inputs} input(s) and output shape "
                f"{(None,) + ex.output_shape}. Use lrp_grad.Explainer in a beam.DoFn for other models.")
        if isinstance(self._target, int) and self._target >= ex.n_classes:
            raise InvalidTargetError(f"LRPModelHandler(target={self._target}): model {model.name!r} from "
                                     f"{self._model_uri!r} has {ex.n_classes} classes (valid: 0..{ex.n_classes - 1}).")
        return ex

    def _local_model_path(self) -> str:
        uri = self._model_uri
        if not _is_uri(uri):
            return uri[len("file://"):] if uri.startswith("file://") else uri
        import shutil
        import tempfile

        from apache_beam.io.filesystems import FileSystems

        local = os.path.join(tempfile.mkdtemp(prefix="lrp_grad_model_"), os.path.basename(uri.rstrip("/")))
        try:
            with FileSystems.open(uri) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except Exception as e:  # noqa: BLE001 - every filesystem fails in its own way
            raise ModelFileError(f"cannot read model {uri!r} on this worker ({type(e).__name__}: {e}); check the URI "
                                 "and that the workers may read it.") from None
        return local

    def run_inference(self, batch, model, inference_args=None):
        """Relevance, logits and target of every element of ``batch`` (one ``PredictionResult`` each)."""
        self.validate_inference_args(inference_args)
        caller = sys._getframe(1)  # KeyedModelHandler's frame, to name keys in errors
        try:
            x, targets = self._checked_batch(batch, model, caller)
        finally:
            del caller
        # The threads of a worker share one Explainer: its first batch (which traces the pass) runs
        # alone, so that concurrent first batches do not trace it twice. (Attributes of the
        # Explainer, never of the model.)
        with _LOCK:
            first = not getattr(model, "_lrp_beam_ready", False)
            if first:
                R, logits = _explain(model, x, targets)
                model._lrp_beam_ready = True
                Metrics.counter(METRICS_NAMESPACE, "lrp_explainers").inc()
        if not first:
            R, logits = _explain(model, x, targets)
        with _LOCK:
            traced = model.trace_count - getattr(model, "_lrp_beam_traces", 0)
            model._lrp_beam_traces = model.trace_count
        if traced:
            Metrics.counter(METRICS_NAMESPACE, "lrp_traces").inc(traced)
        chosen = logits.argmax(1) if targets is None else targets
        return [PredictionResult(element, {"relevance": R[i], "logits": logits[i], "target": int(chosen[i])},
                                 model_id=self._model_uri)
                for i, element in enumerate(batch)]

    def get_num_bytes(self, batch) -> int:
        """Bytes of the images (and labels) of ``batch``, without pickling it."""
        total = 0
        for element in batch:
            parts = element if isinstance(element, (tuple, list)) and self._target == "label" else (element,)
            for part in parts:
                total += np.asarray(part).nbytes if not isinstance(part, (int, float)) else 8
        return total

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def validate_inference_args(self, inference_args):
        if inference_args:
            raise ValueError(f"LRPModelHandler takes no inference_args (got {sorted(inference_args)}); set rule= and "
                             "target= on the handler: LRPModelHandler(model_uri, rule=..., target=...).")

    def share_model_across_processes(self) -> bool:
        """``False``: every worker process loads its own model (see the class notes)."""
        return False

    # ---------------------------------------------------------------------------------------------
    # Element checks

    def _checked_batch(self, batch, ex, caller):
        """``(x, targets or None)`` of a batch; every element checked, errors naming it."""
        shape = tuple(ex.input_shape)
        shown = "(" + ", ".join("any" if d is None else str(d) for d in shape) + ")"
        images, labels = [], []
        for i, element in enumerate(batch):
            where = lambda i=i: _element_name(batch, i, caller)  # noqa: E731 (only built on errors)
            image, label = self._split(element, where)
            images.append(_check_image(image, shape, shown, ex, where))
            if label is not None:
                labels.append(_check_label(label, ex, where))
        first = images[0].shape
        for i, image in enumerate(images):
            if image.shape != first:
                raise InvalidInputError(
                    f"{_element_name(batch, i, caller)} has shape {image.shape} but {_element_name(batch, 0, caller)} "
                    f"of the same batch has {first}; a batch needs images of one shape (resize them first, or pass "
                    "max_batch_size=1 for a model with free spatial axes).")
        x = np.stack(images).astype(ex.dtype, copy=False)
        if self._target == "label":
            return x, np.asarray(labels, np.int32)
        if isinstance(self._target, int):
            return x, np.full(len(x), self._target, np.int32)
        return x, None

    def _split(self, element, where):
        if self._target == "label":
            if not isinstance(element, (tuple, list)) or len(element) != 2:
                raise InvalidInputError(
                    f"{where()} is {_describe(element)}; with target='label' every element must be an (image, label) "
                    "pair. Pair the images with their labels, or use target=None (the predicted class) or an int.")
            return element[0], element[1]
        if isinstance(element, tuple):
            raise InvalidInputError(
                f"{where()} is a tuple of {len(element)} items, but with target={self._target!r} every element "
                "must be one image. For "
                "(image, label) pairs pass target='label'; for keyed elements (key, image) wrap the handler: "
                "KeyedModelHandler(LRPModelHandler(...)).")
        if isinstance(element, dict):
            raise InvalidInputError(
                f"{where()} is a dict with keys {sorted(map(str, element))}; give images (or (image, label) pairs "
                "with target='label'), e.g. beam.Map(lambda d: (d['image'], d['label'])) before RunInference.")
        return element, None


_LOCK = threading.Lock()


def _explain(ex, x, targets):
    """``(relevance, logits)`` of a checked batch, in chunks of at most ``ex.auto_batch_size()``."""
    (R,), logits, _ = ex.explain_checked([x], targets, "logit", False, None)
    return R, logits


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _element_name(batch, index: int, caller) -> str:
    """``'element with key K'`` under Beam's KeyedModelHandler (read from its frame, which holds the
    keys of exactly this batch), else ``'element i of a batch of n'``."""
    key = _key_of(batch, index, caller)
    if key is not _NO_KEY:
        return f"element with key {key!r}"
    return (f"element {index} of a batch of {len(batch)} (wrap the handler in KeyedModelHandler to have errors "
            "name your keys)")


_NO_KEY = object()


def _key_of(batch, index, caller):
    """The key of ``batch[index]`` if ``caller`` is a keyed Beam handler that passed exactly ``batch``."""
    codes = {getattr(_beam_base, name).run_inference.__code__
             for name in ("KeyedModelHandler", "MaybeKeyedModelHandler") if hasattr(_beam_base, name)}
    if caller is None or caller.f_code not in codes:
        return _NO_KEY
    local = caller.f_locals
    if local.get("unkeyed_batch") is batch and len(local.get("keys", ())) == len(batch):
        return local["keys"][index]  # one model: keys, unkeyed_batch = zip(*batch)
    if local.get("unkeyed_batches") is batch and "key" in local:
        return local["key"]  # several models: one call per key
    return _NO_KEY


# ---------------------------------------------------------------------------------------------
# A sink for arrays


def WriteNpyShards(folder, prefix: str = "relevance"):  # noqa: N802 - a PTransform, named like one
    """A Beam transform writing records (tuples of numpy arrays) to ``folder/<prefix>-*.npys``.

    Each record's arrays are appended to the worker's shard with ``numpy.save`` (no pickling), one
    after the other; :func:`read_npy_shards` reads them back. Map the ``PredictionResult`` s to the
    arrays to keep first, e.g. ``| beam.Map(lambda r: (r.example[0], r.inference["relevance"]))``.
    """
    from apache_beam.io import fileio

    class _NpySink(fileio.FileSink):
        def open(self, fh):
            self._fh = fh

        def write(self, record):
            for a in record:
                np.save(self._fh, np.asarray(a), allow_pickle=False)

        def flush(self):
            self._fh.flush()

    return fileio.WriteToFiles(str(folder), file_naming=fileio.default_file_naming(prefix, ".npys"),
                               sink=lambda destination: _NpySink())


def read_npy_shards(folder, arrays_per_record: int, prefix: str = "relevance") -> list:
    """The records :func:`WriteNpyShards` wrote into ``folder``: a list of tuples of arrays (shard by
    shard; order within a shard as written). Raises ``OutputError`` without shards or for a shard
    that ends inside a record (a truncated file)."""
    import glob

    from ..pipelines.stream import OutputError

    files = sorted(glob.glob(os.path.join(os.fspath(folder), f"{prefix}*.npys")))
    if not files:
        raise OutputError(f"no {prefix}*.npys shards in {os.fspath(folder)!r}.")
    out = []
    for name in files:
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            while f.tell() < size:
                try:
                    out.append(tuple(np.load(f, allow_pickle=False) for _ in range(arrays_per_record)))
                except (ValueError, EOFError, OSError) as e:
                    raise OutputError(f"shard {name!r} is damaged or truncated at byte {f.tell()} ({e}); run the "
                                      "pipeline again.") from None
    return out

