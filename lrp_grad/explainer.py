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

    def _repr_html_(self):
        """The per-layer table as HTML (Jupyter shows it instead of the text of ``repr``)."""
        import html

        gaps = self.conservation_gap()
        rows = "".join(
            f"<tr><td style='text-align:left'>{html.escape(str(k))}</td><td>{float(np.mean(v)):.6g}</td>"
            f"<td>{float(np.min(v)):.6g}</td><td>{float(np.max(v)):.6g}</td><td>{gaps[k]:.3g}</td></tr>"
            for k, v in self._sums.items())
        return (f"<table class='lrp-grad-report'><caption>RelevanceReport: {len(self)} layers, "
                f"n={len(self.output)} (relevance summed per sample; gap = max relative difference to the "
                "output's)</caption><thead><tr><th>layer</th><th>mean sum R</th><th>min</th><th>max</th>"
                f"<th>max rel. gap</th></tr></thead><tbody>{rows}</tbody></table>")


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
    """Explains a Keras model's output with LRP; builds once and reuses the compiled pass.

    Parameters
    ----------
    model : keras.Model or tf_keras.Model
        Sequential or Functional model (Keras 3 or tf-keras) with one or several inputs. A final
        softmax or sigmoid (layer, activation or operation) of the explained output is skipped:
        its input (the logits) is explained. The model is never modified.
    rule : Rule, Composite or str, optional
        A rule for every rule-taking layer, a :class:`~lrp_grad.Composite`, or a preset name
        (see :mod:`lrp_grad.presets`); default ``AlphaBeta(2, 1)`` (the seed report's a/b rule).
    output : str or int, optional
        What to explain: the model's only output (default), one of several outputs by name or
        index, or any layer's output by the layer's name (``'name#k'`` for the k-th call of a
        shared layer). A model with several outputs needs it.
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
    >>> R_img, R_meta = ex([x_img, x_meta])                           # doctest: +SKIP
    >>> seg = lrp_grad.Explainer(unet, output="mask")                 # doctest: +SKIP
    >>> R = seg(x, target=region[..., None] * np.eye(3)[1])          # doctest: +SKIP
    """

    def __init__(self, model, rule=None, *, output=None, canonizers=None, jit_compile: bool | None = None,
                 strategy=None, compute_dtype: str | None = None):
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
        self.output = output
        self.jit_compile = _default_jit() if jit_compile is None else jit_compile
        # Plans per input-sign pattern; the signed one now so errors come early.
        first = rewrite.build_plan(model, rule, input_nonneg=False, canonizers=canonizers,
                                   compute_dtype=compute_dtype, output=output)
        graph = first.graph
        self.n_inputs = len(graph.input_ids)
        self._plans = {(False,) * self.n_inputs: first}
        #: Name of the explained output (an output layer's or a hidden layer's name).
        self.output_name = graph.output_name
        #: Shape of the explained output without the batch axis.
        self.output_shape = tuple(graph.output_shape)
        self._model_output = graph.output_name in graph.output_names
        #: Size of the output's last axis (classes of a classifier, channels of a feature map), or
        #: ``None`` for one number per sample.
        self.n_classes = graph.n_outputs
        self.input_shapes = tuple(tuple(s) for s in graph.input_shapes)
        self.input_names = tuple(graph.input_names)
        self.input_shape = self.input_shapes[0]
        # An integer input (e.g. uint8 pixels, then Rescaling) is explained in float32: relevance
        # is fractional, and casting float batches to the integer dtype would zero it. A
        # float16/bfloat16 input too: the rules' divisions need float32's range and precision.
        self.dtypes = tuple(_explained_dtype(d) for d in graph.dtypes)
        self.dtype = self.dtypes[0]
        self._input_name = graph.input_name
        self._functions = {}
        #: How many times a compiled pass was traced (for retracing checks).
        self.trace_count = 0
        #: With XLA: the padded batch sizes compiled so far (powers of two; see _pad_to_bucket).
        self.compiled_batch_sizes = set()
        self._distributed = {}
        self._concrete = {}

    def __repr__(self):
        out = "" if self.output is None else f", output={self.output!r}"
        return f"Explainer(model={self.model.name!r}{out}, rule={self.rule.name}, jit_compile={self.jit_compile})"

    @property
    def rules(self):
        """:class:`~lrp_grad.composites.RuleMap` layer -> rule (what will happen; printable)."""
        return self._plans[(False,) * self.n_inputs].rules

    @property
    def is_classifier(self) -> bool:
        """Whether the explained output is ``(batch, classes)`` (class targets, a predicted class)."""
        return len(self.output_shape) == 1 and self.n_classes is not None

    def _require_classifier(self, what: str):
        """Refuse single-input classifier features for other models, naming what is not supported."""
        if self.n_inputs != 1:
            raise UnsupportedModelError(
                f"{what} explains single-input models; model {self.model.name!r} has {self.n_inputs} inputs "
                f"({', '.join(map(repr, self.input_names))}). Call the Explainer on lists of batches instead.")
        if not self.is_classifier:
            raise UnsupportedModelError(
                f"{what} explains classifiers with output (batch, classes); the output {self.output_name!r} "
                f"has shape {(None,) + self.output_shape}. Call the Explainer with target= a mask instead.")

    # -----------------------------------------------------------------------------------------
    # Validation

    def _check_inputs(self, x):
        """``(list of arrays, structure)``: one checked array per model input; ``structure`` says
        how to return the relevance (``None``: a single array, ``'list'``, or the dict's keys)."""
        if self.n_inputs == 1:
            if isinstance(x, Mapping):
                if set(x) != {self.input_names[0]}:
                    raise InvalidInputError(
                        f"x is a dict with keys {sorted(map(str, x))}; model {self.model.name!r} has one input, "
                        f"{self.input_names[0]!r}.")
                return [self._check_x(x[self.input_names[0]])], list(x)
            if isinstance(x, (list, tuple)) and len(x) == 1 and not np.isscalar(x[0]) and np.ndim(x[0]) == len(self.input_shape) + 1:
                return [self._check_x(x[0])], "list"
            return [self._check_x(x)], None
        names = ", ".join(map(repr, self.input_names))
        if isinstance(x, Mapping):
            missing = [k for k in self.input_names if k not in x]
            extra = [k for k in x if k not in self.input_names]
            if missing or extra:
                raise InvalidInputError(
                    f"x is a dict with keys {sorted(map(str, x))}; model {self.model.name!r} has inputs {names}"
                    + (f" (missing {missing})" if missing else "") + (f" (unknown {extra})" if extra else "") + ".")
            xs, structure = [x[k] for k in self.input_names], list(self.input_names)
        elif isinstance(x, (list, tuple)):
            if len(x) != self.n_inputs:
                raise InvalidInputError(
                    f"x is a list of {len(x)} arrays; model {self.model.name!r} has {self.n_inputs} inputs ({names}): "
                    "pass one batch per input, in that order, or a dict by input name.")
            xs, structure = list(x), "list"
        else:
            raise InvalidInputError(
                f"model {self.model.name!r} has {self.n_inputs} inputs ({names}); pass x as a list of one batch "
                "per input, in that order, or a dict by input name.")
        checked = [self._check_x(v, i) for i, v in enumerate(xs)]
        sizes = {len(v) for v in checked}
        if len(sizes) != 1:
            shown = ", ".join(f"{n!r}: {len(v)}" for n, v in zip(self.input_names, checked))
            raise InvalidInputError(f"the inputs' batches differ in length ({shown}); every input needs one row "
                                    "per sample.")
        return checked, structure

    def _pack(self, parts, structure):
        """The relevance in the structure ``x`` was given in."""
        if structure is None:
            return parts[0]
        if structure == "list":
            return list(parts)
        return {k: parts[self.input_names.index(k)] for k in structure}

    def _check_x(self, x, index: int = 0) -> np.ndarray:
        shape_of_input = self.input_shapes[index]
        dtype = self.dtypes[index]
        what = "x" if self.n_inputs == 1 else f"input {self.input_names[index]!r}"
        if isinstance(x, tf.Tensor):
            x = x.numpy()
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as e:
            raise InvalidInputError(f"{what} could not be converted to an array: {e}") from None
        if x.dtype == bool or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise InvalidInputError(
                f"{what} has dtype {x.dtype}; it must hold real numbers (float or integer images), "
                f"it is cast to the model's {dtype}."
            )
        want = (None,) + tuple(shape_of_input)
        shown = "(batch, " + ", ".join("any" if d is None else str(d) for d in shape_of_input) + ")"
        if x.ndim == len(want) - 1 and all(d is None or d == s for d, s in zip(shape_of_input, x.shape)):
            raise InvalidInputError(
                f"{what} has shape {x.shape} but model {self.model.name!r} expects a batch {shown}; "
                f"for a single sample pass {'x' if self.n_inputs == 1 else 'it'}[None]."
            )
        if x.ndim != len(want):
            raise InvalidInputError(
                f"{what} has shape {x.shape} (rank {x.ndim}) but model {self.model.name!r} expects rank "
                f"{len(want)}: {shown}."
            )
        for axis, (d, s) in enumerate(zip(want, x.shape)):
            if d is not None and d != s:
                raise InvalidInputError(
                    f"{what} has shape {x.shape} but model {self.model.name!r} expects {shown}: "
                    f"axis {axis} is {s}, expected {d}."
                )
        if x.shape[0] == 0:
            raise InvalidInputError(f"{what} is an empty batch (shape[0] == 0); pass at least one sample.")
        x = x.astype(dtype, copy=False)
        if not np.all(np.isfinite(x)):
            bad = np.argwhere(~np.isfinite(x))[0]
            raise InvalidInputError(
                f"{what} contains NaN or Inf (first at index {tuple(int(i) for i in bad)}, value "
                f"{x[tuple(bad)]}); relevance of non-finite inputs is undefined. Clean the data first."
            )
        return x

    def _out_shown(self) -> str:
        return str((None,) + self.output_shape)

    def _check_target(self, target, n: int):
        """``('index', (n,) int32)`` (``-1``: the predicted class) or ``('mask', array)``."""
        if target is None:
            if self.is_classifier:
                return "index", np.full((n,), -1, np.int32)  # -1: the predicted class, chosen in the graph
            if all(d == 1 for d in self.output_shape):  # one number per sample (e.g. a regression)
                return "mask", np.ones((1,) * (len(self.output_shape) + 1), self.dtype)
            raise InvalidTargetError(
                f"output {self.output_name!r} has shape {self._out_shown()}, which has no predicted class; pass "
                "target= a channel index (last axis, summed over the other axes) or a mask broadcastable to the "
                "output (the explained quantity is sum(output * mask) per sample).")
        t = np.asarray(target.numpy() if isinstance(target, tf.Tensor) else target)
        if (t.dtype == bool or np.issubdtype(t.dtype, np.floating)) and t.ndim > 0:
            return "mask", self._check_mask(t, n)
        if t.ndim == 0 and not np.issubdtype(t.dtype, np.integer) or t.dtype == bool:
            raise InvalidTargetError(
                f"target must be an int or an integer array of shape (n,) = ({n},), or a float/bool mask "
                f"shaped like the output {self._out_shown()}; got {target!r} with dtype {t.dtype}."
            )
        if not np.issubdtype(t.dtype, np.integer):
            raise InvalidTargetError(
                f"target must be an int, an integer array of shape (n,) = ({n},), or a float/bool mask "
                f"broadcastable to the output {self._out_shown()}; got {target!r} with dtype {t.dtype}."
            )
        if self.n_classes is None:
            raise InvalidTargetError(
                f"output {self.output_name!r} has shape {self._out_shown()} (one number per sample): it is "
                "explained without a target (or with a float mask); got an integer target.")
        if t.ndim == 0:
            t = np.full((n,), int(t))
        elif t.shape != (n,):
            raise InvalidTargetError(
                f"target has shape {t.shape} but must be an int or have shape (n,) = ({n},), one "
                "class index per sample (or, as floats, a mask broadcastable to the output "
                f"{self._out_shown()})."
            )
        bad = np.flatnonzero((t < 0) | (t >= self.n_classes))
        if bad.size:
            i = int(bad[0])
            units = ("classes" if self.is_classifier and self._model_output else
                     f"channels on the last axis of output {self.output_name!r}")
            raise InvalidTargetError(
                f"target[{i}] = {int(t[i])} is out of range for model {self.model.name!r} with "
                f"{self.n_classes} {units} (valid: 0..{self.n_classes - 1})."
            )
        return "index", t.astype(np.int32)

    def _check_mask(self, m: np.ndarray, n: int) -> np.ndarray:
        """A mask as ``(n or 1, ...)`` of the output's rank + 1, checked against the output shape.

        Per sample: the output's rank + 1 with ``n`` (or 1) rows; shared: the output's rank. Axes
        of size 1 broadcast. A float vector of length ``n`` for a classifier is refused: it could
        be class indices stored as floats, or a mask over the classes."""
        rank = len(self.output_shape)
        shown = self._out_shown()
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

    def _check_initial(self, initial, target, n: int):
        full = (n,) + self.output_shape
        if isinstance(initial, str):
            if initial not in _INITIAL_MODES:
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

    # -----------------------------------------------------------------------------------------
    # The compiled pass

    def _plan(self, input_nonneg):
        key = input_nonneg if isinstance(input_nonneg, tuple) else (bool(input_nonneg),) * self.n_inputs
        if key not in self._plans and getattr(self, "_signed_only", False):
            key = (False,) * self.n_inputs
        if key not in self._plans:
            self._plans[key] = rewrite.build_plan(
                self.model, self.rule, input_nonneg=key, canonizers=self.canonizers,
                compute_dtype=self.compute_dtype, output=self.output,
            )
        return self._plans[key]

    def _function(self, input_nonneg, mode, return_layers: bool, select="index", mask_shape=None):
        """The compiled pass ``fn(*inputs, second) -> (relevances, output, per-layer sums)``.

        ``select``: how the explained quantity is chosen: ``'index'`` (``second`` holds a class /
        channel index per sample, ``-1`` the predicted class), ``'mask'`` (``second`` is a mask
        of shape ``mask_shape`` multiplied with the output) or ``'array'`` (``second`` is the
        initial relevance itself; ``mode == 'array'``).
        """
        input_nonneg = input_nonneg if isinstance(input_nonneg, tuple) else (bool(input_nonneg),) * self.n_inputs
        if mode == "array":
            select = "array"
        mask_shape = None if mask_shape is None else tuple(mask_shape[1:])  # any number of rows
        key = (input_nonneg, mode, return_layers, select, mask_shape)
        if key in self._functions:
            return self._functions[key]
        plan = self._plan(input_nonneg)
        specs = self._input_specs()
        second = self._second_spec(select, mask_shape)

        def lrp_pass(*args):
            self.trace_count += 1  # runs only while tracing
            xs, target_or_r0 = list(args[:-1]), args[-1]
            with tf.GradientTape() as tape:
                for x in xs:
                    tape.watch(x)
                logits, layers = rewrite.run(plan, xs, collect=return_layers)
            r0 = self._initial_relevance(logits, target_or_r0, select, mode)
            sources = xs + list(layers.values())
            grads = tape.gradient(
                logits, sources, output_gradients=r0, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            sums = [tf.reduce_sum(tf.reshape(g, [tf.shape(g)[0], -1]), -1) for g in grads]
            if len(xs) > 1:  # the inputs' total first: conservation holds over all inputs together
                sums = [tf.add_n(sums[:len(xs)])] + sums
            return tuple(grads[:len(xs)]), logits, sums

        # autograph=False: the pass has no tensor-dependent Python control flow to convert.
        fn = tf.function(lrp_pass, input_signature=specs + [second], jit_compile=self.jit_compile, autograph=False)
        self._functions[key] = (fn, list(plan.steps))
        return self._functions[key]

    def _input_specs(self) -> list:
        return [tf.TensorSpec((None,) + tuple(shape), dtype) for shape, dtype in zip(self.input_shapes, self.dtypes)]

    def _second_spec(self, select, mask_shape):
        """The ``TensorSpec`` of the compiled pass's last argument (see :meth:`_function`)."""
        if select == "array":
            return tf.TensorSpec((None,) + self.output_shape, self.dtype)
        if select == "mask":
            return tf.TensorSpec((None,) + tuple(mask_shape), self.dtype)
        return tf.TensorSpec((None,), tf.int32)

    def _initial_relevance(self, logits, target_or_r0, select, mode):
        """The relevance at the explained output, inside the compiled pass (no gradient through it)."""
        if select == "array":
            return tf.stop_gradient(tf.cast(target_or_r0, logits.dtype))
        n_classes, rank = self.n_classes, len(self.output_shape) + 1
        if select == "mask":
            chosen = tf.cast(target_or_r0, logits.dtype)
            target = target_or_r0
        else:
            if self.is_classifier:
                predicted = tf.argmax(logits, -1, output_type=tf.int32)
                target = tf.where(target_or_r0 < 0, predicted, target_or_r0)
            else:
                target = target_or_r0
            onehot = tf.one_hot(target, n_classes, dtype=logits.dtype)
            chosen = tf.reshape(onehot, [-1] + [1] * (rank - 2) + [n_classes])
        if mode == "logit":
            r0 = chosen * logits
        elif mode == "one":
            r0 = chosen * tf.ones_like(logits)
        else:
            r0 = tf.convert_to_tensor(mode(logits, target), dtype=logits.dtype)
            r0 = tf.ensure_shape(r0, logits.shape)
        return tf.stop_gradient(r0)

    def _report_labels(self, steps) -> list:
        if self.n_inputs == 1:
            return [self._input_name] + [s.node.label for s in steps]
        return ["inputs (total)", *self.input_names] + [s.node.label for s in steps]

    # -----------------------------------------------------------------------------------------
    # Public calls

    def __call__(self, x, target=None, *, initial="logit", return_layers: bool = False, batch_size: int | None = None):
        """Relevance of every input element for ``target``.

        Parameters
        ----------
        x : array_like, list or dict
            Batch shaped like the model input ``(n, ...)``; cast to the model's float dtype (a
            model with an integer input, e.g. uint8 pixels, is explained in float32). For a model
            with several inputs: a list of batches in the model's input order, or a dict by input
            name (:attr:`input_names`); the relevance comes back in the same structure.
        target : int, array_like of int, 'all', or a float/bool mask, optional
            Integers: the class (for a ``(n, classes)`` output) or channel (last axis, summed over
            the other axes) to explain, per sample (shape ``(n,)``) or for all; default the
            predicted class of a classifier, and the whole output when it is one number per
            sample (a ``(n, 1)`` regression). Several classes per image: an ``(n, k)`` integer
            array with ``k >= 2`` or ``'all'``; the result then has shape ``(n, k, ...)``. An
            ``(n, 1)`` integer array is refused as ambiguous. A float or bool array is a *mask*
            broadcastable to the output, per sample ``(n, ...)`` or shared ``(...)``: the
            explained quantity is ``sum(output * mask)`` per sample (e.g. one class inside a
            region of a segmentation map).
        initial : {'logit', 'one'} or callable or array_like
            Relevance at the output: the selected output values (default, the seed's ``f(x)``),
            ``1`` at the selection (the mask itself for a mask), ``initial(logits, target) ->
            relevance`` built from TensorFlow ops, or an explicit array shaped like the output
            ``(n, ...)`` (then ``target`` must be omitted).
        return_layers : bool
            Also return a :class:`RelevanceReport` of per-layer relevance sums.
        batch_size : int, optional
            Split ``x`` into batches of this size (results are concatenated). Default:
            :meth:`auto_batch_size`, from the model's activation size and the free memory, so
            that a large ``x`` is explained in chunks instead of running out of memory.

        Returns
        -------
        numpy.ndarray (list or dict for several inputs), or (that, RelevanceReport)
            Relevance shaped like ``x``, in the model's dtype.
        """
        xs, structure = self._check_inputs(x)
        n = xs[0].shape[0]
        per_class = self._per_class_targets(target, n)
        if per_class is not None:
            # k targets of the same images: the images repeated k times, in batches of at least
            # _MULTI_TARGET_ROWS rows (few images: one call instead of k; many: no giant batch).
            k = per_class.shape[1]
            rows = batch_size if batch_size is not None else max(n, _MULTI_TARGET_ROWS)
            repeated = [np.repeat(v, k, axis=0) for v in xs]
            out = self(self._pack(repeated, structure if structure is not None else None) if self.n_inputs > 1
                       else repeated[0], per_class.reshape(-1), initial=initial, return_layers=return_layers,
                       batch_size=rows)
            R, report = out if return_layers else (out, None)
            parts = self._unpack(R, structure)
            parts = [p.reshape((n, k) + v.shape[1:]) for p, v in zip(parts, xs)]
            R = self._pack(parts, structure)
            if not return_layers:
                return R
            sums = {name: v.reshape(n, k) for name, v in report.items()}
            return R, RelevanceReport(sums)
        R, _, report = self._explained(xs, target, initial, return_layers, batch_size)
        R = self._pack(R, structure)
        return (R, report) if return_layers else R

    def _explained(self, xs, target, initial, return_layers: bool, batch_size):
        """``(relevance per input, output, RelevanceReport or None)`` of checked inputs ``xs`` for one
        target per sample, in batches of ``batch_size`` (default :meth:`auto_batch_size`)."""
        n = xs[0].shape[0]
        mode, select, second = self._selection(target, initial, n)
        _check_batch_size(batch_size)
        input_nonneg = tuple(bool(np.all(v >= 0)) for v in xs)
        fn, steps = self._function(input_nonneg, mode, return_layers, select,
                                   second.shape if select == "mask" else None)
        shared = select == "mask" and second.shape[0] == 1
        step = min(n, self.auto_batch_size()) if batch_size is None else batch_size
        parts, outputs, sums = [], [], []
        for start in range(0, n, step):
            rows = [v[start:start + step] for v in xs]
            s = np.broadcast_to(second, (len(rows[0]),) + second.shape[1:]) if shared else second[start:start + step]
            R, logits, layer_sums = self._run_batch(fn, rows, s)
            parts.append(R)
            outputs.append(logits)
            sums.append(layer_sums)
        R = [p[0] if len(parts) == 1 else np.concatenate(p) for p in zip(*parts)]
        logits = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        if not return_layers:
            return R, logits, None
        labels = self._report_labels(steps)
        return R, logits, RelevanceReport({k: np.concatenate([b[i] for b in sums]) for i, k in enumerate(labels)})

    def _selection(self, target, initial, n: int):
        """``(mode, select, second)`` for the compiled pass from one target per sample and ``initial``."""
        mode, r0 = self._check_initial(initial, target, n)
        if r0 is not None:
            return mode, "array", r0
        select, second = self._check_target(target, n)
        if callable(mode) and select == "mask":
            raise InvalidTargetError("a callable initial= takes class/channel targets, not a mask; pass "
                                     "initial='logit' or 'one' with a mask.")
        return mode, select, second

    def _unpack(self, R, structure) -> list:
        if structure is None:
            return [R]
        if structure == "list":
            return list(R)
        return [R[k] for k in self.input_names]

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
            for node in self.rules_graph.nodes:
                for shape in node.input_shapes:
                    dims = list(shape)[1:]
                    elements += int(np.prod([d or 1 for d in dims])) if dims else 1
            per_sample = max(1, elements) * self._BYTES_PER_ACTIVATION * (np.dtype(self.dtype).itemsize / 4)
            free = _free_memory_bytes()
            self._auto_batch = int(np.clip(free * self._MEMORY_SHARE // per_sample, 1, 4096))
        return self._auto_batch

    @property
    def rules_graph(self):
        """The canonized graph the explainer runs (the signed-input plan's)."""
        return self._plans[(False,) * self.n_inputs].graph

    def _per_class_targets(self, target, n):
        """``(n, k)`` class indices when several targets per image are asked for, else ``None``."""
        if isinstance(target, str):
            if target != "all":
                raise InvalidTargetError(f"target={target!r} is not known; use an int, an int array, or 'all'.")
            if self.n_classes is None:
                raise InvalidTargetError(f"target='all' needs an output with classes or channels; output "
                                         f"{self.output_name!r} has shape {self._out_shown()}.")
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
        self._check_target(t.reshape(-1), t.size)  # dtype and range, with the usual messages
        return t.astype(np.int32)

    def _explain_with_logits(self, x, target):
        """``(relevance, logits)`` of one batch that :func:`lrp_grad.stream._check_block` already
        checked (shape, dtype, finite values): only cast here, not checked a second time on the
        streaming hot path. ``target`` ``None`` = predicted."""
        x = np.asarray(x).astype(self.dtype, copy=False)
        _, t = self._check_target(target, len(x))
        fn, _ = self._function(bool(np.all(x >= 0)), "logit", False)
        (R,), logits, _ = self._run_batch(fn, [x], t)
        return R, logits

    def _run_batch(self, fn, xs, second):
        """``(relevances, logits, per-layer sums)`` of one batch as numpy, padded to an XLA bucket."""
        rows = len(xs[0])
        if self.jit_compile:
            xs, second = [_pad_to_bucket(v) for v in xs], _pad_to_bucket(np.asarray(second))
            self.compiled_batch_sizes.add(len(xs[0]))
        try:
            R, logits, sums = self._run(fn, xs, second)
        except tf.errors.InvalidArgumentError as e:
            if _FOLD_MARK not in str(e):
                raise
            raise StaleExplainerError(_first_line(str(e), _FOLD_MARK)) from None
        except tf.errors.ResourceExhaustedError:
            raise LRPMemoryError(
                f"out of memory explaining a batch of {rows} samples of shape {tuple(xs[0].shape[1:])} with model "
                f"{self.model.name!r}; pass a smaller batch_size= (e.g. batch_size={max(1, rows // 4)})."
            ) from None
        return [r.numpy()[:rows] for r in R], logits.numpy()[:rows], [v.numpy()[:rows] for v in sums]

    def _run(self, fn, xs, second):
        """Call the compiled pass on one batch, split across the strategy's replicas if any."""
        replicas = self.strategy.num_replicas_in_sync if self.strategy is not None else 1
        if replicas == 1 or len(xs[0]) < replicas:
            # The concrete function skips the polymorphic dispatch (~0.15 ms a call, measured).
            if fn not in self._concrete:
                self._concrete[fn] = fn.get_concrete_function()
            return self._concrete[fn](*[tf.constant(v) for v in xs], tf.constant(second))
        bounds = np.linspace(0, len(xs[0]), replicas + 1).astype(int)

        def shard(values):
            return lambda ctx: tf.constant(values[bounds[ctx.replica_id_in_sync_group]:
                                                  bounds[ctx.replica_id_in_sync_group + 1]])

        parts = [self.strategy.experimental_distribute_values_from_function(shard(v)) for v in xs]
        ss = self.strategy.experimental_distribute_values_from_function(shard(np.asarray(second)))
        if fn not in self._distributed:
            strategy = self.strategy

            @tf.function(autograph=False)
            def distributed(parts, ss):
                # A plain callable: strategy.run re-wraps tf.functions and would bind PerReplica values.
                return strategy.run(lambda *a: fn(*a), args=(*parts, ss))

            self._distributed[fn] = distributed
        out = self._distributed[fn](parts, ss)
        gather = lambda v: tf.concat(self.strategy.experimental_local_results(v), 0)  # noqa: E731 (replica order)
        R, logits, sums = out
        return [gather(r) for r in R], gather(logits), [gather(v) for v in sums]

    def explain_dataset(self, data, target="auto", *, batch_size: int = 256, out=None, resume: bool = False,
                        progress: bool = True, length: int | None = None, worker=None):
        """Explain a whole dataset in batches, with constant memory when writing to disk.

        Parameters
        ----------
        data : tf.data.Dataset, numpy array, (images, labels) arrays or iterable
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
            ``None``: return the relevance in memory. ``'file.npy'``: write the rows into one
            ``.npy`` batch by batch (needs the length); a finished run leaves it and one sidecar
            ``file.npy.json`` (manifest and per-image summaries; the working folder
            ``file.npy.parts/`` exists only while a run is unfinished). ``'folder'``: one
            ``shard_*.npy`` per batch. Progress is recorded in a manifest after each batch is written. One process writes an output at a
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

    # Concepts (see lrp_grad.concepts)

    def concept_relevance(self, x, target=None, *, layer, condition=None, initial="logit", batch_size=None):
        """Relevance of each channel of ``layer`` (summed over its positions): ``(n, channels)``, or
        a dict per layer for a list of layers. See :func:`lrp_grad.concepts.concept_relevance`."""
        from . import concepts

        return concepts.concept_relevance(self, x, target, layer=layer, condition=condition, initial=initial,
                                          batch_size=batch_size)

    def conditional(self, x, target=None, *, layer=None, channels=None, conditions=None, initial="logit",
                    batch_size=None):
        """Conditional heatmaps ``(n, k, *input_shape)``: the input relevance through each of
        ``channels`` of ``layer`` (or each of ``conditions``), all in one pass. See
        :func:`lrp_grad.concepts.conditional`."""
        from . import concepts

        return concepts.conditional(self, x, target, layer=layer, channels=channels, conditions=conditions,
                                    initial=initial, batch_size=batch_size)

    def subconcepts(self, x, target=None, *, layer, channels, lower, initial="logit", batch_size=None):
        """Relevance of ``lower``'s channels given each of ``channels`` of ``layer``: ``(n, k,
        channels of lower)``. See :func:`lrp_grad.concepts.subconcepts`."""
        from . import concepts

        return concepts.subconcepts(self, x, target, layer=layer, channels=channels, lower=lower, initial=initial,
                                    batch_size=batch_size)

    def forward(self, x) -> np.ndarray:
        """The rewritten model's explained output on ``x`` (the logits: a final softmax or sigmoid
        is skipped)."""
        xs, _ = self._check_inputs(x)
        out, _ = rewrite.run(self._plan((False,) * self.n_inputs), [tf.constant(v) for v in xs])
        return out.numpy()

    def explain_images(self, x, target=None, **kw):
        """Explain a batch of images of a single-input classifier as an :class:`~lrp_grad.Explanation`.

        It holds ``images``, ``relevance``, ``targets`` (the predicted class by default, or
        ``target``: an int or an int array ``(n,)``), ``logits`` and the per-layer ``report``;
        ``.show()`` draws the heatmap grid, and in Jupyter it renders as that grid with per-image and
        per-layer tables. ``kw``: ``batch_size``, ``initial`` as for a call.
        """
        from .explanation import explain_images

        return explain_images(self, x, target, **kw)


def _check_batch_size(batch_size):
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise InvalidInputError(f"batch_size must be a positive int or None, got {batch_size!r}.")


def _explained_dtype(name: str) -> np.dtype:
    """float32/float64 inputs keep their dtype; integer and half-precision inputs are explained in float32."""
    dtype = np.dtype(name) if name != "bfloat16" else None
    return dtype if dtype in (np.dtype(np.float32), np.dtype(np.float64)) else np.dtype(np.float32)


#: ``explain()``'s compiled explainers: model -> {options key: Explainer}. Held weakly by the
#: model, and the cached explainers hold the model only through a weak proxy, so a model that is
#: deleted takes its explainers with it (no leak).
_CACHE = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _option_key(rule, canonizers, jit_compile, compute_dtype, output=None):
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
           jit_compile, compute_dtype, part(output))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _cached_explainer(model, rule, canonizers, jit_compile, compute_dtype, output=None):
    """The Explainer of ``explain()`` for these options, built once per model and options."""
    key = _option_key(rule, canonizers, jit_compile, compute_dtype, output)
    with _CACHE_LOCK:
        try:
            per_model = _CACHE.setdefault(model, {})
        except TypeError:  # not weak-referenceable / hashable: no cache
            per_model, key = None, None
        if key is not None and key in per_model:
            return per_model[key], True
        return _build_cached(model, rule, canonizers, jit_compile, compute_dtype, output, per_model, key)


def _build_cached(model, rule, canonizers, jit_compile, compute_dtype, output, per_model, key):
    ex = Explainer(model, rule=rule, canonizers=canonizers, jit_compile=jit_compile, compute_dtype=compute_dtype,
                   output=output)
    if key is not None:
        ex._plan(True)  # both plans now: later ones would need the model itself
        proxy = weakref.proxy(model)
        ex.model = proxy
        ex._plans = {k: replace(p, graph=replace(p.graph, model=proxy)) for k, p in ex._plans.items()}
        ex._signed_only = True  # mixed input signs use the signed plan (exact for any input)
        per_model[key] = ex
    return ex, key is not None


def _evict(model, ex):
    with _CACHE_LOCK:
        per_model = _CACHE.get(model, {})
        for k, v in list(per_model.items()):
            if v is ex:
                del per_model[k]


def explain(model, x, target=None, *, rule=None, output=None, initial="logit", return_layers: bool = False,
            batch_size: int | None = None, canonizers=None, jit_compile: bool | None = None,
            compute_dtype: str | None = None):
    """Explain ``model``'s decision on the batch ``x`` with LRP in one call.

    See :class:`Explainer` for the parameters. The compiled pass is cached per model and options
    (``rule``, ``output``, ``canonizers``, ``jit_compile``, ``compute_dtype``), so repeated calls cost about
    what an :class:`Explainer` call does; the cache holds models weakly (deleting a model frees
    its explainers). It reads the model's current weights on every call, and registering or
    unregistering a handler starts new entries; a model whose layers were changed in place
    (e.g. a layer's ``activation`` reassigned) needs ``lrp_grad.Explainer`` or a new model.

    Examples
    --------
    >>> R = lrp_grad.explain(model, x)                                    # doctest: +SKIP
    >>> R = lrp_grad.explain(model, x, target=3, rule=lrp_grad.ZPlus())  # doctest: +SKIP
    """
    ex, cached = _cached_explainer(model, rule, canonizers, jit_compile, compute_dtype, output)
    try:
        return ex(x, target, initial=initial, return_layers=return_layers, batch_size=batch_size)
    except StaleExplainerError:
        # A BatchNorm folded through a max pooling needs the scales it had when the plan was
        # built; if training changed their signs since, plan again (once) instead of failing.
        if not cached:
            raise
        _evict(model, ex)
        ex = Explainer(model, rule=rule, canonizers=canonizers, jit_compile=jit_compile, compute_dtype=compute_dtype,
                       output=output)
        return ex(x, target, initial=initial, return_layers=return_layers, batch_size=batch_size)
