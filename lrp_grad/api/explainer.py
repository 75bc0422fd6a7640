"""The :class:`Explainer` facade: checks the options, builds the first plan, and ties request checks to compiled passes."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from .. import concepts
from ..core import planner
from ..core.canonizers import Canonizer
from ..core.presets import as_composite
from ..core.rules import AlphaBeta
from ..frontends import check_model
from ..pipelines import export as _export, stream
from ..visual import explanation
from .passes import MULTI_TARGET_ROWS, Passes, check_not_forked, default_jit
from .report import RelevanceReport
from .request import Signature

__all__ = ["Explainer", "RelevanceReport", "DEFAULT_RULE"]

#: The seed report's a/b rule with a = 2, b = 1.
DEFAULT_RULE = AlphaBeta(2.0, 1.0)


def _signature_property(name: str, doc: str):
    return property(lambda self: getattr(self.signature, name), doc=doc)


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
        check_not_forked()  # before any TensorFlow call: it would hang in a forked child
        # 1. Check the options, then the model (once; the planner trusts it).
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
        self.jit_compile = default_jit() if jit_compile is None else jit_compile
        # 2. The plan for signed inputs now, so that unsupported layers are reported at construction.
        first = planner.build_plan(model, rule, input_nonneg=False, canonizers=canonizers,
                                   compute_dtype=compute_dtype, output=output)
        # 3. What a request is checked against, and the compiled passes that answer it.
        #: The model's inputs and explained output (:class:`~lrp_grad.api.request.Signature`).
        self.signature = Signature.of(model.name, first.graph)
        #: Plans and compiled functions (:class:`~lrp_grad.api.passes.Passes`).
        self.passes = Passes(model, rule, canonizers, compute_dtype, output, self.signature, self.jit_compile,
                             strategy, first)

    n_inputs = _signature_property("n_inputs", "Number of model inputs.")
    input_names = _signature_property("input_names", "The model inputs' names, in order.")
    input_shapes = _signature_property("input_shapes", "Per input: its shape without the batch axis.")
    input_shape = _signature_property("input_shape", "The (first) input's shape without the batch axis.")
    dtypes = _signature_property("dtypes", "Per input: the dtype it is explained in (integer and half inputs: float32).")
    dtype = _signature_property("dtype", "The (first) input's explained dtype.")
    output_name = _signature_property("output_name", "Name of the explained output (an output or hidden layer).")
    output_shape = _signature_property("output_shape", "Shape of the explained output without the batch axis.")
    n_classes = _signature_property("n_classes", "Size of the output's last axis (classes or channels), or None.")
    is_classifier = _signature_property("is_classifier", "Whether the explained output is (batch, classes).")

    def __repr__(self):
        out = "" if self.output is None else f", output={self.output!r}"
        return f"Explainer(model={self.model.name!r}{out}, rule={self.rule.name}, jit_compile={self.jit_compile})"

    @property
    def rules(self):
        """:class:`~lrp_grad.composites.RuleMap` layer -> rule (what will happen; printable)."""
        return self.passes.signed_plan.rules

    @property
    def rules_graph(self):
        """The canonized graph the explainer runs (the signed-input plan's)."""
        return self.passes.signed_plan.graph

    @property
    def trace_count(self) -> int:
        """How many times a compiled pass was traced (for retracing checks)."""
        return self.passes.trace_count

    @property
    def compiled_batch_sizes(self) -> set:
        """With XLA: the padded batch sizes compiled so far (powers of two)."""
        return self.passes.compiled_batch_sizes

    def auto_batch_size(self) -> int:
        """The default batch size, from the model's activation size and the free memory (see
        :meth:`lrp_grad.api.passes.Passes.auto_batch_size`)."""
        return self.passes.auto_batch_size()

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
            ``(n, 1)`` integer array is refused as ambiguous, and so is an integer ``(n, classes)``
            array of 0s and 1s (``np.eye(classes, dtype=int)[y]``: pass ``y``, or a float mask). A float or bool array is a *mask*
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
        xs, structure = self.signature.inputs(x)
        n = xs[0].shape[0]
        per_class = self.signature.per_class_targets(target, n)
        if per_class is None:
            R, _, report = self.explain_checked(xs, target, initial, return_layers, batch_size)
            R = self.signature.pack(R, structure)
            return (R, report) if return_layers else R
        # k targets of the same images: the images repeated k times, in batches of at least
        # MULTI_TARGET_ROWS rows (few images: one call instead of k; many: no giant batch).
        k = per_class.shape[1]
        repeated = [np.repeat(v, k, axis=0) for v in xs]
        rows = batch_size if batch_size is not None else min(max(n, MULTI_TARGET_ROWS),
                                                             self.passes.auto_batch_size(xs[0].shape[1:]))
        R, _, report = self.explain_checked(repeated, per_class.reshape(-1), initial, return_layers, rows)
        R = self.signature.pack([p.reshape((n, k) + v.shape[1:]) for p, v in zip(R, xs)], structure)
        if not return_layers:
            return R
        return R, RelevanceReport({name: v.reshape(n, k) for name, v in report.items()})

    def explain_checked(self, xs, target, initial, return_layers: bool, batch_size):
        """``(relevance per input, output, RelevanceReport or None)`` of inputs that
        :meth:`Signature.inputs` checked, for one target per sample (the product's entry point)."""
        mode, select, second = self.signature.selection(target, initial, xs[0].shape[0])
        return self.passes.explained(xs, mode, select, second, return_layers, batch_size)

    def _explain_with_logits(self, x, target):
        """``(relevance, logits)`` of one batch that :func:`lrp_grad.stream._check_block` already
        checked (shape, dtype, finite values): only cast here, not checked a second time on the
        streaming hot path. ``target`` ``None`` = predicted."""
        x = np.asarray(x).astype(self.dtype, copy=False)
        _, t = self.signature.target(target, len(x))
        fn, _ = self.passes.function(bool(np.all(x >= 0)), "logit", False)
        (R,), logits, _ = self.passes.run_batch(fn, [x], t)
        return R, logits

    def forward(self, x) -> np.ndarray:
        """The rewritten model's explained output on ``x`` (the logits: a final softmax or sigmoid
        is skipped)."""
        xs, _ = self.signature.inputs(x)
        out, _ = planner.run(self.passes.signed_plan, [tf.constant(v) for v in xs])
        return out.numpy()

    # -----------------------------------------------------------------------------------------
    # The product around a call: datasets, export, concepts, notebooks

    def explain_dataset(self, data, target="auto", *, batch_size: int = 256, out=None, resume: bool = False,
                        progress: bool = True, length: int | None = None, worker=None):
        """Explain a whole dataset in batches, with constant memory when writing to disk; see
        :func:`lrp_grad.stream.explain_dataset` for the parameters."""
        return stream.explain_dataset(self, data, target, batch_size, out, resume, progress, length, worker)

    def export(self, path):
        """Write a TensorFlow SavedModel with ``explain(images, target)`` and ``serving_default(images)``
        signatures (relevance and logits); it loads and runs without lrp_grad. ``path`` must be a new or
        empty folder outside the model's own file (nothing is overwritten). See :func:`lrp_grad.export.export`."""
        return _export.export(self, path)

    def concept_relevance(self, x, target=None, *, layer, condition=None, initial="logit", batch_size=None):
        """Relevance of each channel of ``layer`` (summed over its positions): ``(n, channels)``, or
        a dict per layer for a list of layers. See :func:`lrp_grad.concepts.concept_relevance`."""
        return concepts.concept_relevance(self, x, target, layer=layer, condition=condition, initial=initial,
                                          batch_size=batch_size)

    def conditional(self, x, target=None, *, layer=None, channels=None, conditions=None, initial="logit",
                    batch_size=None):
        """Conditional heatmaps ``(n, k, *input_shape)``: the input relevance through each of
        ``channels`` of ``layer`` (or each of ``conditions``), all in one pass. See
        :func:`lrp_grad.concepts.conditional`."""
        return concepts.conditional(self, x, target, layer=layer, channels=channels, conditions=conditions,
                                    initial=initial, batch_size=batch_size)

    def subconcepts(self, x, target=None, *, layer, channels, lower, initial="logit", batch_size=None):
        """Relevance of ``lower``'s channels given each of ``channels`` of ``layer``: ``(n, k,
        channels of lower)``. See :func:`lrp_grad.concepts.subconcepts`."""
        return concepts.subconcepts(self, x, target, layer=layer, channels=channels, lower=lower, initial=initial,
                                    batch_size=batch_size)

    def explain_images(self, x, target=None, **kw):
        """Explain a batch of images of a single-input classifier as an :class:`~lrp_grad.Explanation`.

        It holds ``images``, ``relevance``, ``targets`` (the predicted class by default, or
        ``target``: an int or an int array ``(n,)``), ``logits`` and the per-layer ``report``;
        ``.show()`` draws the heatmap grid, and in Jupyter it renders as that grid with per-image and
        per-layer tables. ``kw``: ``batch_size``, ``initial`` as for a call.
        """
        return explanation.explain_images(self, x, target, **kw)
