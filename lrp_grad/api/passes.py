"""Runs compiled LRP passes: plans per input sign, tracing, XLA buckets, chunking, replicas and memory sizing."""
from __future__ import annotations

import os
import re
import weakref

import numpy as np
import tensorflow as tf

from ..core import planner
from ..core.absorption import warn_if_absorbed
from ..errors import ForkedProcessError, InvalidTargetError, LRPMemoryError, StaleExplainerError
from .report import RelevanceReport
from .request import check_batch_size

__all__ = ["Passes", "pad_to_bucket", "free_memory_bytes", "default_jit", "MULTI_TARGET_ROWS", "raise_if_stale",
           "check_not_forked"]

#: Text of the in-graph check of a BatchNorm folded through a max pooling (canonizers).
FOLD_MARK = "was folded through a max pooling"

#: Rows per call when several targets per image are explained (measured on the seed CNN: larger
#: batches of repeated images were slower than separate calls on this 2-core CPU).
MULTI_TARGET_ROWS = 64


def first_line(message: str, mark: str) -> str:
    """Our own assertion text inside a TensorFlow error message (without TF's decoration)."""
    found = re.search(r"(BatchNormalization \\?'.*?Build a new Explainer\.)", message)
    if found:
        return found.group(1).replace("\\'", "'")
    for line in message.splitlines():
        if mark in line:
            return line.strip()
    return message.splitlines()[0]


#: Set in a child process forked after TensorFlow was initialised in its parent.
_FORKED_FROM = None


def _after_fork_in_child():
    global _FORKED_FROM
    try:
        from tensorflow.python.eager import context  # noqa: PLC0415

        initialised = bool(getattr(context.context(), "_initialized", True))
    except Exception:  # noqa: BLE001 - unknown TF internals: assume initialised (the safe side)
        initialised = True
    if initialised:
        _FORKED_FROM = os.getppid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_not_forked() -> None:
    """Refuse to run TensorFlow in a process forked after its parent initialised TensorFlow: its
    runtime's threads do not survive a fork and the first operation hangs (a TensorFlow
    limitation), so fail at once with the fix instead."""
    if _FORKED_FROM is not None:
        raise ForkedProcessError(
            f"this process was forked (from process {_FORKED_FROM}) after TensorFlow had started in the parent, and "
            "TensorFlow hangs in a forked child. Start worker processes with the 'spawn' (or 'forkserver') start "
            "method: multiprocessing.get_context('spawn').Pool(...) / ProcessPoolExecutor(mp_context="
            "multiprocessing.get_context('spawn')), and build the Explainer inside each worker.")


def raise_if_stale(error: Exception) -> None:
    """Raise :class:`StaleExplainerError` when ``error`` (a ``tf.errors.InvalidArgumentError`` of a
    compiled pass) is the in-graph check of a BatchNorm folded through a max pooling whose scales
    changed sign since the plan was built; return otherwise (the caller re-raises ``error``)."""
    if FOLD_MARK in str(error):
        raise StaleExplainerError(first_line(str(error), FOLD_MARK)) from None


def _custom_gradient_names(graph) -> set:
    """The gradient names ``tf.custom_gradient`` registered for the operations of ``graph``.

    In graph mode (inside a ``tf.function`` trace) every ``tf.custom_gradient`` call registers a
    new, uniquely named gradient function in TensorFlow's global gradient registry and marks its
    ``IdentityN`` operation with that name. The registry never forgets it, and the function holds
    the traced graph's tensors: without :func:`_forget_gradients` each trace would keep ~0.6 MB
    alive for the life of the process (issue 21).
    """
    names = set()
    for op in graph.get_operations():
        if op.type != "IdentityN":
            continue
        try:
            name = op.get_attr("_gradient_op_type")
        except ValueError:
            continue
        names.add(name.decode() if isinstance(name, bytes) else str(name))
    return names


def _forget_gradients(names: set) -> None:
    """Drop the registry entries of a dead :class:`Passes`' traces (their graphs can no longer run)."""
    from tensorflow.python.framework import ops as tf_ops  # the registry has no public handle

    registry = getattr(getattr(tf_ops, "_gradient_registry", None), "_registry", None)
    if isinstance(registry, dict):
        for name in names:
            registry.pop(name, None)
    names.clear()


def activation_elements(graph) -> int:
    """Activation elements per sample: the sum of every call's input sizes (unknown sizes as 1)."""
    elements = 0
    for node in graph.nodes:
        for shape in node.input_shapes:
            dims = list(shape)[1:]
            elements += int(np.prod([d or 1 for d in dims])) if dims else 1
    return max(1, elements)


def pad_to_bucket(a: np.ndarray) -> np.ndarray:
    """Pad the batch axis with zeros up to the next power of two.

    XLA compiles one program per input shape; bucketing bounds that to log2(max batch) programs
    instead of one per distinct batch size. Zero rows give finite relevance and are dropped.
    """
    n = len(a)
    size = 1 << max(n - 1, 0).bit_length()
    if size == n:
        return a
    return np.concatenate([a, np.zeros((size - n,) + a.shape[1:], a.dtype)])


def free_memory_bytes() -> int:
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


def default_jit() -> bool:
    """XLA only on accelerators: on CPU it made conv input-gradients ~3x slower (measured)."""
    return bool(tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"))


def _called_initial(fn, logits, target):
    """``initial(logits, target)`` of a user's callable, checked while the pass is traced: floats
    shaped like the explained output."""
    out = fn(logits, target)
    try:
        r0 = tf.convert_to_tensor(out)
    except (TypeError, ValueError) as e:
        raise InvalidTargetError(f"initial(logits, target) returned {type(out).__name__}, which is not a tensor "
                                 f"({e}); return floats shaped like the logits {tuple(logits.shape)}.") from None
    if not r0.dtype.is_floating:
        raise InvalidTargetError(f"initial(logits, target) returned dtype {r0.dtype.name}; return floats shaped like "
                                 f"the logits {tuple(logits.shape)} (e.g. tf.cast(..., logits.dtype)).")
    if not r0.shape.is_compatible_with(logits.shape):
        raise InvalidTargetError(f"initial(logits, target) returned shape {tuple(r0.shape)}; it must be the logits' "
                                 f"shape {tuple(logits.shape)} (one value per output, per sample).")
    return tf.cast(r0, logits.dtype)


class Passes:
    """The compiled passes of one explainer: a plan per input-sign pattern and a ``tf.function``
    per kind of request, built on first use and reused.

    Parameters
    ----------
    model, rule, canonizers, compute_dtype, output
        What :func:`lrp_grad.core.planner.build_plan` needs (see :class:`~lrp_grad.Explainer`).
    signature : lrp_grad.api.request.Signature
        The model's inputs and explained output.
    jit_compile : bool
    strategy : tf.distribute.Strategy or None
    first_plan : lrp_grad.core.planner.Plan
        The plan for signed inputs, already built (the Explainer builds it first, for early errors).
    """

    #: Bytes an explanation keeps per activation element and sample: the forward value, the
    #: relevance and the rules' temporaries (z, z+, the stabilised denominator), in float32.
    BYTES_PER_ACTIVATION = 6 * 4
    #: Share of the free memory one batch may take.
    MEMORY_SHARE = 0.25

    def __init__(self, model, rule, canonizers, compute_dtype, output, signature, jit_compile, strategy, first_plan):
        self.model = model
        self.rule = rule
        self.canonizers = canonizers
        self.compute_dtype = compute_dtype
        self.output = output
        self.signature = signature
        self.jit_compile = jit_compile
        self.strategy = strategy
        self.plans = {(False,) * signature.n_inputs: first_plan}
        #: Whether mixed input signs use the signed plan (set for ``explain()``'s cached explainers,
        #: which hold the model weakly and cannot plan again).
        self.signed_only = False
        #: Compiled functions by request kind (concepts add theirs here too).
        self.functions = {}
        #: How many times a compiled pass was traced (for retracing checks).
        self.trace_count = 0
        #: With XLA: the padded batch sizes compiled so far (powers of two; see pad_to_bucket).
        self.compiled_batch_sizes = set()
        self._concrete = {}
        self._distributed = {}
        self._auto_batch = None
        #: The gradient-registry names of this object's traces, dropped when it is collected.
        self._gradient_names = set()
        weakref.finalize(self, _forget_gradients, self._gradient_names)

    def traced(self, graph=None) -> None:
        """Record a trace: called at the end of every compiled pass's Python function (also by
        the concept passes), so that :attr:`trace_count` counts traces and the custom gradients
        the trace registered are released with this object."""
        self.trace_count += 1
        graph = tf.compat.v1.get_default_graph() if graph is None else graph
        self._gradient_names |= _custom_gradient_names(graph)

    def key(self, input_nonneg) -> tuple:
        """The plan key: one flag per input, from one flag or a tuple."""
        n = self.signature.n_inputs
        return input_nonneg if isinstance(input_nonneg, tuple) else (bool(input_nonneg),) * n

    def plan(self, input_nonneg):
        """The plan for inputs of this sign (``True``: every element >= 0), built on first use."""
        key = self.key(input_nonneg)
        if key not in self.plans and self.signed_only:
            key = (False,) * self.signature.n_inputs
        if key not in self.plans:
            self.plans[key] = planner.build_plan(
                self.model, self.rule, input_nonneg=key, canonizers=self.canonizers,
                compute_dtype=self.compute_dtype, output=self.output,
            )
        return self.plans[key]

    @property
    def signed_plan(self):
        """The plan for inputs of any sign (the one the Explainer built first)."""
        return self.plans[(False,) * self.signature.n_inputs]

    # -----------------------------------------------------------------------------------------
    # Building

    def function(self, input_nonneg, mode, return_layers: bool, select="index", mask_shape=None):
        """``(fn, steps)``: the compiled pass ``fn(*inputs, second) -> (relevances, output, per-layer sums)``.

        ``select``: how the explained quantity is chosen: ``'index'`` (``second`` holds a class /
        channel index per sample, ``-1`` the predicted class), ``'mask'`` (``second`` is a mask
        of shape ``mask_shape`` multiplied with the output) or ``'array'`` (``second`` is the
        initial relevance itself; ``mode == 'array'``).
        """
        input_nonneg = self.key(input_nonneg)
        if mode == "array":
            select = "array"
        mask_shape = None if mask_shape is None else tuple(mask_shape[1:])  # any number of rows
        key = (input_nonneg, mode, return_layers, select, mask_shape)
        if key in self.functions:
            return self.functions[key]
        plan = self.plan(input_nonneg)
        specs = self.input_specs()
        second = self.second_spec(select, mask_shape)

        def lrp_pass(*args):
            xs, target_or_r0 = list(args[:-1]), args[-1]
            with tf.GradientTape() as tape:
                for x in xs:
                    tape.watch(x)
                logits, layers = planner.run(plan, xs, collect=return_layers)
            r0 = self.initial_relevance(logits, target_or_r0, select, mode)
            # Shape computations (integers, no batch axis: a class token's tf.shape(x)[0]) carry no
            # relevance; the report shows zeros for them.
            carried = [t for t in layers.values() if t.dtype.is_floating and t.shape.rank]
            grads = tape.gradient(
                logits, xs + carried, output_gradients=r0, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            per_sample = iter(tf.reduce_sum(tf.reshape(g, [tf.shape(g)[0], -1]), -1) for g in grads)
            batch = tf.shape(xs[0])[0]
            sums = [next(per_sample) for _ in xs] + [
                next(per_sample) if (t.dtype.is_floating and t.shape.rank) else tf.zeros([batch], logits.dtype)
                for t in layers.values()]
            if len(xs) > 1:  # the inputs' total first: conservation holds over all inputs together
                sums = [tf.add_n(sums[:len(xs)])] + sums
            self.traced()  # runs only while tracing
            return tuple(grads[:len(xs)]), logits, sums

        # autograph=False: the pass has no tensor-dependent Python control flow to convert.
        fn = tf.function(lrp_pass, input_signature=specs + [second], jit_compile=self.jit_compile, autograph=False)
        self.functions[key] = (fn, list(plan.steps))
        return self.functions[key]

    def input_specs(self) -> list:
        s = self.signature
        return [tf.TensorSpec((None,) + tuple(shape), dtype) for shape, dtype in zip(s.input_shapes, s.dtypes)]

    def second_spec(self, select, mask_shape):
        """The ``TensorSpec`` of the compiled pass's last argument (see :meth:`function`)."""
        s = self.signature
        if select == "array":
            return tf.TensorSpec((None,) + s.output_shape, s.dtype)
        if select == "mask":
            return tf.TensorSpec((None,) + tuple(mask_shape), s.dtype)
        return tf.TensorSpec((None,), tf.int32)

    def initial_relevance(self, logits, target_or_r0, select, mode):
        """The relevance at the explained output, inside the compiled pass (no gradient through it)."""
        if select == "array":
            return tf.stop_gradient(tf.cast(target_or_r0, logits.dtype))
        n_classes, rank = self.signature.n_classes, len(self.signature.output_shape) + 1
        if select == "mask":
            chosen = tf.cast(target_or_r0, logits.dtype)
            target = target_or_r0
        else:
            if self.signature.is_classifier:
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
            r0 = _called_initial(mode, logits, target)
            r0 = tf.ensure_shape(r0, logits.shape)
        return tf.stop_gradient(r0)

    def report_labels(self, steps) -> list:
        s = self.signature
        if s.n_inputs == 1:
            return [self.signed_plan.graph.input_name] + [st.node.label for st in steps]
        return ["inputs (total)", *s.input_names] + [st.node.label for st in steps]

    # -----------------------------------------------------------------------------------------
    # Running

    def explained(self, xs, mode, select, second, return_layers: bool, batch_size):
        """``(relevance per input, output, RelevanceReport or None)`` of checked inputs ``xs`` for one
        selection per sample, in batches of ``batch_size`` (default :meth:`auto_batch_size`)."""
        n = xs[0].shape[0]
        batch_size = check_batch_size(batch_size)
        input_nonneg = tuple(bool(np.all(v >= 0)) for v in xs)
        fn, steps = self.function(input_nonneg, mode, return_layers, select,
                                  second.shape if select == "mask" else None)
        shared = select == "mask" and second.shape[0] == 1
        step = min(n, self.auto_batch_size(xs[0].shape[1:])) if batch_size is None else batch_size
        parts, outputs, sums = [], [], []
        for start in range(0, n, step):
            rows = [v[start:start + step] for v in xs]
            s = np.broadcast_to(second, (len(rows[0]),) + second.shape[1:]) if shared else second[start:start + step]
            R, logits, layer_sums = self.run_batch(fn, rows, s)
            parts.append(R)
            outputs.append(logits)
            sums.append(layer_sums)
        R = [p[0] if len(parts) == 1 else np.concatenate(p) for p in zip(*parts)]
        logits = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        self.check_absorbed(logits, mode, select, second, np.concatenate([b[0] for b in sums]))
        if not return_layers:
            return R, logits, None
        labels = self.report_labels(steps)
        return R, logits, RelevanceReport({k: np.concatenate([b[i] for b in sums]) for i, k in enumerate(labels)})

    def check_absorbed(self, logits, mode, select, second, input_sums):
        """Warn when the stabiliser absorbed the relevance of a tiny explained output (see
        :mod:`lrp_grad.core.absorption`), from the input relevance sums the pass returns and one
        product with the output; a callable or explicit initial relevance is not checked."""
        if not (isinstance(mode, str) and mode in ("logit", "one")) or select == "array":
            return
        n = len(logits)
        if select == "mask":
            chosen = np.broadcast_to(np.asarray(second, logits.dtype), logits.shape)
        else:
            t = np.asarray(second)
            if self.signature.is_classifier:
                t = np.where(t < 0, logits.argmax(-1), t)
            classes = logits.shape[-1]
            chosen = (np.arange(classes) == t[:, None]).reshape((n,) + (1,) * (logits.ndim - 2) + (classes,))
        explained = (logits * chosen).reshape(n, -1).sum(1)
        if mode == "logit":
            initial = explained
            of_what = "the explained logit" if self.signature.is_classifier and select == "index" else \
                "the explained output"
        else:
            initial = np.broadcast_to(chosen, logits.shape).reshape(n, -1).sum(1)
            of_what = "the initial relevance"
        warn_if_absorbed(input_sums, explained, initial, of_what, stacklevel=5)  # the user's Explainer call

    def run_batch(self, fn, xs, second):
        """``(relevances, logits, per-layer sums)`` of one batch as numpy, padded to an XLA bucket."""
        rows = len(xs[0])
        if self.jit_compile:
            xs, second = [pad_to_bucket(v) for v in xs], pad_to_bucket(np.asarray(second))
            self.compiled_batch_sizes.add(len(xs[0]))
        try:
            R, logits, sums = self.run(fn, xs, second)
        except tf.errors.InvalidArgumentError as e:
            raise_if_stale(e)
            raise
        except tf.errors.ResourceExhaustedError:
            raise LRPMemoryError(
                f"out of memory explaining a batch of {rows} samples of shape {tuple(xs[0].shape[1:])} with model "
                f"{self.signature.model_name!r}; pass a smaller batch_size= (e.g. batch_size={max(1, rows // 4)})."
            ) from None
        return [r.numpy()[:rows] for r in R], logits.numpy()[:rows], [v.numpy()[:rows] for v in sums]

    def run(self, fn, xs, second):
        """Call the compiled pass on one batch, split across the strategy's replicas if any."""
        check_not_forked()
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

    def auto_batch_size(self, sample_shape=None) -> int:
        """The default batch size: a quarter of the free memory over an estimate of one sample's need.

        One sample needs about :attr:`BYTES_PER_ACTIVATION` bytes per activation element of
        every layer (the sum of the layers' input sizes; about 5x what VGG16 was measured to
        take, on purpose); the free memory is the machine's available RAM (``/proc/meminfo``;
        4 GiB assumed on a GPU). At least 1, at most 4096. A model with unknown input sizes
        (``Input((None, None, 3))``) counts its unknown sizes as 1 and scales the estimate by the
        size of ``sample_shape`` (one sample of the batch being explained), when given.
        """
        if self._auto_batch is None:
            itemsize = np.dtype(self.signature.dtype).itemsize
            self._per_sample = activation_elements(self.signed_plan.graph) * self.BYTES_PER_ACTIVATION * itemsize / 4
            self._auto_batch = self._fitting(self._per_sample)
        known = [d for d in self.signature.input_shape if d is not None]
        if sample_shape is None or len(known) == len(self.signature.input_shape):
            return self._auto_batch
        assumed = int(np.prod([d or 1 for d in self.signature.input_shape]))
        actual = int(np.prod(sample_shape))
        return self._fitting(self._per_sample * max(1.0, actual / max(1, assumed)))

    def _fitting(self, per_sample: float) -> int:
        return int(np.clip(free_memory_bytes() * self.MEMORY_SHARE // per_sample, 1, 4096))
