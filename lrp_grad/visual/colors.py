"""Colours of relevance maps with numpy alone: channel sums, symmetric normalisation, colour schemes, overlays.

A relevance map has the shape of one model input: ``(H, W)`` or ``(H, W, C)``; channels are
summed (:func:`to_2d`) because a pixel's relevance is the total over its colour channels.

Every map is normalised on its own and symmetrically (:func:`normalize`): it is divided by its
largest ``|R|`` so that values lie in ``[-1, 1]`` and ``0`` stays ``0``. Zero relevance is
therefore always white, whatever the sign balance of the map.

Colour schemes (``scheme=``): ``"lrp"`` (default; red = positive, blue = negative, white = 0, the
LRP community convention) and ``"seed"`` (the seed report's figures: blue = positive, red =
negative). This module imports neither TensorFlow nor matplotlib, nor any other module of the
package, so it can be loaded and used on its own; :mod:`lrp_grad.heatmap` is its public path.
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = ["SCHEMES", "to_2d", "normalize", "colorize", "overlay"]

#: Colour of the (positive end, negative end) of each scheme; zero is always white.
_ENDS = {
    "lrp": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "seed": ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0)),
}

#: The valid values of every ``scheme=`` argument.
SCHEMES = tuple(_ENDS)

#: ITU-R BT.601 luma weights: an RGB input is shown in gray by its perceived brightness.
_LUMA = np.array([0.299, 0.587, 0.114])


# ----------------------------------------------------------------------------- validation helpers

def _as_float(name: str, value: Any) -> np.ndarray:
    """Return ``value`` as a finite float64 array or raise a ValueError naming ``name``."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be a numeric array, got {type(value).__name__}: {err}"
        ) from None
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); there is nothing to render.")
    bad = np.count_nonzero(~np.isfinite(array))
    if bad:
        raise ValueError(
            f"{name} has {bad} non-finite value(s) (NaN or inf) in an array of shape {array.shape}; "
            "a heatmap of it would be meaningless."
        )
    return array


def _check_scheme(scheme: Any) -> tuple:
    """Return the (positive, negative) end colours of ``scheme`` or raise a ValueError."""
    if not isinstance(scheme, str) or scheme not in _ENDS:
        raise ValueError(
            f"scheme must be one of {', '.join(repr(s) for s in SCHEMES)}, got {scheme!r} "
            "('lrp': red = positive, blue = negative; 'seed': blue = positive, red = negative)."
        )
    return _ENDS[scheme]


# ----------------------------------------------------------------------------- numbers -> colours

def to_2d(relevance: Any) -> np.ndarray:
    """Reduce one relevance map to a 2-D array by summing its channels.

    Parameters
    ----------
    relevance : array_like
        Relevance of one input, shaped ``(H, W)`` or ``(H, W, C)``.

    Returns
    -------
    numpy.ndarray
        Float64 array ``(H, W)``; an ``(H, W, C)`` map is summed over ``C``, which keeps the
        total relevance of every pixel (and of the whole map) unchanged.

    Raises
    ------
    ValueError
        If the array is not 2-D or 3-D (the message gives its shape), is empty or not finite.
    """
    array = _as_float("relevance", relevance)
    if array.ndim == 2:
        return array
    if array.ndim == 3:
        return array.sum(axis=-1)
    hint = " (a batch: pass one sample such as relevance[0], or use heatmap.grid)" if array.ndim == 4 else ""
    raise ValueError(
        f"relevance must have shape (H, W) or (H, W, C) for one image, got shape {array.shape}{hint}."
    )


def normalize(relevance: Any, percentile: float | None = None) -> np.ndarray:
    """Scale a relevance map symmetrically into ``[-1, 1]``, keeping ``0`` at ``0``.

    Parameters
    ----------
    relevance : array_like
        Relevance of any shape; all of it is scaled by one factor (normalise samples of a batch
        one by one to compare their patterns rather than their magnitudes).
    percentile : float, optional
        If given, in ``(0, 100]``: divide by this percentile of ``|R|`` instead of its maximum
        and clip to ``[-1, 1]``, so a few extreme pixels do not wash out the rest. Should that
        percentile be 0 (a mostly-zero map), the maximum is used instead.

    Returns
    -------
    numpy.ndarray
        Float64 array of the input's shape with values in ``[-1, 1]``. Signs are preserved and a
        map that is all zero stays all zero (never NaN).

    Raises
    ------
    ValueError
        If ``percentile`` is outside ``(0, 100]`` or the map is empty or not finite.
    """
    array = _as_float("relevance", relevance)
    magnitude = np.abs(array)
    peak = float(magnitude.max())
    if peak == 0.0:
        return np.zeros_like(array)
    if percentile is None:
        return array / peak
    if (isinstance(percentile, bool) or not isinstance(percentile, numbers.Real)
            or not 0.0 < float(percentile) <= 100.0):
        raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}.")
    scale = float(np.percentile(magnitude, float(percentile)))
    # A sparse map can have a zero percentile; dividing by it would only give +-inf.
    if scale == 0.0:
        scale = peak
    return np.clip(array / scale, -1.0, 1.0)


def _colours(values: np.ndarray, ends: tuple) -> np.ndarray:
    """Map values in ``[-1, 1]`` linearly from white (0) to the positive or negative end colour."""
    positive, negative = np.asarray(ends[0]), np.asarray(ends[1])
    strength = np.abs(values)[..., None]
    end = np.where(values[..., None] >= 0.0, positive, negative)
    # Blend towards the end colour from white (1, 1, 1) in proportion to |value|.
    return 1.0 - strength * (1.0 - end)


def colorize(relevance: Any, scheme: str = "lrp", *, percentile: float | None = None) -> np.ndarray:
    """Turn one relevance map into an RGB image.

    Parameters
    ----------
    relevance : array_like
        Relevance ``(H, W)`` or ``(H, W, C)``; channels are summed (:func:`to_2d`).
    scheme : str
        ``"lrp"`` (red = positive, blue = negative) or ``"seed"`` (blue = positive,
        red = negative); zero is white in both.
    percentile : float, optional
        Passed to :func:`normalize`; by default the largest ``|R|`` gets the saturated colour.

    Returns
    -------
    numpy.ndarray
        Float64 RGB image ``(H, W, 3)`` in ``[0, 1]``.

    Raises
    ------
    ValueError
        For an unknown ``scheme`` (the message lists the valid ones) or a bad map.
    """
    ends = _check_scheme(scheme)
    return _colours(normalize(to_2d(relevance), percentile), ends)


def _display_image(name: str, image: Any) -> np.ndarray:
    """Return an input image as ``(H, W)`` gray or ``(H, W, 3)`` RGB rescaled to ``[0, 1]``."""
    array = _as_float(name, image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]  # the alpha channel carries no content
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise ValueError(
            f"{name} must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got shape {np.shape(image)}."
        )
    low, high = float(array.min()), float(array.max())
    if high > low:
        # Model inputs come in any range (0..255, standardised, ...); min-max scaling shows them all.
        return (array - low) / (high - low)
    # A constant image has no contrast to stretch; keep its value if it is already displayable.
    return np.clip(array, 0.0, 1.0)


def _check_same_size(image: np.ndarray, image_shape: tuple, relevance: np.ndarray,
                     relevance_shape: tuple, where: str = "") -> None:
    """Raise a ValueError giving both shapes when image and relevance differ in height or width."""
    if image.shape[:2] != relevance.shape[:2]:
        raise ValueError(
            f"{where}image and relevance must have the same height and width, got image shape "
            f"{tuple(image_shape)} and relevance shape {tuple(relevance_shape)}."
        )


def overlay(image: Any, relevance: Any, scheme: str = "lrp", alpha: float = 0.6) -> np.ndarray:
    """Blend a heatmap over the gray version of its input image.

    Parameters
    ----------
    image : array_like
        The explained input, ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` in any value range; it
        is rescaled to ``[0, 1]`` and shown in gray (RGB by its luma) so only the heatmap is
        coloured.
    relevance : array_like
        Its relevance, ``(H, W)`` or ``(H, W, C)``.
    scheme : str
        ``"lrp"`` or ``"seed"``, as in :func:`colorize`.
    alpha : float
        Opacity of the heatmap where ``|R|`` is largest, in ``[0, 1]``. The opacity of each pixel
        is ``alpha * |R| / max |R|``: irrelevant pixels show the plain image instead of being
        washed out by the white that stands for zero.

    Returns
    -------
    numpy.ndarray
        Float64 RGB image ``(H, W, 3)`` in ``[0, 1]``.

    Raises
    ------
    ValueError
        For an unknown ``scheme``, ``alpha`` outside ``[0, 1]``, a bad image shape, or image
        and relevance of different height and width (the message gives both shapes).
    """
    ends = _check_scheme(scheme)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}.")
    picture = _display_image("image", image)
    flat = to_2d(relevance)
    _check_same_size(picture, np.shape(image), flat, np.shape(relevance))
    gray = picture if picture.ndim == 2 else picture @ _LUMA
    values = normalize(flat)
    opacity = float(alpha) * np.abs(values)[..., None]
    return (1.0 - opacity) * gray[..., None] + opacity * _colours(values, ends)

