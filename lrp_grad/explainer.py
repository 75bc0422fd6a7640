"""``explain()`` and the caching :class:`Explainer`: validation, targets, the compiled LRP pass."""
from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import tensorflow as tf

from . import handlers, rewrite
from .frontends import check_model
from .canonizers import Canonizer
from .composites import as_composite
from .errors import InvalidInputError, InvalidTargetError, LRPMemoryError, StaleExplainerError, UnsupportedModelError
from .rules import AlphaBeta

__all__ = ["Explainer", "explain", "RelevanceReport", "DEFAULT_RULE"]

#: The seed report's a/b rule with a = 2, b = 1.
DEFAULT_RULE = AlphaBeta(2.0, 1.0)

_INITIAL_MODES = ("logit", "one")


class RelevanceReport(Mapping):
    """Per-layer relevance sums of one explained batch (the seed report's checksum).

    A read-only mapping ``label -> array of shape (n,)``: the relevance summed over each sample
    at the model input (first key) and at the output of every layer call, in forward order. The
    last entry is the initial relevance at the model output. With a conserving rule (``Z`` or
    ``Epsilon`` with tiny epsilon, zero biases) all entries are equal.
    """

    def __init__(self, sums: dict):
        self._sums = dict(sums)

    def __getitem__(self, key):
        return self._sums[key]

    def __iter__(self):
        return iter(self._sums)

    def __len__(self):
        return len(self._sums)

    @property
    def output(self) -> np.ndarray:
        """The initial relevance sum per sample (the explained logit by default)."""
        return self._sums[list(self._sums)[-1]]

    def conservation_gap(self) -> dict:
        """``label -> max_n |sum R_layer - sum R_output| / max(|sum R_output|, tiny)``."""
        ref = self.output
        scale = np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
        return {k: float(np.max(np.abs(v - ref) / scale)) for k, v in self._sums.items()}

    def __str__(self):
        gaps = self.conservation_gap()
        width = max(len(k) for k in self._sums)
        rows = [f"{'layer'.ljust(width)}  {'mean sum R':>14}  {'max rel. gap':>12}"]
        for k, v in self._sums.items():
            rows.append(f"{k.ljust(width)}  {float(np.mean(v)):>14.6g}  {gaps[k]:>12.3g}")
        return "\n".join(rows)

    def __repr__(self):
        return f"RelevanceReport({len(self)} layers, n={len(self.output)})\n{self}"


#: Text of the in-graph check of a BatchNorm folded through a max pooling (canonizers).
_FOLD_MARK = "was folded through a max pooling"


def _first_line(message: str, mark: str) -> str:
    """Our own assertion text inside a TensorFlow error message (without TF's decoration)."""
    import re

    found = re.search(r"(BatchNormalization \\?'.*?Build a new Explainer\.)", message)
    if found:
        return found.group(1).replace("\\'", "'")
    for line in message.splitlines():
        if mark in line:
            return line.strip()
    return message.splitlines()[0]


#: Rows per call when several targets per image are explained (measured on the seed CNN: larger
#: batches of repeated images were slower than separate calls on this 2-core CPU).
_MULTI_TARGET_ROWS = 64


def _pad_to_bucket(a: np.ndarray) -> np.ndarray:
    """Pad the batch axis with zeros up to the next power of two.

    XLA compiles one program per input shape; bucketing bounds that to log2(max batch) programs
    instead of one per distinct batch size. Zero rows give finite relevance and are dropped.
    """
    n = len(a)
    size = 1 << max(n - 1, 0).bit_length()
    if size == n:
        return a
    return np.concatenate([a, np.zeros((size - n,) + a.shape[1:], a.dtype)])


def _free_memory_bytes() -> int:
    """Free memory for one explanation: the machine's available RAM (``/proc/meminfo``); on a
    GPU, whose free memory TensorFlow does not report on every build, or where RAM cannot be
    read, 4 GiB is assumed."""
    if tf.config.list_physical_devices("GPU"):
        return 4 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _default_jit() -> bool:
    """XLA only on accelerators: on CPU it made conv input-gradients ~3x slower (measured)."""
    return bool(tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"))


class Explainer:
    """Explains a tf-keras classifier with LRP; builds once and reuses the compiled pass.

    Parameters
    ----------
    model : tf_keras.Model
        Single-input, single-output Sequential or Functional classifier with output
        ``(batch, classes)``. A final softmax or sigmoid (layer, activation or operation) is skipped: the logits are
        explained. The model is never modified.
    rule : Rule, Composite or str, optional
        A rule for every rule-taking layer, a :class:`~lrp_grad.Composite`, or a preset name
        (see :mod:`lrp_grad.presets`); default ``AlphaBeta(2, 1)`` (the seed report's a/b rule).
    canonizers : sequence of Canonizer, optional
        Forward-preserving rewrites applied first; default folds BatchNorm into the preceding
        Dense/Conv layer (:class:`~lrp_grad.canonizers.FoldBatchNorm`). ``[]`` disables them.
    jit_compile : bool or None
        Compile with XLA. ``None`` chooses per device: off on CPU (measured slower there), on for
        GPU/TPU.
    strategy : tf.distribute.Strategy, optional
        Split every batch across the strategy's replicas (e.g. ``MirroredStrategy`` over several
        GPUs or logical CPU devices) and gather the results in order.
    compute_dtype : {None, 'bfloat16', 'float16'}
        Run the convolutions and matrix products (forward and transposed) in reduced precision
        for accelerators, on operands scaled to max |value| = 1 (no float16 overflow); divisions,
        stabilisers and products with the input stay in float32. Its error against float32 is
        measured in benchmarks/README.md.

    Examples
    --------
    >>> ex = lrp_grad.Explainer(model, rule=lrp_grad.Epsilon(1e-6))   # doctest: +SKIP
    >>> R = ex(x, target=y)                                           # doctest: +SKIP
    >>> R, report = ex(x, target=y, return_layers=True)               # doctest: +SKIP
    """

    def __init__(self, model, rule=None, *, canonizers=None, jit_compile: bool | None = None, strategy=None,
                 compute_dtype: str | None = None):
        rule = as_composite(DEFAULT_RULE if rule is None else rule)
        if jit_compile not in (None, True, False):
            raise ValueError(f"jit_compile must be True, False or None, got {jit_compile!r}.")
        if canonizers is not None:
            canonizers = tuple(canonizers)
            for c in canonizers:
                if not isinstance(c, Canonizer):
                    raise TypeError(f"canonizers must be lrp_grad.canonizers.Canonizer objects, got {c!r}.")
        if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
            raise TypeError(f"strategy must be a tf.distribute.Strategy (e.g. tf.distribute.MirroredStrategy()), "
                            f"got {strategy!r}.")
        if compute_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"compute_dtype must be None, 'bfloat16' or 'float16', got {compute_dtype!r}.")
        check_model(model)
        self.model = model
        self.strategy = strategy
        self.compute_dtype = compute_dtype
        self.rule = rule
        self.canonizers = canonizers
        self.jit_compile = _default_jit() if jit_compile is None else jit_compile
        # Plans for signed and for non-negative inputs; the first now so errors come early.
        self._plans = {False: rewrite.build_plan(model, rule, input_nonneg=False, canonizers=canonizers,
                                                 compute_dtype=compute_dtype)}
        graph = self._plans[False].graph
        if len(graph.output_shape) != 1 or graph.n_outputs is None:
            raise UnsupportedModelError(
                f"model {model.name!r} has output shape {(None,) + graph.output_shape}; lrp_grad explains "
                "classifiers whose output is (batch, classes)."
            )
        self.n_classes = graph.n_outputs
        self.input_shape = graph.input_shape
        # An integer input (e.g. uint8 pixels, then Rescaling) is explained in float32: relevance
        # is fractional, and casting float batches to the integer dtype would zero it. A
        # float16/bfloat16 input too: the rules' divisions need float32's range and precision.
        dtype = np.dtype(graph.dtype) if graph.dtype != "bfloat16" else None
        self.dtype = dtype if dtype in (np.dtype(np.float32), np.dtype(np.float64)) else np.dtype(np.float32)
        self._input_name = graph.input_name
        self._functions = {}
        #: How many times a compiled pass was traced (for retracing checks).
        self.trace_count = 0
        #: With XLA: the padded batch sizes compiled so far (powers of two; see _pad_to_bucket).
        self.compiled_batch_sizes = set()
        self._distributed = {}
        self._concrete = {}

    def __repr__(self):
        return f"Explainer(model={self.model.name!r}, rule={self.rule.name}, jit_compile={self.jit_compile})"

    @property
    def rules(self):
        """:class:`~lrp_grad.composites.RuleMap` layer -> rule (what will happen; printable)."""
        return self._plans[False].rules

    # -----------------------------------------------------------------------------------------
    # Validation

    def _check_x(self, x) -> np.ndarray:
        if isinstance(x, tf.Tensor):
            x = x.numpy()
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as e:
            raise InvalidInputError(f"x could not be converted to an array: {e}") from None
        if x.dtype == bool or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise InvalidInputError(
                f"x has dtype {x.dtype}; it must hold real numbers (float or integer images), "
                f"it is cast to the model's {self.dtype}."
            )
        want = (None,) + tuple(self.input_shape)
        shown = "(batch, " + ", ".join("any" if d is None else str(d) for d in self.input_shape) + ")"
        if x.ndim == len(want) - 1 and all(d is None or d == s for d, s in zip(self.input_shape, x.shape)):
            raise InvalidInputError(
                f"x has shape {x.shape} but model {self.model.name!r} expects a batch {shown}; "
                "for a single image pass x[None]."
            )
        if x.ndim != len(want):
            raise InvalidInputError(
                f"x has shape {x.shape} (rank {x.ndim}) but model {self.model.name!r} expects rank "
                f"{len(want)}: {shown}."
            )
        for axis, (d, s) in enumerate(zip(want, x.shape)):
            if d is not None and d != s:
                raise InvalidInputError(
                    f"x has shape {x.shape} but model {self.model.name!r} expects {shown}: "
                    f"axis {axis} is {s}, expected {d}."
                )
        if x.shape[0] == 0:
            raise InvalidInputError("x is an empty batch (shape[0] == 0); pass at least one sample.")
        x = x.astype(self.dtype, copy=False)
        if not np.all(np.isfinite(x)):
            bad = np.argwhere(~np.isfinite(x))[0]
            raise InvalidInputError(
                f"x contains NaN or Inf (first at index {tuple(int(i) for i in bad)}, value "
                f"{x[tuple(bad)]}); relevance of non-finite inputs is undefined. Clean the data first."
            )
        return x

    def _check_target(self, target, n: int) -> np.ndarray:
        if target is None:
            return np.full((n,), -1, np.int32)  # -1: the predicted class, chosen in the graph
        t = np.asarray(target.numpy() if isinstance(target, tf.Tensor) else target)
        if t.dtype == bool or not np.issubdtype(t.dtype, np.integer):
            raise InvalidTargetError(
                f"target must be an int or an integer array of shape (n,) = ({n},), got "
                f"{target!r} with dtype {t.dtype}."
            )
        if t.ndim == 0:
            t = np.full((n,), int(t))
        elif t.shape != (n,):
            raise InvalidTargetError(
                f"target has shape {t.shape} but must be an int or have shape (n,) = ({n},), one "
                "class index per sample."
            )
        bad = np.flatnonzero((t < 0) | (t >= self.n_classes))
        if bad.size:
            i = int(bad[0])
            raise InvalidTargetError(
                f"target[{i}] = {int(t[i])} is out of range for model {self.model.name!r} with "
                f"{self.n_classes} classes (valid: 0..{self.n_classes - 1})."
            )
        return t.astype(np.int32)

    def _check_initial(self, initial, target, n: int):
        if isinstance(initial, str):
            if initial not in _INITIAL_MODES:
                raise InvalidTargetError(
                    f"initial={initial!r} is not known; use 'logit' (the target logit, default), "
                    "'one' (1 at the target), a callable (logits, target) -> relevance, or an "
                    f"array of shape (n, classes) = ({n}, {self.n_classes})."
                )
            return initial, None
        if callable(initial):
            return initial, None
        r0 = np.asarray(initial)
        if not (np.issubdtype(r0.dtype, np.floating) or np.issubdtype(r0.dtype, np.integer)) or r0.dtype == bool:
            raise InvalidTargetError(f"initial relevance array has dtype {r0.dtype}; it must be real numbers.")
        if r0.shape == (self.n_classes,):
            r0 = np.broadcast_to(r0, (n, self.n_classes))
        if r0.shape != (n, self.n_classes):
            raise InvalidTargetError(
                f"initial relevance array has shape {r0.shape}; it must be (n, classes) = "
                f"({n}, {self.n_classes}) or (classes,) = ({self.n_classes},)."
            )
        if target is not None:
            raise InvalidTargetError(
                "pass either target= or an initial relevance array, not both: the array already "
                "says how much relevance starts at each class."
            )
        if not np.all(np.isfinite(r0)):
            raise InvalidTargetError("initial relevance array contains NaN or Inf.")
        return "array", r0.astype(self.dtype)

    # -----------------------------------------------------------------------------------------
    # The compiled pass

    def _plan(self, input_nonneg: bool):
        if input_nonneg not in self._plans:
            self._plans[input_nonneg] = rewrite.build_plan(
                self.model, self.rule, input_nonneg=input_nonneg, canonizers=self.canonizers,
                compute_dtype=self.compute_dtype,
            )
        return self._plans[input_nonneg]

    def _function(self, input_nonneg: bool, mode, return_layers: bool):
        key = (input_nonneg, mode, return_layers)
        if key in self._functions:
            return self._functions[key]
        plan = self._plan(input_nonneg)
        n_classes = self.n_classes
        x_spec = tf.TensorSpec((None,) + tuple(self.input_shape), self.dtype)
        second = tf.TensorSpec((None, n_classes), self.dtype) if mode == "array" else tf.TensorSpec((None,), tf.int32)

        def lrp_pass(x, target_or_r0):
            self.trace_count += 1  # runs only while tracing
            with tf.GradientTape() as tape:
                tape.watch(x)
                logits, layers = rewrite.run(plan, x, collect=return_layers)
            if mode == "array":
                r0 = target_or_r0
            else:
                predicted = tf.argmax(logits, -1, output_type=tf.int32)
                target = tf.where(target_or_r0 < 0, predicted, target_or_r0)
                onehot = tf.one_hot(target, n_classes, dtype=logits.dtype)
                if mode == "logit":
                    r0 = onehot * logits
                elif mode == "one":
                    r0 = onehot
                else:
                    r0 = tf.convert_to_tensor(mode(logits, target), dtype=logits.dtype)
                    r0 = tf.ensure_shape(r0, logits.shape)
            r0 = tf.stop_gradient(r0)
            sources = [x] + list(layers.values())
            grads = tape.gradient(
                logits, sources, output_gradients=r0, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            sums = [tf.reduce_sum(tf.reshape(g, [tf.shape(g)[0], -1]), -1) for g in grads]
            return grads[0], logits, sums

        # autograph=False: the pass has no tensor-dependent Python control flow to convert.
        fn = tf.function(lrp_pass, input_signature=[x_spec, second], jit_compile=self.jit_compile, autograph=False)
        self._functions[key] = (fn, list(plan.steps))
        return self._functions[key]

    # -----------------------------------------------------------------------------------------
    # Public calls

    def __call__(self, x, target=None, *, initial="logit", return_layers: bool = False, batch_size: int | None = None):
        """Relevance of every input element for ``target``.

        Parameters
        ----------
        x : array_like
            Batch shaped like the model input ``(n, ...)``; cast to the model's float dtype (a
            model with an integer input, e.g. uint8 pixels, is explained in float32).
        target : int, array_like of int or 'all', optional
            Class to explain per sample (shape ``(n,)``) or for all; default the predicted class.
            Several classes per image: an ``(n, k)`` array with ``k >= 2`` or ``'all'``; the result
            then has shape ``(n, k, ...)`` and is computed in one batched call. An ``(n, 1)`` array
            is refused as ambiguous (pass ``(n,)`` for one class per image).
        initial : {'logit', 'one'} or callable or array_like
            Relevance at the output: the target logit (default, the seed's ``f(x)``), ``1`` at the
            target, ``initial(logits, target) -> (n, classes)`` built from TensorFlow ops, or an
            explicit ``(n, classes)`` array (then ``target`` must be omitted).
        return_layers : bool
            Also return a :class:`RelevanceReport` of per-layer relevance sums.
        batch_size : int, optional
            Split ``x`` into batches of this size (results are concatenated). Default:
            :meth:`auto_batch_size`, from the model's activation size and the free memory, so
            that a large ``x`` is explained in chunks instead of running out of memory.

        Returns
        -------
        numpy.ndarray or (numpy.ndarray, RelevanceReport)
            Relevance shaped like ``x``, in the model's dtype.
        """
        x = self._check_x(x)
        n = x.shape[0]
        per_class = self._per_class_targets(target, n)
        if per_class is not None:
            # k targets of the same images: the images repeated k times, in batches of at least
            # _MULTI_TARGET_ROWS rows (few images: one call instead of k; many: no giant batch).
            k = per_class.shape[1]
            rows = batch_size if batch_size is not None else max(n, _MULTI_TARGET_ROWS)
            out = self(np.repeat(x, k, axis=0), per_class.reshape(-1), initial=initial,
                       return_layers=return_layers, batch_size=rows)
            if not return_layers:
                return out.reshape((n, k) + x.shape[1:])
            R, report = out
            sums = {name: v.reshape(n, k) for name, v in report.items()}
            return R.reshape((n, k) + x.shape[1:]), RelevanceReport(sums)
        mode, r0 = self._check_initial(initial, target, n)
        t = self._check_target(target, n) if r0 is None else None
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise InvalidInputError(f"batch_size must be a positive int or None, got {batch_size!r}.")
        input_nonneg = bool(np.all(x >= 0))
        fn, steps = self._function(input_nonneg, mode, return_layers)
        second = r0 if r0 is not None else t
        step = min(n, self.auto_batch_size()) if batch_size is None else batch_size
        parts, sums = [], []
        for start in range(0, n, step):
            R, _, s = self._run_batch(fn, x[start:start + step], second[start:start + step])
            parts.append(R)
            sums.append(s)
        R = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if not return_layers:
            return R
        labels = [self._input_name] + [s.node.label for s in steps]
        per_layer = {k: np.concatenate([b[i] for b in sums]) for i, k in enumerate(labels)}
        return R, RelevanceReport(per_layer)

    #: Bytes an explanation keeps per activation element and sample: the forward value, the
    #: relevance and the rules' temporaries (z, z+, the stabilised denominator), in float32.
    _BYTES_PER_ACTIVATION = 6 * 4
    #: Share of the free memory one batch may take.
    _MEMORY_SHARE = 0.25

    def auto_batch_size(self) -> int:
        """The default batch size: a quarter of the free memory over an estimate of one sample's need.

        One sample needs about :attr:`_BYTES_PER_ACTIVATION` bytes per activation element of
        every layer (the sum of the layers' input sizes; about 5x what VGG16 was measured to
        take, on purpose); the free memory is the machine's available RAM (``/proc/meminfo``;
        4 GiB assumed on a GPU). At least 1, at most 4096.
        """
        if getattr(self, "_auto_batch", None) is None:
            elements = 0
            for node in self._plans[False].graph.nodes:
                for shape in node.input_shapes:
                    dims = list(shape)[1:]
                    elements += int(np.prod([d or 1 for d in dims])) if dims else 1
            per_sample = max(1, elements) * self._BYTES_PER_ACTIVATION * (np.dtype(self.dtype).itemsize / 4)
            free = _free_memory_bytes()
            self._auto_batch = int(np.clip(free * self._MEMORY_SHARE // per_sample, 1, 4096))
        return self._auto_batch

    def _per_class_targets(self, target, n):
        """``(n, k)`` class indices when several targets per image are asked for, else ``None``."""
        if isinstance(target, str):
            if target != "all":
                raise InvalidTargetError(f"target={target!r} is not known; use an int, an int array, or 'all'.")
            return np.tile(np.arange(self.n_classes, dtype=np.int32), (n, 1))
        if target is None or isinstance(target, (int, np.integer)):
            return None
        t = np.asarray(target.numpy() if isinstance(target, tf.Tensor) else target)
        if t.ndim != 2:
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
        self._check_target(t.reshape(-1), t.size)  # dtype and range, with the usual messages
        return t.astype(np.int32)

    def _explain_with_logits(self, x, target):
        """``(relevance, logits)`` of one batch that :func:`lrp_grad.stream._check_block` already
        checked (shape, dtype, finite values): only cast here, not checked a second time on the
        streaming hot path. ``target`` ``None`` = predicted."""
        x = np.asarray(x).astype(self.dtype, copy=False)
        t = self._check_target(target, len(x))
        fn, _ = self._function(bool(np.all(x >= 0)), "logit", False)
        R, logits, _ = self._run_batch(fn, x, t)
        return R, logits

    def _run_batch(self, fn, x, second):
        """``(relevance, logits, per-layer sums)`` of one batch as numpy, padded to an XLA bucket."""
        rows = len(x)
        if self.jit_compile:
            x, second = _pad_to_bucket(x), _pad_to_bucket(second)
            self.compiled_batch_sizes.add(len(x))
        try:
            R, logits, sums = self._run(fn, x, second)
        except tf.errors.InvalidArgumentError as e:
            if _FOLD_MARK not in str(e):
                raise
            raise StaleExplainerError(_first_line(str(e), _FOLD_MARK)) from None
        except tf.errors.ResourceExhaustedError:
            raise LRPMemoryError(
                f"out of memory explaining a batch of {rows} images of shape {tuple(x.shape[1:])} with model "
                f"{self.model.name!r}; pass a smaller batch_size= (e.g. batch_size={max(1, rows // 4)})."
            ) from None
        return R.numpy()[:rows], logits.numpy()[:rows], [v.numpy()[:rows] for v in sums]

    def _run(self, fn, x, second):
        """Call the compiled pass on one batch, split across the strategy's replicas if any."""
        replicas = self.strategy.num_replicas_in_sync if self.strategy is not None else 1
        if replicas == 1 or len(x) < replicas:
            # The concrete function skips the polymorphic dispatch (~0.15 ms a call, measured).
            if fn not in self._concrete:
                self._concrete[fn] = fn.get_concrete_function()
            return self._concrete[fn](tf.constant(x), tf.constant(second))
        bounds = np.linspace(0, len(x), replicas + 1).astype(int)

        def shard(values):
            return lambda ctx: tf.constant(values[bounds[ctx.replica_id_in_sync_group]:
                                                  bounds[ctx.replica_id_in_sync_group + 1]])

        xs = self.strategy.experimental_distribute_values_from_function(shard(x))
        ss = self.strategy.experimental_distribute_values_from_function(shard(second))
        if fn not in self._distributed:
            strategy = self.strategy

            @tf.function(autograph=False)
            def distributed(xs, ss):
                # A plain callable: strategy.run re-wraps tf.functions and would bind PerReplica values.
                return strategy.run(lambda a, b: fn(a, b), args=(xs, ss))

            self._distributed[fn] = distributed
        out = self._distributed[fn](xs, ss)
        gather = lambda v: tf.concat(self.strategy.experimental_local_results(v), 0)  # noqa: E731 (replica order)
        R, logits, sums = out
        return gather(R), gather(logits), [gather(v) for v in sums]

    def explain_dataset(self, data, target="auto", *, batch_size: int = 256, out=None, resume: bool = False,
                        progress: bool = True, length: int | None = None, worker=None):
        """Explain a whole dataset in batches, with constant memory when writing to disk.

        Parameters
        ----------
        data : tf.data.Dataset, numpy array or iterable
            Images, ``(image, label)`` pairs, or dicts with an image key (``'image'``, ``'x'``,
            ...) and optionally a label key (``'label'``, ``'y'``, ...); elements may be single
            images or batches. Labels may be class indices (any integer dtype) or one-hot rows.
            The order is preserved.
        target : 'auto', 'label', 'predicted', None or int
            ``'auto'`` (default): the label of each element when the data has labels, else the
            predicted class. ``'label'``: the labels (an error without them). ``'predicted'``
            (``None`` too) or one class index for all.
        batch_size : int
            Images per compiled call (a last partial batch does not recompile).
        out : path, optional
            ``None``: return the relevance in memory. ``'file.npy'``: fill a memmap batch by batch
            (needs the length). ``'folder'``: one ``shard_*.npy`` per batch. Progress is recorded
            in a manifest after each batch is safely written. One process writes an output at a
            time (a lock file with its pid and host; a lock left by a dead process is taken over);
            the disk space of a ``.npy`` output is reserved up front.
        resume : bool
            Continue a run that stopped, skipping the images already written. Refuses (with the
            reason) when the output was written by another model, rule, target choice or batch
            size, when the data differs from what was explained before (each batch's images are
            hashed in the manifest), or when the output files were deleted, truncated or changed
            since (checked against per-batch hashes before anything is trusted).
        progress : bool
            Show a progress bar (tqdm, if installed).
        length : int, optional
            Number of images, when it cannot be read from ``data``.
        worker : 'auto', (index, count) or None
            Share the work among ``count`` processes: this one explains every ``count``-th batch
            and writes its own shards and manifest into the ``out`` folder;
            :func:`lrp_grad.stream.load` merges them in order. ``'auto'`` reads ``TF_CONFIG``.

        Returns
        -------
        lrp_grad.stream.DatasetResult
            ``relevance`` and per-image ``summaries`` (predicted class, target, target logit,
            relevance sum, conservation error).
        """
        from .stream import explain_dataset

        return explain_dataset(self, data, target, batch_size, out, resume, progress, length, worker)

    def export(self, path):
        """Write a TensorFlow SavedModel with ``explain(images, target)`` and ``serving_default(images)``
        signatures (relevance and logits); it loads and runs without lrp_grad. See
        :func:`lrp_grad.export.export`."""
        from .export import export

        return export(self, path)

    def forward(self, x) -> np.ndarray:
        """The rewritten model's output on ``x`` (the logits; a final softmax or sigmoid is skipped)."""
        x = self._check_x(x)
        out, _ = rewrite.run(self._plans[False], tf.constant(x))
        return out.numpy()


#: ``explain()``'s compiled explainers: model -> {options key: Explainer}. Held weakly by the
#: model, and the cached explainers hold the model only through a weak proxy, so a model that is
#: deleted takes its explainers with it (no leak).
_CACHE = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _option_key(rule, canonizers, jit_compile, compute_dtype):
    """A hashable key of ``explain()``'s options, or ``None`` when one of them is not hashable.

    Rules and preset names hash by value; a Composite (which holds a dict) by identity, kept
    alive in the key so that its id cannot be reused while the entry exists.
    """
    def part(v):
        try:
            hash(v)
            return ("value", v)
        except TypeError:
            return ("object", id(v), v)

    key = (handlers.registry_version, part(rule), part(None if canonizers is None else tuple(canonizers)),
           jit_compile, compute_dtype)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _cached_explainer(model, rule, canonizers, jit_compile, compute_dtype):
    """The Explainer of ``explain()`` for these options, built once per model and options."""
    key = _option_key(rule, canonizers, jit_compile, compute_dtype)
    with _CACHE_LOCK:
        try:
            per_model = _CACHE.setdefault(model, {})
        except TypeError:  # not weak-referenceable / hashable: no cache
            per_model, key = None, None
        if key is not None and key in per_model:
            return per_model[key], True
        return _build_cached(model, rule, canonizers, jit_compile, compute_dtype, per_model, key)


def _build_cached(model, rule, canonizers, jit_compile, compute_dtype, per_model, key):
    ex = Explainer(model, rule=rule, canonizers=canonizers, jit_compile=jit_compile, compute_dtype=compute_dtype)
    if key is not None:
        ex._plan(True)  # both plans now: later ones would need the model itself
        proxy = weakref.proxy(model)
        ex.model = proxy
        ex._plans = {k: replace(p, graph=replace(p.graph, model=proxy)) for k, p in ex._plans.items()}
        per_model[key] = ex
    return ex, key is not None


def _evict(model, ex):
    with _CACHE_LOCK:
        per_model = _CACHE.get(model, {})
        for k, v in list(per_model.items()):
            if v is ex:
                del per_model[k]


def explain(model, x, target=None, *, rule=None, initial="logit", return_layers: bool = False,
            batch_size: int | None = None, canonizers=None, jit_compile: bool | None = None,
            compute_dtype: str | None = None):
    """Explain ``model``'s decision on the batch ``x`` with LRP in one call.

    See :class:`Explainer` for the parameters. The compiled pass is cached per model and options
    (``rule``, ``canonizers``, ``jit_compile``, ``compute_dtype``), so repeated calls cost about
    what an :class:`Explainer` call does; the cache holds models weakly (deleting a model frees
    its explainers). It reads the model's current weights on every call, and registering or
    unregistering a handler starts new entries; a model whose layers were changed in place
    (e.g. a layer's ``activation`` reassigned) needs ``lrp_grad.Explainer`` or a new model.

    Examples
    --------
    >>> R = lrp_grad.explain(model, x)                                    # doctest: +SKIP
    >>> R = lrp_grad.explain(model, x, target=3, rule=lrp_grad.ZPlus())  # doctest: +SKIP
    """
    ex, cached = _cached_explainer(model, rule, canonizers, jit_compile, compute_dtype)
    try:
        return ex(x, target, initial=initial, return_layers=return_layers, batch_size=batch_size)
    except StaleExplainerError:
        # A BatchNorm folded through a max pooling needs the scales it had when the plan was
        # built; if training changed their signs since, plan again (once) instead of failing.
        if not cached:
            raise
        _evict(model, ex)
        ex = Explainer(model, rule=rule, canonizers=canonizers, jit_compile=jit_compile, compute_dtype=compute_dtype)
        return ex(x, target, initial=initial, return_layers=return_layers, batch_size=batch_size)
