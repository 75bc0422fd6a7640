"""The concept atlas figure: the channels of a layer that carry one decision, their conditional heatmaps, references.

It computes with the concept functions (:mod:`lrp_grad.concepts`) and draws with the heatmap
modules (:mod:`lrp_grad.visual`); its public paths are ``lrp_grad.concepts.concept_atlas`` and
``lrp_grad.heatmap.concept_atlas``.
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

from ..visual.colors import _as_float, _check_scheme, _display_image, to_2d
from ..visual.figures import _DPI, _pyplot, plot
from .references import ReferenceSamples, reference_samples
from .resolve import _resolve, layer_channels

__all__ = ["concept_atlas"]


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
    label = _resolve(ex, layer)
    n_channels = layer_channels(ex, label)
    if references is not None:
        if not isinstance(references, ReferenceSamples):
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
        references = reference_samples(ex, _atlas_data(data, len(shape)), label,
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
        score = "relevance" if references.by == "relevance" else references.by
        ax.text(0.0, 0.5, "reference samples: where each channel is most relevant in the data,\ncut to its "
                "receptive field" + ("" if references.by == "relevance" else f" (ranked by {references.by})")
                + f"; up to {n_refs} per row: samples where the\nchannel's {score} is not positive are left out "
                "(they do not show the concept)", fontsize=9, va="center", ha="left", transform=ax.transAxes)

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
        shown_refs = len(rows_refs[r - 1]) if rows_refs is not None else 0
        if rows_refs is not None and shown_refs < n_refs:  # say why the row is shorter
            why = (f"{shown_refs} of {n_refs}:\nno other sample\nhas positive\n"
                   f"{'relevance' if references.by == 'relevance' else references.by} here")
            if shown_refs < n_ref_cols:
                ax = fig.add_subplot(spec[r, 3 + shown_refs])
                ax.axis("off")
                ax.text(0.05, 0.5, why, fontsize=7, va="center", ha="left", transform=ax.transAxes)
            elif row_axes:  # every row is short: no free cell; the header row says why
                row_axes[0].set_title(f"{shown_refs} of {n_refs} (see above)", fontsize=7, loc="left")
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
