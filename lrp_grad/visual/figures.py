"""Matplotlib figures and PNG files of relevance maps: one map on an Axes, a grid of samples, a PNG of its pixels.

:func:`plot` and :func:`grid` import matplotlib only when called; :func:`save_png` writes through
Pillow, or matplotlib if Pillow is missing. The colours are those of :mod:`lrp_grad.visual.colors`;
:mod:`lrp_grad.heatmap` is the public path of both modules.
"""
from __future__ import annotations

import math
import numbers
import pathlib
from typing import Any, Sequence

import numpy as np

from .colors import _check_same_size, _check_scheme, _colours, _display_image, colorize, overlay, to_2d

__all__ = ["plot", "grid", "save_png"]

#: Size of one grid cell in inches; the width leaves room for the cell's colour bar labels.
_CELL_W, _CELL_H = 2.6, 2.2

#: Resolution of saved figures; together with the cell size it fixes the PNG size in pixels.
_DPI = 100


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
         ncols: int | None = None, path: Any = None, suptitle: str | None = None, shared_scale: bool = False,
         percentile: float | None = None):
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
        as plain white without telling why), and on a shared scale a map below 2% of it says it is
        faint, not zero (it would look like an all-zero one).
    percentile : float, optional
        A robust colour scale: the limit is this percentile of ``|R|`` (e.g. ``99.5``) instead of
        its maximum, so that one hot pixel does not wash out the rest of the map; larger values
        saturate at the ends of the colour bar. The figure's title says so. With ``shared_scale``
        the percentile is taken over all maps together.

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
    if percentile is not None and (isinstance(percentile, bool) or not isinstance(percentile, numbers.Real)
                                   or not 0 < percentile <= 100):
        raise ValueError(f"percentile must be a number in (0, 100] (e.g. 99.5), got {percentile!r}.")

    def scale_of(values):
        top = float(np.abs(values).max())
        if percentile is None or not top:
            return top or 1.0
        return float(np.percentile(np.abs(values), percentile)) or top  # a mostly-zero map: its maximum

    common = None
    if shared_scale:
        common = scale_of(np.concatenate([f.reshape(-1) for f in flats]))

    # 2. Lay out (image, heatmap) row pairs; wrapped rows repeat the pattern.
    per_sample = 1 if pictures is None else 2
    blocks = math.ceil(count / ncols)
    nrows = blocks * per_sample
    notes = [] if suptitle is None else [suptitle]
    if percentile is not None:
        notes.append(f"colour scale: the {percentile:g}th percentile of |R| (larger values saturate)")
    if shared_scale and notes:
        notes.append("(one colour scale for all maps)")
    import textwrap  # noqa: PLC0415

    chars = max(24, int(ncols * _CELL_W * 12))  # about what fits across the figure at 10 pt
    notes = ["\n".join(textwrap.fill(line, chars) for line in n.splitlines()) for n in notes]
    title_lines = max([len(str(t).splitlines()) for t in titles] if titles is not None else [1]) + \
        (1 if any(not np.any(f) for f in flats) or shared_scale else 0)
    header = 0.1 + 0.17 * title_lines + 0.2 * sum(len(n.splitlines()) for n in notes)  # inches above the first row
    width = ncols * _CELL_W
    # Rows as tall as the maps drawn in them (square pixels at the columns' width), so that a
    # single sample leaves no empty band between its image and its heatmap; the gap between rows
    # holds the titles of a wrapped block.
    left, right, wspace = 0.05, 0.75, 0.55
    axes_w = (width - left - right) / (ncols + wspace * (ncols - 1))
    aspect = max(f.shape[0] / f.shape[1] for f in flats)
    axes_h = axes_w * aspect
    gap = (0.2 + 0.17 * title_lines) if blocks > 1 else 0.12
    height = math.ceil((nrows * axes_h + (nrows - 1) * gap + header + 0.1) * _DPI) / _DPI  # whole pixels
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(width, height))
    # Fixed margins in inches (not fractions), so the last colour bar's labels fit at any ncols.
    fig.subplots_adjust(left=left / width, right=1.0 - right / width, bottom=0.1 / height,
                        top=1.0 - header / height, wspace=wspace, hspace=gap / axes_h)
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
        plot(flat, ax=heat, scheme=scheme, colorbar=True, limit=common if shared_scale else scale_of(flat))
        title = None if titles is None else str(titles[i])
        peak = float(np.abs(flat).max())
        if not peak:
            title = "all zero" if title is None else f"{title}\n(all zero)"
        elif shared_scale and peak < 0.02 * common:  # white on the shared scale, yet not zero: say so
            note = f"(max |R| {peak:.2g}: faint, not zero)"
            title = note if title is None else f"{title}\n{note}"
        if title is not None:
            (top if pictures is not None else heat).set_title(title, fontsize=10)
    if notes:
        fig.suptitle("\n".join(notes), fontsize=10)

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


def _with_colour_bar(rgb: np.ndarray, scheme: str, limit: float):
    """``(rgb with a colour bar strip on its right, [((x, y), label)])``: a white gap, the bar
    (``+limit`` at the top, 0 white in the middle, ``-limit`` at the bottom) and room for labels."""
    height, width = rgb.shape[:2]
    gap, bar, room = 6, max(10, width // 16), 48
    column = colorize(np.linspace(1.0, -1.0, height)[:, None], scheme)  # (height, 1, 3)
    strip = np.ones((height, gap + bar + room, 3))
    strip[:, gap:gap + bar] = column
    strip[[0, -1], gap:gap + bar] = 0.0  # a thin black frame
    strip[:, [gap, gap + bar - 1]] = 0.0
    x = width + gap + bar + 3
    shown = "0" if limit == 0 else f"{limit:.2g}"
    labels = [((x, 0), f"+{shown}"), ((x, max(0, height // 2 - 5)), "0"), ((x, max(0, height - 11)), f"-{shown}")]
    return np.concatenate([rgb, strip], axis=1), labels


def save_png(relevance: Any, path: Any, scheme: str = "lrp", image: Any = None, *,
             min_width: int = 224, colorbar: bool = False) -> pathlib.Path:
    """Write one heatmap (or overlay) as a PNG of its pixels, without axes (and, unless
    ``colorbar``, without colour bar).

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
    colorbar : bool
        Append a colour bar right of the map, from ``-max|R|`` (bottom) through 0 to ``+max|R|``
        (top), labelled with those values (labels need Pillow). The map's pixels are unchanged.

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
    if not isinstance(colorbar, bool):
        raise ValueError(f"colorbar must be True or False, got {colorbar!r}.")
    rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    limit = float(np.abs(to_2d(relevance)).max())
    labels = None
    if colorbar:
        rgb, labels = _with_colour_bar(rgb, scheme, limit)
    pixels = np.round(rgb * 255.0).astype(np.uint8)
    path = pathlib.Path(path)
    Image = _pillow_image()
    if Image is not None:
        picture = Image.fromarray(pixels)
        if labels is not None:
            from PIL import ImageDraw  # noqa: PLC0415

            draw = ImageDraw.Draw(picture)
            for (x, y), text in labels:
                draw.text((x, y), text, fill=(0, 0, 0))
        picture.save(path, format="PNG")
        return path
    try:
        import matplotlib.image as mimage
    except ImportError as err:
        raise ImportError(
            "save_png needs Pillow or matplotlib, and neither is installed: pip install pillow"
        ) from err
    mimage.imsave(path, pixels, format="png")
    return path
