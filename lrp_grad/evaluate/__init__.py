"""Faithfulness metrics: the seed report's pixel flipping, perturbation curves and AOPC.

Shared helpers (probabilities, relevance per pixel, labels) are in :mod:`lrp_grad.evaluate.common`.
Region perturbation in both orders with data-independent baselines, and the symmetric relevance
gain scored from it, and insertion curves live in :mod:`lrp_grad.evaluate.region`; batched gradient
baselines (gradient, gradient x input, integrated gradients, SmoothGrad) in
:mod:`lrp_grad.evaluate.baselines`; the model-parameter randomisation check in
:mod:`lrp_grad.evaluate.randomization`; the table comparing methods by SRG with standard errors
in :mod:`lrp_grad.evaluate.compare` (all re-exported here).

Every metric works on any attribution (LRP, gradient, LIME, random) given as an array shaped like
the input; pixels are ranked by their relevance summed over channels, and all channels of a
pixel are perturbed together. Models are called in batches; nothing loops over pixels.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field

import numpy as np

from .baselines import gradient, gradient_x_input, integrated_gradients, logit_function, smoothgrad
from .common import _labels, pixel_relevance, probabilities
from .compare import DEFAULT_METHODS, FaithfulnessRow, FaithfulnessTable, faithfulness_table, method_names
from .randomization import RandomizationResult, randomization_check, rank_correlation, weighted_layers
from .region import BASELINES, ORDERS, OUTPUTS, curve_area, insertion, patch_ranks, region_perturbation, srg

__all__ = ["probabilities", "pixel_relevance", "FlipResult", "seed_flip", "perturbation_curve", "aopc",
           "attribution", "METHODS",
           # region perturbation and the symmetric relevance gain (region.py)
           "region_perturbation", "srg", "curve_area", "patch_ranks", "BASELINES", "ORDERS", "OUTPUTS",
           # insertion curves (region.py), gradient baselines (baselines.py), model randomisation (randomization.py)
           "insertion", "gradient", "gradient_x_input", "integrated_gradients", "smoothgrad", "logit_function",
           # the comparison table (compare.py)
           "faithfulness_table", "FaithfulnessTable", "FaithfulnessRow", "DEFAULT_METHODS", "method_names",
           "randomization_check", "RandomizationResult", "rank_correlation", "weighted_layers"]


def _true_prob(model, x, y):
    return probabilities(model, x)[np.arange(len(y)), y]


def _perturb(x, pixels, mode, rng):
    """Perturb the flat pixel indices ``pixels`` (n, k) of every image, all channels together."""
    n, h, w = x.shape[:3]
    flat = x.reshape(n, h * w, -1).copy()
    rows = np.arange(n)[:, None]
    if mode == "flip":
        flat[rows, pixels] = -flat[rows, pixels]
    elif mode == "zero":
        flat[rows, pixels] = 0
    elif mode == "uniform":
        low, high = float(x.min()), float(x.max())
        flat[rows, pixels] = rng.uniform(low, high, flat[rows, pixels].shape)
    else:
        raise ValueError(f"perturbation must be 'flip', 'zero' or 'uniform', got {mode!r}.")
    return flat.reshape(x.shape)


@dataclass
class FlipResult:
    """The seed report's pixel-flipping statistics (its section 5.1) over a set of images."""

    which: str
    k: int
    changes: np.ndarray = field(repr=False)  # per image: p(true class) after - before

    @property
    def mean(self) -> float:
        return float(self.changes.mean())

    @property
    def std(self) -> float:
        return float(self.changes.std())

    @property
    def improved(self) -> float:
        """Fraction of images whose true-class probability went up."""
        return float(np.mean(self.changes > 0))

    @property
    def worse(self) -> float:
        """Fraction of images whose true-class probability went down."""
        return float(np.mean(self.changes < 0))

    @property
    def max(self) -> float:
        return float(self.changes.max())

    @property
    def min(self) -> float:
        return float(self.changes.min())

    def summary(self) -> dict:
        return {"flipped": f"{self.k} {self.which}", "mean": self.mean, "std": self.std, "improved": self.improved,
                "worse": self.worse, "max": self.max, "min": self.min, "n": int(len(self.changes))}


def seed_flip(model, x, y, relevance, k: int = 10, which: str = "lowest") -> FlipResult:
    """The seed report's protocol: per image flip (multiply by -1) the ``k`` pixels with the lowest
    (or highest) relevance, re-predict, and record the change of the true class's softmax probability.

    Parameters
    ----------
    model : tf_keras.Model
    x : array (n, H, W[, C])
        Images as the model takes them.
    y : array of int (n,)
        True classes.
    relevance : array like ``x``
        Attribution for the true class.
    k : int
        Pixels to flip per image (10 in the report).
    which : {'lowest', 'highest'}
    """
    if which not in ("lowest", "highest"):
        raise ValueError(f"which must be 'lowest' or 'highest', got {which!r}.")
    x = np.asarray(x)
    y = _labels(y, len(x), "seed_flip")
    if np.shape(relevance)[:3] != x.shape[:3]:
        raise ValueError(f"relevance shape {np.shape(relevance)} does not match x shape {x.shape}.")
    scores = pixel_relevance(relevance).reshape(len(x), -1)
    order = np.argsort(scores, axis=1, kind="stable")
    pixels = order[:, :k] if which == "lowest" else order[:, ::-1][:, :k]
    before = _true_prob(model, x, y)
    after = _true_prob(model, _perturb(x, pixels, "flip", None), y)
    return FlipResult(which, k, after - before)


def perturbation_curve(model, x, y, relevance, steps: int = 20, pixels_per_step: int = 8,
                       perturbation: str = "zero", seed: int = 0) -> np.ndarray:
    """True-class probability while the most relevant pixels are perturbed first.

    Returns an array ``(n, steps + 1)``: column 0 is the unperturbed probability, column ``s``
    the probability after perturbing the ``s * pixels_per_step`` most relevant pixels (all
    channels of a pixel together). ``perturbation`` is ``'zero'``, ``'flip'`` (x -> -x, the
    seed's) or ``'uniform'`` (uniform noise in the data range).
    """
    x = np.asarray(x)
    y = _labels(y, len(x), "perturbation_curve")
    rng = np.random.default_rng(seed)
    order = np.argsort(-pixel_relevance(relevance).reshape(len(x), -1), axis=1, kind="stable")
    curve = [_true_prob(model, x, y)]
    current = x
    for s in range(steps):
        chunk = order[:, s * pixels_per_step:(s + 1) * pixels_per_step]
        current = _perturb(current, chunk, perturbation, rng)
        curve.append(_true_prob(model, current, y))
    return np.stack(curve, axis=1)


def aopc(curve) -> np.ndarray:
    """Area over the perturbation curve per image: mean over steps of ``p_0 - p_step``
    (Samek et al. 2017). Higher means the ranking found the decisive pixels sooner."""
    curve = np.asarray(curve)
    return (curve[:, :1] - curve[:, 1:]).mean(axis=1)


# ---------------------------------------------------------------------------------------------
# Attribution methods to compare on the same model and images


def _lime(model, x, y, num_samples=500, seed=0, progress=None):
    try:
        from lime import lime_image
        from skimage.segmentation import quickshift  # noqa: F401 (lime needs scikit-image)
    except ImportError:
        raise ImportError("the 'lime' comparison needs the PyPI package 'lime': pip install lime") from None
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    gray = x.shape[-1] == 1
    # Small images need small segments: quickshift with kernel 1-2 gives ~20-60 superpixels at 28-32 px.
    segmenter = SegmentationAlgorithm("quickshift", kernel_size=1, max_dist=4, ratio=0.2, random_seed=seed)
    explainer = lime_image.LimeImageExplainer(random_state=seed)
    scale = float(x.max()) or 1.0

    def predict(batch):  # lime passes RGB images in the [0, 1]-ish range of what we gave it
        batch = batch[..., :1] if gray else batch
        return probabilities(model, (batch * scale).astype(np.float32))

    maps = np.zeros(x.shape[:3], np.float64)
    for i in range(len(x)):
        image = x[i] / scale
        rgb = np.repeat(image, 3, -1) if gray else image
        with contextlib.redirect_stderr(io.StringIO()):  # lime draws a progress bar per image
            exp = explainer.explain_instance(rgb.astype(np.float64), predict, labels=(int(y[i]),), top_labels=None,
                                             hide_color=0, num_samples=num_samples, segmentation_fn=segmenter)
        weights = dict(exp.local_exp[int(y[i])])
        maps[i] = np.vectorize(lambda s: weights.get(s, 0.0))(exp.segments)
        if progress is not None:
            progress(i + 1, len(x))
    return maps[..., None].repeat(x.shape[-1], -1) / x.shape[-1]


#: Names :func:`attribution` understands besides LRP rules/presets.
METHODS = ("gradient", "gradient_x_input", "integrated_gradients", "smoothgrad", "random", "lime")


def attribution(model, x, y, method, seed: int = 0, lime_samples: int = 500, progress=None):
    """``(relevance, seconds per image)`` of ``method`` for the classes ``y``.

    ``method`` is one of :data:`METHODS` (the gradient methods with the defaults of
    :func:`gradient`, :func:`gradient_x_input`, :func:`integrated_gradients` and :func:`smoothgrad`:
    all of them explain the logit, the input of a final softmax/sigmoid, like LRP), or anything ``lrp_grad.explain(rule=...)`` accepts
    (a rule, a composite or a preset name). ``progress(done, total)`` is called after each image
    of the per-image methods (LIME).
    """
    from ..api.explainer import Explainer

    x = np.asarray(x, dtype=np.float32)
    y = _labels(y, len(x), "attribution")
    start = time.perf_counter()
    if isinstance(method, str) and method == "gradient":
        r = gradient(model, x, y)
    elif isinstance(method, str) and method == "gradient_x_input":
        r = gradient_x_input(model, x, y)
    elif isinstance(method, str) and method == "integrated_gradients":
        r = integrated_gradients(model, x, y)  # defaults: 32 steps, zero baseline, logits
    elif isinstance(method, str) and method == "smoothgrad":
        r = smoothgrad(model, x, y, seed=seed)  # defaults: 16 samples, noise 0.15 of the range, logits
    elif isinstance(method, str) and method == "random":
        r = np.random.default_rng(seed).normal(size=x.shape)
    elif isinstance(method, str) and method == "lime":
        r = _lime(model, x, y, lime_samples, seed, progress)
    else:
        ex = Explainer(model, rule=method)
        ex(x[:1], target=y[:1])  # trace once, so the timing is the explanation, not the compile
        start = time.perf_counter()
        r = ex(x, target=y, batch_size=256)
    return r, (time.perf_counter() - start) / len(x)
