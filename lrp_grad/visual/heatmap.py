"""Rendering of relevance maps as heatmaps, overlays, figure grids and PNG files.

A relevance map has the shape of one model input: ``(H, W)`` or ``(H, W, C)``; channels are
summed (:func:`to_2d`) because a pixel's relevance is the total over its colour channels. Batches
``(n, H, W, C)`` are rendered by :func:`grid`; every other function takes one sample.

Every map is normalised on its own and symmetrically (:func:`normalize`): it is divided by its
largest ``|R|`` so that values lie in ``[-1, 1]`` and ``0`` stays ``0``. Zero relevance is
therefore always white, whatever the sign balance of the map, and colour bars run from ``-m`` to
``+m`` with ``m = max |R|``.

Colour schemes (``scheme=``):

``"lrp"`` (default)
    The LRP community convention (Bach et al. 2015; Montavon et al. 2018): **red = positive**
    relevance (evidence for the explained class), **blue = negative** (evidence against),
    white = 0. It is matplotlib's ``"bwr"`` diverging map with positive values at the red end.
``"seed"``
    The convention of the seed report's figures: **blue = positive**, **red = negative**,
    white = 0 (the ``"lrp"`` scheme with its two ends swapped).

Colours are computed with numpy alone (:func:`colorize`, :func:`overlay`), so those functions
need neither TensorFlow nor matplotlib. Plotting (:func:`plot`, :func:`grid`) imports matplotlib
only when called; :func:`save_png` writes through Pillow, or matplotlib if Pillow is missing. This
module never imports TensorFlow, so rendering saved relevance maps does not pay its start-up cost.

>>> from lrp_grad import heatmap                                  # doctest: +SKIP
>>> heatmap.save_png(R[0], "digit.png")                           # doctest: +SKIP
>>> fig = heatmap.grid(x[:4], R[:4], titles=["0", "1", "2", "3"])  # doctest: +SKIP
"""
from __future__ import annotations

import math
import numbers
import pathlib
from typing import Any, Sequence

import numpy as np

__all__ = ["SCHEMES", "to_2d", "normalize", "colorize", "overlay", "plot", "grid", "save_png", "concept_atlas"]

#: Colour of the (positive end, negative end) of each scheme; zero is always white.
_ENDS = {
    "lrp": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "seed": ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0)),
}

#: The valid values of every ``scheme=`` argument.
SCHEMES = tuple(_ENDS)

#: ITU-R BT.601 luma weights: an RGB input is shown in gray by its perceived brightness.
_LUMA = np.array([0.299, 0.587, 0.114])

#: Size of one grid cell in inches; the width leaves room for the cell's colour bar labels.
_CELL_W, _CELL_H = 2.6, 2.2

#: Resolution of saved figures; together with the cell size it fixes the PNG size in pixels.
_DPI = 100


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


def _pyplot():
    """Import matplotlib.pyplot on first use, with an ImportError that says how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "lrp_grad.heatmap plotting needs matplotlib, which is not installed: "
            "pip install matplotlib"
        ) from err
    return plt


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


# ----------------------------------------------------------------------------- matplotlib figures

def _colormap(scheme: str):
    """The matplotlib colormap that shows exactly the colours of :func:`colorize`."""
    from matplotlib.colors import ListedColormap

    # An odd number of entries puts an exactly white entry at the centre, where 0 maps.
    return ListedColormap(_colours(np.linspace(-1.0, 1.0, 257), _check_scheme(scheme)),
                          name=f"lrp_grad_{scheme}")


def _limit(relevance2d: np.ndarray) -> float:
    """Half-width of the symmetric colour range; 1 for an all-zero map so the range is not empty."""
    peak = float(np.abs(relevance2d).max())
    return peak if peak > 0.0 else 1.0


def _add_colorbar(ax, mappable, limit: float):
    """Attach a colour bar from ``-limit`` to ``+limit`` right of ``ax`` without shrinking it."""
    # An inset keeps every heatmap as large as the input image drawn above it in a grid.
    cax = ax.inset_axes([1.04, 0.0, 0.06, 1.0])
    bar = ax.figure.colorbar(mappable, cax=cax)
    bar.set_ticks([-limit, 0.0, limit])
    bar.set_ticklabels([f"-{limit:.2g}", "0", f"+{limit:.2g}"])
    bar.ax.tick_params(labelsize=8)
    return bar


def plot(relevance: Any, image: Any = None, ax=None, scheme: str = "lrp", title: str | None = None,
         colorbar: bool = True, limit: float | None = None):
    """Draw one heatmap, or its overlay on the input image, on a matplotlib Axes.

    Parameters
    ----------
    relevance : array_like
        Relevance ``(H, W)`` or ``(H, W, C)``; channels are summed.
    image : array_like, optional
        The explained input; when given, the :func:`overlay` is drawn instead of the bare map.
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure is made when omitted. The colour bar is placed just right of
        ``ax`` without resizing it, so leave some horizontal space after it.
    scheme : str
        ``"lrp"`` or ``"seed"``, as in :func:`colorize`.
    title : str, optional
        Axes title.
    colorbar : bool
        Whether to add a colour bar centred at 0, from ``-max |R|`` to ``+max |R|``, whose ends
        are labelled with their signed values.
    limit : float, optional
        Half-width of the colour range (default ``max |R|`` of this map); give one value to
        several maps to compare them on one scale.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes drawn on.

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    ValueError
        For an unknown ``scheme`` or bad input shapes (see :func:`overlay`).
    """
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    _check_scheme(scheme)
    flat = to_2d(relevance)
    if ax is None:
        fig, ax = plt.subplots(figsize=(_CELL_W + 0.6, _CELL_H + 0.4))
        fig.subplots_adjust(left=0.04, right=0.74, bottom=0.05, top=0.88)
    if limit is None:
        limit = _limit(flat)
    elif isinstance(limit, bool) or not isinstance(limit, numbers.Real) or not (math.isfinite(limit) and limit > 0):
        raise ValueError(f"limit must be a positive finite number, got {limit!r}.")
    limit = float(limit)
    # Symmetric limits keep 0 at the white centre of the map whatever the sign balance.
    norm = Normalize(vmin=-limit, vmax=limit)
    cmap = _colormap(scheme)
    if image is None:
        mappable = ax.imshow(flat, cmap=cmap, norm=norm, interpolation="nearest")
    else:
        ax.imshow(overlay(image, relevance, scheme), interpolation="nearest")
        mappable = ScalarMappable(norm=norm, cmap=cmap)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    if colorbar:
        _add_colorbar(ax, mappable, limit)
    return ax


def _samples(name: str, value: Any) -> list:
    """Split a batch ``(n, H, W[, C])`` or a sequence of maps into a list of per-sample arrays."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        array = np.asarray(value)
        if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
            raise ValueError(
                f"{name} has shape {array.shape}, which reads as one (H, W, C) sample rather than a "
                f"batch (n, H, W); pass {name}[None] or a list [sample] for a single sample."
            )
        if array.ndim not in (3, 4):
            raise ValueError(
                f"{name} must be a batch (n, H, W) or (n, H, W, C) or a list of samples, "
                f"got shape {array.shape}."
            )
        items = list(array)
    if not items:
        raise ValueError(f"{name} is empty; grid needs at least one sample.")
    return items


def grid(images: Any, relevances: Any, titles: Sequence[str] | None = None, scheme: str = "lrp",
         ncols: int | None = None, path: Any = None, suptitle: str | None = None, shared_scale: bool = False):
    """Draw a figure with one column per sample: the input on top, its heatmap below.

    Parameters
    ----------
    images : array_like or None
        Inputs ``(n, H, W)``, ``(n, H, W, C)`` or a list of ``n`` images in any value range, each
        shown rescaled to ``[0, 1]`` (gray for one channel). ``None`` draws the heatmaps only.
    relevances : array_like
        Relevance maps ``(n, H, W)``, ``(n, H, W, C)`` or a list of ``n`` maps. Each is
        normalised on its own and gets its own colour bar centred at 0 (see ``shared_scale``).
    titles : sequence of str, optional
        One title per sample, shown above its column.
    scheme : str
        ``"lrp"`` or ``"seed"``, as in :func:`colorize`.
    ncols : int, optional
        Samples per row of the figure; with more samples the columns wrap into further
        (image, heatmap) row pairs. Default: all samples side by side.
    path : str or os.PathLike, optional
        If given, the figure is also saved there as a PNG at 100 dpi.
    suptitle : str, optional
        Title of the whole figure.
    shared_scale : bool
        One colour range for all maps (``max |R|`` over all of them), so that maps of several
        targets or models can be compared by colour; use it where the maps are compared. Either
        way, a map that is all zero says so in its title (a per-map scale would otherwise show it
        as plain white without telling why).

    Returns
    -------
    matplotlib.figure.Figure
        The figure, made through pyplot (close it with ``plt.close(fig)`` when done).

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    ValueError
        For an unknown ``scheme``, bad shapes, or counts of images, relevances and titles that
        disagree; messages name the offending sample.
    """
    # 1. Validate everything before a figure exists, so a bad call leaves no half-drawn figure.
    plt = _pyplot()
    _check_scheme(scheme)
    maps = _samples("relevances", relevances)
    count = len(maps)
    flats = []
    for i, item in enumerate(maps):
        try:
            flats.append(to_2d(item))
        except ValueError as err:
            raise ValueError(f"relevances[{i}]: {err}") from None
    pictures = None
    if images is not None:
        raw = _samples("images", images)
        if len(raw) != count:
            raise ValueError(f"got {len(raw)} images but {count} relevance maps; pass one image per map.")
        pictures = []
        for i, (item, flat) in enumerate(zip(raw, flats)):
            picture = _display_image(f"images[{i}]", item)
            _check_same_size(picture, np.shape(item), flat, np.shape(maps[i]), where=f"sample {i}: ")
            pictures.append(picture)
    if titles is not None and len(titles) != count:
        raise ValueError(f"got {len(titles)} titles for {count} samples; pass one title per sample.")
    if ncols is None:
        ncols = count
    elif isinstance(ncols, bool) or not isinstance(ncols, numbers.Integral) or ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}.")
    ncols = min(int(ncols), count)

    if not isinstance(shared_scale, bool):
        raise ValueError(f"shared_scale must be True or False, got {shared_scale!r}.")
    common = None
    if shared_scale:
        common = max(float(np.abs(f).max()) for f in flats) or 1.0

    # 2. Lay out (image, heatmap) row pairs; wrapped rows repeat the pattern.
    per_sample = 1 if pictures is None else 2
    nrows = math.ceil(count / ncols) * per_sample
    header = 0.35 + (0.3 if suptitle else 0.0)  # inches above the first row for the titles
    width, height = ncols * _CELL_W, nrows * _CELL_H + header
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(width, height))
    # Fixed margins in inches (not fractions), so the last colour bar's labels fit at any ncols.
    fig.subplots_adjust(left=0.05 / width, right=1.0 - 0.75 / width, bottom=0.08 / height,
                        top=1.0 - header / height, wspace=0.55, hspace=0.25)
    for ax in axes.flat:
        ax.set_visible(False)

    # 3. Draw each sample in its column.
    for i, flat in enumerate(flats):
        block, col = divmod(i, ncols)
        top = axes[block * per_sample, col]
        if pictures is not None:
            top.set_visible(True)
            top.imshow(pictures[i], cmap="gray" if pictures[i].ndim == 2 else None,
                       vmin=0.0, vmax=1.0, interpolation="nearest")
            top.set_xticks([])
            top.set_yticks([])
        heat = axes[block * per_sample + per_sample - 1, col]
        heat.set_visible(True)
        plot(flat, ax=heat, scheme=scheme, colorbar=True, limit=common)
        title = None if titles is None else str(titles[i])
        if not np.any(flat):
            title = "all zero" if title is None else f"{title}\n(all zero)"
        if title is not None:
            (top if pictures is not None else heat).set_title(title, fontsize=10)
    if suptitle is not None:
        fig.suptitle(suptitle + ("\n(one colour scale for all maps)" if shared_scale else ""))

    # 4. Save at a fixed dpi so the PNG size follows from the figure size.
    if path is not None:
        fig.savefig(path, dpi=_DPI, format="png")
    return fig


# ----------------------------------------------------------------------------- files

def _pillow_image():
    """Return ``PIL.Image``, or None when Pillow is not installed."""
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def save_png(relevance: Any, path: Any, scheme: str = "lrp", image: Any = None, *,
             min_width: int = 224) -> pathlib.Path:
    """Write one heatmap (or overlay) as a PNG of its pixels, without axes or colour bar.

    Parameters
    ----------
    relevance : array_like
        Relevance ``(H, W)`` or ``(H, W, C)``; channels are summed.
    path : str or os.PathLike
        Output file; PNG is written whatever its suffix.
    scheme : str
        ``"lrp"`` or ``"seed"``, as in :func:`colorize`.
    image : array_like, optional
        The explained input; when given, the :func:`overlay` is written instead.
    min_width : int
        Small maps are enlarged by the smallest integer factor that makes them at least this
        many pixels wide (a 28 x 28 map becomes 224 x 224); nearest-neighbour enlargement keeps
        every input pixel a sharp square.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    ImportError
        If neither Pillow nor matplotlib is installed.
    ValueError
        For an unknown ``scheme``, a non-positive ``min_width`` or bad input shapes.
    """
    if isinstance(min_width, bool) or not isinstance(min_width, numbers.Integral) or min_width < 1:
        raise ValueError(f"min_width must be a positive integer, got {min_width!r}.")
    rgb = colorize(relevance, scheme) if image is None else overlay(image, relevance, scheme)
    factor = max(1, math.ceil(min_width / rgb.shape[1]))
    rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    pixels = np.round(rgb * 255.0).astype(np.uint8)
    path = pathlib.Path(path)
    Image = _pillow_image()
    if Image is not None:
        Image.fromarray(pixels).save(path, format="PNG")
        return path
    try:
        import matplotlib.image as mimage
    except ImportError as err:
        raise ImportError(
            "save_png needs Pillow or matplotlib, and neither is installed: pip install pillow"
        ) from err
    mimage.imsave(path, pixels, format="png")
    return path


# ----------------------------------------------------------------------------- concept atlas

#: Size of one concept-atlas cell in inches (heatmaps and reference crops are drawn square).
_ATLAS_CELL = 1.7

#: Ways to pick an atlas's rows: by signed relevance (the concepts for the target) or by |relevance|.
_ATLAS_RANKS = ("relevance", "magnitude")


def _atlas_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"concept_atlas: {name} must be {kind}, got {value!r}.")
    return int(value)


def _atlas_data(data: Any, input_rank: int) -> Any:
    """An ``(images, labels)`` pair of arrays is one batch with labels, not a stream of two elements."""
    if (isinstance(data, tuple) and len(data) == 2 and np.ndim(data[0]) == input_rank + 1
            and np.ndim(data[1]) >= 1 and len(data[0]) == len(data[1])):
        return [data]
    return data


def concept_atlas(ex, image: Any, target: int, layer: str, *, top: int = 4, data: Any = None, references=None,
                  n_refs: int = 4, scheme: str = "lrp", path: Any = None, rank: str = "relevance",
                  class_names: Sequence[str] | None = None):
    """A concept atlas: which channels of ``layer`` carry the decision for ``target`` on one image.

    One row per concept, i.e. per channel of ``layer``, for the ``top`` channels with the largest
    concept relevance (:meth:`Explainer.concept_relevance`) for this image and target, most
    relevant first. Each row shows

    - the channel and its **share**: its relevance divided by the magnitude of the layer's total
      relevance, in percent (signed: a negative share is evidence against the target; where the
      total is positive, as usual, the shares of all channels sum to +100 %);
    - its **conditional heatmap** (:meth:`Explainer.conditional`): the input relevance that flows
      through that channel. The conditional heatmaps of all channels of a layer sum to the ordinary
      heatmap (for a layer every path to the output passes through). All rows share one colour
      scale, so their colours compare;
    - its **reference samples**: the samples of ``data`` where that channel is most relevant
      (relevance maximisation), each cut to the receptive field of the channel's most relevant
      position (:func:`lrp_grad.concepts.reference_samples`). Samples where the channel's
      relevance (or activation) is not positive are left out: they do not show the concept.

    A header row shows the input and its ordinary heatmap (own colour scale).

    Parameters
    ----------
    ex : lrp_grad.Explainer
        A single-input classifier explainer; its rule is used throughout.
    image : array_like
        One input of the model's input shape (or a batch of one).
    target : int
        The class explained.
    layer : str
        A layer with channels (e.g. the last convolution), as for ``concept_relevance``.
    top : int
        Number of concepts (rows); at most the layer's channel count.
    data : array, (images, labels) pair, tf.data.Dataset or iterable, optional
        Where reference samples are searched (``by='relevance'``, each sample's relevance for its
        label when ``data`` has labels, else for its predicted class); see
        :func:`lrp_grad.concepts.reference_samples`. Ignored when ``references`` is given.
    references : lrp_grad.concepts.ReferenceSamples, optional
        Precomputed reference samples of ``layer`` (with crops), e.g. for all channels, to share
        them between atlases of several images or targets. Without ``data`` and ``references`` the
        atlas has no reference column.
    n_refs : int
        Reference samples per row (0: no reference column).
    scheme : str
        ``"lrp"`` or ``"seed"``, as in :func:`colorize`.
    path : str or os.PathLike, optional
        If given, the figure is also saved there as a PNG at 100 dpi.
    rank : {'relevance', 'magnitude'}
        ``'relevance'``: the channels with the highest (signed) relevance; ``'magnitude'``: the
        largest ``|relevance|``, so that strong evidence against the target is shown too.
    class_names : sequence of str, optional
        Names of the classes, for the title.

    Returns
    -------
    matplotlib.figure.Figure
        Also carries ``fig.atlas``, a dict of what is drawn: ``layer``, ``target``, ``channels``,
        ``relevance`` (of those channels), ``total`` (the layer's total relevance), ``shares``
        (percent), ``limit`` (the shared colour-scale half-width), ``heatmaps`` (their Axes),
        ``labels`` (the Axes with each row's channel and share), ``references`` (per row, the Axes
        of its crops) and ``reference_indices`` (per row, the sample indices shown).

    Raises
    ------
    ValueError
        Naming the bad input: the image shape, a target out of range, ``top < 1``, ``n_refs < 0``,
        an unknown ``rank`` or ``scheme``, ``references`` of another layer, missing a row's channel
        or without crops, or a target that receives no relevance at the layer.
    lrp_grad.concepts.ConceptError
        For an unknown layer or a layer without channels.
    """
    # 1. Validate everything before computing or drawing.
    plt = _pyplot()
    _check_scheme(scheme)
    if not all(hasattr(ex, a) for a in ("concept_relevance", "conditional", "input_shape")):
        raise ValueError(f"concept_atlas: ex must be an lrp_grad.Explainer, got {type(ex).__name__}.")
    if getattr(ex, "n_inputs", 1) != 1:
        raise ValueError("concept_atlas: ex explains a model with several inputs; the atlas needs a single-input "
                         "model.")
    from .. import concepts  # noqa: PLC0415 (TensorFlow is loaded already: ex exists)

    shape = tuple(int(d) for d in ex.input_shape)
    x = _as_float("image", image)
    if x.shape == (1,) + shape:
        x = x[0]
    if x.shape != shape:
        raise ValueError(f"concept_atlas: image must be one input of shape {shape} (or a batch of one, "
                         f"{(1,) + shape}), got shape {np.shape(image)}.")
    n_classes = getattr(ex, "n_classes", None)
    if isinstance(target, bool) or not isinstance(target, numbers.Integral):
        raise ValueError(f"concept_atlas: target must be a class index (int), got {target!r}.")
    if n_classes is None:
        raise ValueError(f"concept_atlas: model {ex.model.name!r} is not a classifier with one class axis; "
                         "the atlas explains one class (target).")
    if not 0 <= int(target) < n_classes:
        raise ValueError(f"concept_atlas: target {target} is out of range for model {ex.model.name!r} with "
                         f"{n_classes} classes (valid: 0..{n_classes - 1}).")
    target = int(target)
    top = _atlas_int("top", top, 1)
    n_refs = _atlas_int("n_refs", n_refs, 0)
    if not isinstance(rank, str) or rank not in _ATLAS_RANKS:
        raise ValueError(f"concept_atlas: rank must be one of {', '.join(repr(r) for r in _ATLAS_RANKS)}, got "
                         f"{rank!r}.")
    if class_names is not None and len(class_names) != n_classes:
        raise ValueError(f"concept_atlas: got {len(class_names)} class_names for a model with {n_classes} classes.")
    label = concepts._resolve(ex, layer)
    n_channels = concepts.layer_channels(ex, label)
    if references is not None:
        if not isinstance(references, concepts.ReferenceSamples):
            raise ValueError(f"concept_atlas: references must be a lrp_grad.concepts.ReferenceSamples, got "
                             f"{type(references).__name__}.")
        if references.layer != label:
            raise ValueError(f"concept_atlas: references were computed for layer {references.layer!r}, but the "
                             f"atlas shows layer {label!r}; compute them for {label!r} (reference_samples(ex, data, "
                             f"{label!r})).")
        if references.crops is None:
            raise ValueError("concept_atlas: references have no crops (computed with crops=False); compute them "
                             "with crops=True.")

    # 2. Concept relevance, the rows, their conditional heatmaps, the ordinary heatmap.
    batch = x[None].astype(np.float32)
    relevance = np.asarray(ex.concept_relevance(batch, target, layer=label)[0], np.float64)
    total = float(relevance.sum())
    if not np.any(relevance):
        raise ValueError(f"concept_atlas: target {target} receives no relevance at layer {label!r} for this image "
                         "(all channels 0: e.g. the explained output is 0); there are no concepts to show.")
    key = -relevance if rank == "relevance" else -np.abs(relevance)
    channels = np.argsort(key, kind="stable")[:min(top, n_channels)]
    scale = abs(total) if total != 0.0 else float(np.abs(relevance).sum())
    shares = 100.0 * relevance[channels] / scale
    conditional = np.asarray(ex.conditional(batch, target, layer=label, channels=[int(c) for c in channels])[0])
    flats = [to_2d(h) for h in conditional]
    limit = max(float(np.abs(f).max()) for f in flats) or 1.0
    ordinary = np.asarray(ex(batch, target=target)[0])

    # 3. Reference samples of the rows' channels.
    rows_refs = None
    if n_refs and references is None and data is not None:
        references = concepts.reference_samples(ex, _atlas_data(data, len(shape)), label,
                                                channels=[int(c) for c in channels], top=n_refs, by="relevance")
    if n_refs and references is not None:
        where = {int(c): i for i, c in enumerate(references.channels)}
        missing = [int(c) for c in channels if int(c) not in where]
        if missing:
            raise ValueError(f"concept_atlas: references of layer {label!r} lack channel(s) {missing} of the atlas's "
                             f"rows; compute them for all channels (channels=None) or these.")
        rows_refs = []
        for c in channels:
            i = where[int(c)]
            # A sample where the channel has no positive relevance (activation) does not show the concept.
            valid = [j for j in range(references.indices.shape[1])
                     if references.indices[i, j] >= 0 and references.scores[i, j] > 0][:n_refs]
            rows_refs.append([(int(references.indices[i, j]), references.crops[i][j]) for j in valid])
    n_ref_cols = 0 if rows_refs is None else max((len(r) for r in rows_refs), default=0)

    # 4. Lay out: [label | heatmap | colour-bar gap | references ...], a header row, one row per concept.
    k = len(channels)
    cell = _ATLAS_CELL
    ratios = [1.0, 1.0, 0.55] + [1.0] * n_ref_cols
    header = 0.95
    width, height = cell * sum(ratios) + 0.3, cell * (k + 1) * 1.12 + header
    fig = plt.figure(figsize=(width, height))
    spec = fig.add_gridspec(k + 1, len(ratios), width_ratios=ratios, left=0.15 / width, right=1 - 0.15 / width,
                            bottom=0.1 / height, top=1 - header / height, wspace=0.08, hspace=0.3)
    gray = lambda p: "gray" if p.ndim == 2 else None  # noqa: E731

    ax = fig.add_subplot(spec[0, 0])
    picture = _display_image("image", x)
    ax.imshow(picture, cmap=gray(picture), vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("input", fontsize=9)
    ax = fig.add_subplot(spec[0, 1])
    plot(ordinary, ax=ax, scheme=scheme, colorbar=True)
    ax.set_title(f"heatmap (all channels)\nsum R = {float(np.sum(ordinary)):+.3g}", fontsize=9)
    if n_ref_cols:
        ax = fig.add_subplot(spec[0, 3:])
        ax.axis("off")
        ax.text(0.0, 0.5, "reference samples: where each channel is most relevant in the data,\ncut to its "
                "receptive field" + ("" if references.by == "relevance" else f" (ranked by {references.by})"),
                fontsize=9, va="center", ha="left", transform=ax.transAxes)

    heat_axes, label_axes, ref_axes, ref_indices = [], [], [], []
    for r, (c, share, flat) in enumerate(zip(channels, shares, flats), start=1):
        ax = fig.add_subplot(spec[r, 0])
        ax.axis("off")
        ax.text(0.5, 0.5, f"channel {int(c)}\n{share:+.1f} %\nR = {relevance[c]:+.3g}", fontsize=11,
                ha="center", va="center", transform=ax.transAxes,
                color="black" if share >= 0 else "tab:blue" if scheme == "lrp" else "tab:red")
        label_axes.append(ax)
        ax = fig.add_subplot(spec[r, 1])
        plot(flat, ax=ax, scheme=scheme, colorbar=True, limit=limit)
        if r == 1:
            ax.set_title("conditional heatmap", fontsize=9)
        heat_axes.append(ax)
        row_axes, row_idx = [], []
        for j, (index, crop) in enumerate(rows_refs[r - 1] if rows_refs is not None else []):
            ax = fig.add_subplot(spec[r, 3 + j])
            if crop is not None and np.size(crop):
                shown = _display_image(f"reference crop {j} of channel {int(c)}", crop)
                ax.imshow(shown, cmap=gray(shown), vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"#{index}", fontsize=7, labelpad=1)
            row_axes.append(ax)
            row_idx.append(index)
        ref_axes.append(row_axes)
        ref_indices.append(row_idx)
    name = f"{target} ({class_names[target]})" if class_names is not None else str(target)
    fig.suptitle(f"Concept atlas: target class {name}, layer {label!r}\nrows: the {k} channels "
                 f"{'most relevant' if rank == 'relevance' else 'of largest |relevance|'} for the target; share = "
                 f"channel R / |layer total R = {total:+.3g}|; conditional heatmaps on one colour scale",
                 fontsize=10)
    fig.atlas = {"layer": label, "target": target, "channels": [int(c) for c in channels],
                 "relevance": relevance[channels], "total": total, "shares": shares, "limit": limit,
                 "heatmaps": heat_axes, "labels": label_axes, "references": ref_axes,
                 "reference_indices": ref_indices}
    if path is not None:
        fig.savefig(path, dpi=_DPI, format="png")
    return fig
