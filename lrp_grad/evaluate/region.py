"""Region perturbation in both orders and the symmetric relevance gain (SRG).

The protocol of Samek et al. (2017) and Bluecher et al. (TMLR 2024): split every image into
non-overlapping ``patch x patch`` regions, rank the regions by their summed relevance, replace them
one after another by a *baseline* (an image that does not coincide with the data: its channel
means, a blurred copy, noise, ...) and record the explained output after every step. Removing the
most relevant regions first (MoRF) should make the output fall fast; removing the least relevant
first (LeRF) should keep it high. The symmetric relevance gain is the area between the two curves.

Conventions (the tests pin each of them):

* **Patches.** Region ``(i, j)`` covers rows ``i*patch .. i*patch+patch-1`` and the same columns;
  when ``H`` or ``W`` is not a multiple of ``patch`` the last row/column of regions is smaller.
  Regions are numbered row-major (``index = i * ceil(W / patch) + j``). A region's score is the
  relevance of its pixels summed over all channels.
* **Ties.** Regions are sorted with a stable sort, so regions of equal score are taken in
  increasing region index *in both orders*. A map whose region scores are all equal (a constant
  map when ``patch`` divides ``H`` and ``W``; otherwise the smaller edge regions sum less) therefore
  gives identical MoRF and LeRF curves and an SRG of exactly 0; negating a map without ties swaps
  MoRF and LeRF.
* **Curves.** Column ``k`` of a curve is the explained output after replacing the ``k``
  first-ranked regions (column 0: the unperturbed image).
* **SRG.** Each curve is integrated with the trapezoidal rule on the x-axis ``k / steps``
  (the fraction of the perturbation budget used, from 0 to 1);
  ``srg = area(LeRF) - area(MoRF)``, in the units of the explained output (logits, or
  probabilities with ``output="probability"``), not normalised further.

Cost: every step of every order is one forward pass per batch of ``batch_size`` images, all images
perturbed in one vectorised step (:func:`srg` runs step ``k`` of both orders in one pass when twice
the batch fits in ``batch_size``). A Keras model runs as a compiled ``tf.function`` with an unknown
batch axis, traced once per image shape and cached while the model lives
(:mod:`lrp_grad.evaluate.forward`), so an evaluation costs about its ``2 * steps + 1`` forward
passes (SRG; ``benchmarks/evaluation_cost.py`` measures it). A compiled call gives the eager call's
outputs up to float32 rounding (graph optimisations may fuse ops; on the benchmark models they
were bit-identical).
"""
from __future__ import annotations

import numbers

import numpy as np

from ..errors import InvalidInputError, InvalidTargetError, UnsupportedLayerError
from .common import _broadcast_finite, _has_probability_output, _labels, pixel_relevance

__all__ = ["region_perturbation", "insertion", "srg", "curve_area", "patch_ranks", "BASELINES", "ORDERS", "OUTPUTS"]

#: Baseline names :func:`region_perturbation` understands (a callable is accepted too).
BASELINES = ("zero", "mean", "blur", "uniform")
#: Perturbation orders: most relevant first, least relevant first.
ORDERS = ("morf", "lerf")
#: Explained outputs: the target's logit or its probability.
OUTPUTS = ("logit", "probability")

_DEFAULT_BATCH = 256


# ---------------------------------------------------------------------------------------------
# Argument checks: every message names the argument, the value and the fix


def _positive_int(value, name: str, where: str, allow_none: bool = False, minimum: int = 1):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        none = " or None" if allow_none else ""
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}{none}, got {value!r}.")
    return int(value)


def _check_images(x, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise InvalidInputError(f"{where}: x must be a batch of images of shape (n, H, W, C), got shape {x.shape}; "
                                "add the batch axis with x[None] or the channel axis with x[..., None].")
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number):
        raise InvalidInputError(f"{where}: x must hold numbers, got dtype {x.dtype}.")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise InvalidInputError(f"{where}: x has {int(np.sum(~np.isfinite(x)))} NaN or infinite values; "
                                "clean the images first.")
    return x


def _check_relevance(relevance, x, where: str) -> np.ndarray:
    shape = np.shape(relevance)
    if shape not in (x.shape, x.shape[:3]):
        raise ValueError(f"{where}: relevance has shape {shape} but x has shape {x.shape}; pass one map per image, "
                         f"shaped {x.shape} or {x.shape[:3]}.")
    r = pixel_relevance(relevance)
    if not np.all(np.isfinite(r)):
        raise ValueError(f"{where}: relevance has NaN or infinite values; check the attribution that produced it.")
    return r


def _check_choice(value, name: str, choices, where: str):
    if not isinstance(value, str) or value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{where}: {name}={value!r} is not understood; use one of {accepted}.")
    return value


def _check_baseline(baseline, where: str):
    if callable(baseline):
        return baseline
    if isinstance(baseline, str) and baseline in BASELINES:
        return baseline
    accepted = ", ".join(repr(b) for b in BASELINES)
    raise ValueError(f"{where}: baseline={baseline!r} is not understood; use one of {accepted} or a callable "
                     "baseline(x) -> array shaped like x.")


def _check_target(target, n: int, where: str):
    """``None`` (predicted class) or int64 class indices of shape ``(n,)``."""
    if target is None:
        return None
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        if int(target) < 0:
            raise InvalidTargetError(f"{where}: target={target!r} is not a class index (>= 0).")
        return np.full(n, int(target), np.int64)
    if isinstance(target, bool):
        raise InvalidTargetError(f"{where}: target={target!r} is a bool; pass a class index, one per image, or None.")
    try:
        return _labels(target, n, where)
    except ValueError as e:
        raise InvalidTargetError(str(e).replace(" y ", " target ").replace(": y ", ": target ")) from None


# ---------------------------------------------------------------------------------------------
# Patches and baselines


def patch_ranks(relevance, patch: int = 4, order: str = "morf") -> np.ndarray:
    """``(n, H, W)`` int array: the rank (0 = replaced first) of the region holding each pixel.

    ``relevance`` is ``(n, H, W)`` or ``(n, H, W, C)``; regions are ``patch x patch`` (the last ones
    smaller when ``patch`` does not divide ``H`` or ``W``), scored by summed relevance and sorted
    stably (ties: lower region index first, in both orders). Pixels whose region has rank ``< k``
    are the ones perturbed after ``k`` steps.
    """
    r = pixel_relevance(relevance)
    patch = _positive_int(patch, "patch", "patch_ranks")
    _check_choice(order, "order", ORDERS, "patch_ranks")
    n, h, w = r.shape
    gh, gw = -(-h // patch), -(-w // patch)
    padded = np.zeros((n, gh * patch, gw * patch))
    padded[:, :h, :w] = r
    scores = padded.reshape(n, gh, patch, gw, patch).sum((2, 4)).reshape(n, gh * gw)
    ranking = np.argsort(-scores if order == "morf" else scores, axis=1, kind="stable")
    ranks = np.empty_like(ranking)
    np.put_along_axis(ranks, ranking, np.arange(gh * gw)[None].repeat(n, 0), axis=1)
    region = (np.arange(h)[:, None] // patch) * gw + np.arange(w)[None, :] // patch  # (H, W) region index
    return ranks[:, region]


def _box_blur(x: np.ndarray, size: int) -> np.ndarray:
    """Separable box blur of odd width ``size`` over H and W of ``(n, H, W, C)``, edges replicated."""
    out = x.astype(np.float64)
    r = size // 2
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (r + 1, r)
        c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis)
        length = out.shape[axis]
        hi = np.take(c, np.arange(size, size + length), axis=axis)
        lo = np.take(c, np.arange(0, length), axis=axis)
        out = (hi - lo) / size
    return out


def _baseline_values(baseline, x: np.ndarray, first: int, patch: int, seed: int, where: str) -> np.ndarray:
    """The replacement image for every image of the batch ``x`` (rows ``first..`` of the whole input)."""
    if callable(baseline):
        try:
            b = np.asarray(baseline(x))
        except Exception as e:
            raise ValueError(f"{where}: the callable baseline {baseline!r} failed on a batch of shape {x.shape}: "
                             f"{type(e).__name__}: {e}") from e
        return _broadcast_finite(b, x.shape, f"{where}: the callable baseline returned shape {b.shape} for images "
                                 f"of shape {x.shape}; it must return an array shaped like its argument.",
                                 f"{where}: the callable baseline returned NaN or infinite values.")
    if baseline == "zero":
        return np.zeros_like(x)
    if baseline == "mean":
        return np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape)
    if baseline == "blur":
        return _box_blur(x, 2 * patch + 1)
    # "uniform": per image, noise in that image's [min, max]; image i (of the whole input) always gets
    # the stream of np.random.default_rng([seed, i]), so results do not depend on batch_size.
    out = np.empty(x.shape, np.float64)
    for i in range(len(x)):
        low, high = float(x[i].min()), float(x[i].max())
        out[i] = np.random.default_rng([seed, first + i]).uniform(low, high, x.shape[1:])
    return out


# ---------------------------------------------------------------------------------------------
# Forward passes


def _forward_fn(model, output: str, where: str = "region_perturbation"):
    """``f(x) -> (n, classes)`` float64 array of the explained output; errors name ``where``.

    A Keras model runs compiled (:mod:`lrp_grad.evaluate.forward`: one trace per image shape,
    cached per model); its float32 output is converted to float64 once, after the call."""
    from .forward import compiled_call, compiled_logits

    probability_model = _has_probability_output(model)
    if output == "logit" and probability_model:
        # The model ends in softmax/sigmoid: the logits are the output before it, which the
        # Explainer's rewritten model computes (it skips a final softmax or sigmoid).
        try:
            logits = compiled_logits(model)
        except UnsupportedLayerError as e:
            raise UnsupportedLayerError(f"output='logit' on a model ending in softmax/sigmoid reads the logits "
                                        f"through lrp_grad's rewritten model, which cannot be built here ({e}); "
                                        "pass output='probability' to use the model's own output.", e.layers) from e
        return lambda x: np.asarray(logits(x), np.float64)

    call = compiled_call(model)

    def forward(x):
        out = np.asarray(call(x), np.float64)
        if out.ndim != 2:
            raise InvalidInputError(f"{where} needs a classifier with output shape (n, classes); "
                                    f"this model returns shape {out.shape}.")
        if output == "probability" and not probability_model:
            out = np.exp(out - out.max(1, keepdims=True))
            out /= out.sum(1, keepdims=True)
        return out

    return forward


def _curves(model, x, relevance, target, patch, baseline, orders, steps, batch_size, output, seed, where,
            insert=False, forward=None):
    """``{order: (n, steps + 1) curve}`` for each of ``orders``, sharing the forward pass of step 0.

    Deletion (default): the ``k`` first-ranked regions of the image become the baseline. Insertion
    (``insert=True``): the ``k`` first-ranked regions of the baseline become the image."""
    x = _check_images(x, where)
    n, h, w = x.shape[:3]
    r = _check_relevance(relevance, x, where)
    patch = _positive_int(patch, "patch", where)
    baseline = _check_baseline(baseline, where)
    output = _check_choice(output, "output", OUTPUTS, where)
    batch_size = _positive_int(batch_size, "batch_size", where, allow_none=True) or _DEFAULT_BATCH
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{where}: seed must be an integer >= 0, got {seed!r}.")
    total = (-(-h // patch)) * (-(-w // patch))
    steps = total if steps is None else _positive_int(steps, "steps", where, minimum=0)
    if steps > total:
        raise ValueError(f"{where}: steps={steps} but images of {h}x{w} pixels have only {total} patches of "
                         f"{patch}x{patch}; pass steps <= {total} or steps=None for all of them.")
    target = _check_target(target, n, where)
    forward = _forward_fn(model, output, where) if forward is None else forward
    ranks = {o: patch_ranks(r, patch, o) for o in orders}
    curves = {o: np.empty((n, steps + 1)) for o in orders}
    rows = np.arange(min(batch_size, n))
    for first in range(0, n, batch_size):
        chunk = x[first:first + batch_size]
        m = len(chunk)
        out = forward(chunk)
        if target is None:
            t = out.argmax(1)
        else:
            t = target[first:first + m]
            if t.max() >= out.shape[1]:
                bad = int(np.argmax(t >= out.shape[1]))
                raise InvalidTargetError(f"{where}: target[{first + bad}] = {int(t[bad])} but the model has "
                                         f"{out.shape[1]} outputs; pass class indices 0..{out.shape[1] - 1}.")
        base = _baseline_values(baseline, chunk, first, patch, seed, where).astype(chunk.dtype, copy=False)
        start = forward(base)[rows[:m], t] if insert else out[rows[:m], t]
        # Both orders' step k in one forward pass of 2m images when that stays within batch_size:
        # half the calls, each on a larger batch (up to ~30% faster at m <= 64 on a 2-core CPU,
        # the same at m >= 128: benchmarks/evaluation_cost.py). Otherwise one order after the other.
        groups = [tuple(orders)] if len(orders) * m <= batch_size else [(o,) for o in orders]
        for group in groups:
            g = len(group)
            rank = np.concatenate([ranks[o][first:first + m] for o in group])[..., None]
            image = chunk if g == 1 else np.concatenate([chunk] * g)
            fill = base if g == 1 else np.concatenate([base] * g)
            for o in group:
                curves[o][first:first + m, 0] = start
            for k in range(1, steps + 1):
                perturbed = np.where(rank < k, image, fill) if insert else np.where(rank < k, fill, image)
                out = forward(perturbed)
                for i, o in enumerate(group):
                    curves[o][first:first + m, k] = out[i * m:(i + 1) * m][rows[:m], t]
    if len(orders) == 2:
        # An image whose two rankings coincide (all region scores tied) has the same perturbed
        # images in both orders, so the same curves by definition; copying keeps that exact when a
        # shared pass put the two copies at different batch rows (which a kernel may round apart).
        same = np.all(ranks[orders[0]] == ranks[orders[1]], axis=(1, 2))
        curves[orders[1]][same] = curves[orders[0]][same]
    return curves


def region_perturbation(model, x, relevance, target=None, *, patch: int = 4, baseline="mean", order: str = "morf",
                        steps: int | None = None, batch_size: int | None = None, output: str = "logit",
                        seed: int = 0) -> np.ndarray:
    """Explained output while image regions are replaced by a baseline in relevance order.

    With ``order="morf"`` this is the *deletion* curve; :func:`insertion` is its mirror.

    Parameters
    ----------
    model : keras.Model or tf_keras.Model
        A classifier with output ``(n, classes)``.
    x : array (n, H, W, C)
        Images as the model takes them.
    relevance : array (n, H, W, C) or (n, H, W)
        One attribution per image (any method); regions are ranked by relevance summed over their
        pixels and channels.
    target : None, int or array of int (n,)
        The explained class; ``None`` = the model's predicted class on the unperturbed image.
    patch : int
        Region size: non-overlapping ``patch x patch`` squares (the last row/column of regions is
        smaller when ``patch`` does not divide ``H``/``W``).
    baseline : 'zero', 'mean', 'blur', 'uniform' or callable
        What a replaced region becomes: ``'zero'`` zeros; ``'mean'`` the image's per-channel mean;
        ``'blur'`` the image blurred by a separable box filter of width ``2 * patch + 1`` (edges
        replicated); ``'uniform'`` noise uniform in the image's ``[min, max]``, image ``i`` drawn
        from ``np.random.default_rng([seed, i])``; a callable ``baseline(batch) -> array shaped like
        batch`` (called once per batch of ``batch_size`` images).
    order : 'morf' or 'lerf'
        Most relevant region first, or least relevant first. Ties: lower region index first.
    steps : int or None
        Regions to replace (``None``: all of them).
    batch_size : int or None
        Images per forward pass (default 256). Each step is one forward pass per batch (for
        :func:`srg`, whose two orders share a forward pass of both orders' images when twice the
        batch fits in ``batch_size``).
    output : 'logit' or 'probability'
        The target's logit (of a model ending in softmax/sigmoid: the output before it), or its
        probability (the model's own softmax/sigmoid output, else softmax of the logits).
    seed : int
        Seed of the ``'uniform'`` baseline.

    Returns
    -------
    float64 array (n, steps + 1)
        Column ``k``: the explained output after replacing the ``k`` first-ranked regions.
    """
    where = "region_perturbation"
    order = _check_choice(order, "order", ORDERS, where)
    return _curves(model, x, relevance, target, patch, baseline, (order,), steps, batch_size, output, seed,
                   where)[order]


def insertion(model, x, relevance, target=None, *, patch: int = 4, baseline="blur", order: str = "morf",
              steps: int | None = None, batch_size: int | None = None, output: str = "logit",
              seed: int = 0) -> np.ndarray:
    """Insertion curve: start from the baseline image and put back the image's regions in relevance order.

    The mirror of :func:`region_perturbation`, which is the *deletion* curve
    (``region_perturbation(..., order="morf")``). Arguments, regions, ties and baselines are those
    of :func:`region_perturbation`; the default baseline is ``'blur'`` (a blurred copy carries no
    fine detail but keeps the image statistics). ``target=None`` is the class predicted on the
    unperturbed image, so the explained class is the same in every column.

    Returns
    -------
    float64 array (n, steps + 1)
        Column ``k``: the explained output of the baseline image with the ``k`` first-ranked
        regions of ``x`` inserted. Column 0 is the baseline's output; with ``steps=None`` (all
        regions) the last column is the output on ``x`` itself. A good map makes the curve rise
        early with ``order="morf"`` (compare with :func:`curve_area`).
    """
    where = "insertion"
    order = _check_choice(order, "order", ORDERS, where)
    return _curves(model, x, relevance, target, patch, baseline, (order,), steps, batch_size, output, seed,
                   where, insert=True)[order]


def curve_area(curve) -> np.ndarray:
    """Trapezoidal area under each row of ``curve`` on the x-axis ``k / steps`` in ``[0, 1]``."""
    c = np.asarray(curve, np.float64)
    if c.shape[1] < 2:
        return np.zeros(len(c))
    return (c[:, 1:] + c[:, :-1]).sum(1) / (2 * (c.shape[1] - 1))


def srg(model, x, relevance, target=None, *, patch: int = 4, baseline="mean", steps: int | None = None,
        batch_size: int | None = None, output: str = "logit", seed: int = 0, return_curves: bool = False):
    """Symmetric relevance gain per image (Bluecher et al., TMLR 2024): area under the LeRF curve
    minus area under the MoRF curve.

    Both curves are those of :func:`region_perturbation` with the same arguments (see there; computed
    together, step ``k`` of both orders in one forward pass when twice the batch fits in
    ``batch_size``, which can change the model's float32 rounding, not more); each is
    integrated with the trapezoidal rule on the x-axis ``k / steps`` (fraction of the budget of
    ``steps`` regions, from 0 to 1), in units of the explained output, without further
    normalisation. Higher is better: the ranking separates the regions the model relies on from
    those it ignores. A map with all region scores equal (e.g. constant, with ``patch`` dividing ``H`` and
    ``W``) scores exactly 0: ties are broken the same way in both orders.

    Returns
    -------
    float64 array (n,), or ``(scores, morf, lerf)`` with ``return_curves=True`` (curves ``(n, steps + 1)``).
    """
    if not isinstance(return_curves, bool):
        raise ValueError(f"srg: return_curves must be True or False, got {return_curves!r}.")
    curves = _curves(model, x, relevance, target, patch, baseline, ORDERS, steps, batch_size, output, seed, "srg")
    scores = curve_area(curves["lerf"]) - curve_area(curves["morf"])
    return (scores, curves["morf"], curves["lerf"]) if return_curves else scores
