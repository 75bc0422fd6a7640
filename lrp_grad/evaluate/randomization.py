"""Model-parameter randomisation check (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

A map that explains the model must change when the model's parameters are destroyed. The check
clones the model (the user's model and its weights are never touched), re-initialises its weighted
layers one after another from the output down (a *cascade*: after step ``j`` the top ``j`` weighted
layers are random), explains again after every step, and measures per image how similar each new
map is to the map of the original model.

Definitions (the tests pin them):

* **Weighted layer**: a layer owning at least one weight of two or more dimensions (a kernel:
  Dense, convolutions, embeddings, attention); layers of nested models count, in forward order.
  Normalisation layers (only 1-D weights) are left as they are.
* **Re-initialisation**: every weight of two or more dimensions of the layer gets Glorot-uniform
  values (Keras's default kernel initialiser; fan-in = product of all but the last axis, fan-out =
  last axis times the receptive field), every 1-D weight (biases) zeros; drawn from one
  ``np.random.default_rng(seed)`` in the cascade's order.
* **Similarity**: Spearman rank correlation, per image, of the absolute relevance per pixel
  (relevance summed over channels, then ``abs``); ties get their average rank. ``nan`` when a map
  is constant (its ranks carry no order).
"""
from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass, field

import numpy as np

from ..errors import UnsupportedModelError
from .common import pixel_relevance

__all__ = ["randomization_check", "RandomizationResult", "rank_correlation", "weighted_layers"]


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 0..m-1 of the entries of ``v`` (1-D), tied entries getting the mean of their ranks."""
    order = np.argsort(v, kind="stable")
    s = v[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    mean_rank = (starts + ends - 1) / 2.0
    ranks = np.empty(len(v))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def rank_correlation(a, b) -> np.ndarray:
    """Per image Spearman rank correlation of ``|relevance per pixel|`` of two maps ``(n, H, W[, C])``.

    Returns float64 ``(n,)`` in ``[-1, 1]``; ``nan`` for an image whose map is constant in ``a`` or ``b``.
    """
    if np.shape(a) != np.shape(b):
        raise ValueError(f"rank_correlation: the maps have shapes {np.shape(a)} and {np.shape(b)}; pass two maps of "
                         "the same images, shaped alike.")
    pa = np.abs(pixel_relevance(a)).reshape(len(a), -1)
    pb = np.abs(pixel_relevance(b)).reshape(len(b), -1)
    out = np.empty(len(pa))
    for i in range(len(pa)):
        ra, rb = _average_ranks(pa[i]), _average_ranks(pb[i])
        ra, rb = ra - ra.mean(), rb - rb.mean()
        denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
        out[i] = (ra * rb).sum() / denominator if denominator > 0 else np.nan
    return out


def _all_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers and layer is not model:
            yield from _all_layers(layer)
        else:
            yield layer


def weighted_layers(model) -> list:
    """The layers :func:`randomization_check` re-initialises, in forward order (nested models expanded)."""
    return [layer for layer in _all_layers(model) if any(len(w.shape) >= 2 for w in layer.weights)]


def _glorot(shape, rng) -> np.ndarray:
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in = int(np.prod(shape[:-1]))
    fan_out = int(shape[-1]) * receptive
    limit = np.sqrt(6.0 / max(fan_in + fan_out, 1))
    return rng.uniform(-limit, limit, shape)


def _reinitialise(layer, rng):
    layer.set_weights([_glorot(w.shape, rng) if w.ndim >= 2 else np.zeros_like(w) for w in layer.get_weights()])


def _clone(model, where):
    from ..frontends import package_of

    name = package_of(model)
    if name is None:
        raise UnsupportedModelError(f"{where}: model {model!r} is neither a Keras 3 nor a tf-keras model; pass a "
                                    "keras.Model or tf_keras.Model.")
    K = importlib.import_module(name)
    try:
        copy = K.models.clone_model(model)
        copy.set_weights(model.get_weights())
    except Exception as e:  # noqa: BLE001 - subclassed models and the like: say what to do
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UnsupportedModelError(
            f"{where}: model {model.name!r} cannot be cloned with {name}.models.clone_model ({type(e).__name__}: "
            f"{first}); "
            "the check needs a copy to randomise: pass a functional or Sequential model.") from e
    return copy


@dataclass
class RandomizationResult:
    """Similarities of a cascading model-parameter randomisation.

    ``similarity[0]``: map of the (unrandomised) clone vs the original map, 1 up to rounding (a
    check that the copy is faithful). ``similarity[j]`` for ``j >= 1``: after re-initialising
    ``layers[:j]`` (top layer first). Shape ``(len(layers) + 1, n)``.
    """

    layers: tuple
    similarity: np.ndarray = field(repr=False)

    @property
    def mean(self) -> np.ndarray:
        """Mean similarity over images per cascade step, ``(len(layers) + 1,)``."""
        return np.nanmean(self.similarity, axis=1)


def randomization_check(explain_fn, model, x, *, layers: int | None = None, seed: int = 0) -> RandomizationResult:
    """Cascading model-parameter randomisation (Adebayo et al. 2018).

    Parameters
    ----------
    explain_fn : callable
        ``explain_fn(model, x) -> relevance`` shaped ``(n, H, W[, C])``; called on the original
        model once and on a clone once per cascade step. Fix the explained class inside it (e.g.
        ``lambda m, x: lrp_grad.Explainer(m)(x, target=y)``) so that randomisation cannot change
        which class is explained.
    model : keras.Model or tf_keras.Model
        Functional or Sequential (it is cloned with ``clone_model``); never modified.
    x : array
        Images as the model takes them.
    layers : int or None
        How many weighted layers (see :func:`weighted_layers`) to re-initialise, from the top;
        ``None``: all of them.
    seed : int
        Seed of the re-initialisation.

    Returns
    -------
    RandomizationResult
        Per image Spearman rank correlation of ``|relevance|`` with the original map after each
        step. A map that depends on the parameters falls well below 1 as layers are randomised.
    """
    where = "randomization_check"
    if not callable(explain_fn):
        raise TypeError(f"{where}: explain_fn must be a callable explain_fn(model, x) -> relevance, got "
                        f"{explain_fn!r}; e.g. lambda m, x: lrp_grad.Explainer(m)(x, target=0).")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{where}: seed must be an integer >= 0, got {seed!r}.")
    available = weighted_layers(model)
    if not available:
        raise UnsupportedModelError(f"{where}: model {model.name!r} has no layer with a kernel (Dense, convolution, "
                                    "...) to re-initialise; the check needs a model with weights.")
    if layers is None:
        layers = len(available)
    elif isinstance(layers, bool) or not isinstance(layers, numbers.Integral) or not 1 <= layers <= len(available):
        raise ValueError(f"{where}: layers must be an integer from 1 to {len(available)} (the model's weighted layers: "
                         f"{', '.join(repr(layer.name) for layer in available)}) or None for all of them, "
                         f"got {layers!r}.")
    original = _as_map(explain_fn(model, x), None, where)
    copy = _clone(model, where)
    cascade = weighted_layers(copy)[::-1][:int(layers)]
    rng = np.random.default_rng(int(seed))
    rows = [rank_correlation(original, _as_map(explain_fn(copy, x), original.shape, where))]
    for layer in cascade:
        _reinitialise(layer, rng)
        rows.append(rank_correlation(original, _as_map(explain_fn(copy, x), original.shape, where)))
    return RandomizationResult(tuple(layer.name for layer in cascade), np.stack(rows))


def _as_map(r, shape, where):
    r = np.asarray(r, np.float64)
    if r.ndim not in (3, 4):
        raise ValueError(f"{where}: explain_fn returned shape {r.shape}; it must return one map per image, "
                         "shaped (n, H, W) or (n, H, W, C).")
    if shape is not None and r.shape != shape:
        raise ValueError(f"{where}: explain_fn returned shape {r.shape} for the randomised model but {shape} for the "
                         "original; it must return maps of the same shape for both.")
    return r
