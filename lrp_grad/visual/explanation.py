"""The result of :meth:`Explainer.explain_images <lrp_grad.Explainer.explain_images>`: images,
relevance, targets, logits and the per-layer report in one object that renders itself.

In Jupyter an :class:`Explanation` shows as its heatmap grid (inputs above, relevance below, one
colour scale for all maps) with a per-image and a per-layer table (``_repr_html_``), or as the
grid alone (``_repr_png_``); both need matplotlib, and without it the notebook shows the plain
text of ``repr()``. :meth:`Explanation.grid_array` builds the same kind of grid as a uint8 RGB
array with numpy alone (what :class:`lrp_grad.callbacks.RelevanceCallback` logs to TensorBoard).

>>> ex = lrp_grad.Explainer(model)                  # doctest: +SKIP
>>> explanation = ex.explain_images(x[:8])          # doctest: +SKIP
>>> explanation                                     # doctest: +SKIP  (in a notebook: the grid and tables)
>>> fig = explanation.show()                        # doctest: +SKIP
"""
from __future__ import annotations

import base64
import html
import io
import math
import numbers

import numpy as np

from .colors import colorize, to_2d
from .figures import grid
from ..errors import InvalidInputError, InvalidTargetError

__all__ = ["Explanation", "explain_images", "grid_array"]

#: Gray of the lines between the cells of :func:`grid_array`.
_GAP_GRAY = 0.6


def _matplotlib_available() -> bool:
    """Whether matplotlib can be imported (the rich reprs need it; plain text otherwise)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _display(image: np.ndarray) -> np.ndarray:
    """One input image as RGB ``(H, W, 3)`` in ``[0, 1]``: min-max scaled, gray repeated."""
    a = np.asarray(image, np.float64)
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise InvalidInputError(f"an image of shape {image.shape} cannot be shown: it must be (H, W) or (H, W, C) "
                                "with C in 1, 3, 4.")
    low, high = float(a.min()), float(a.max())
    a = (a - low) / (high - low) if high > low else np.clip(a, 0.0, 1.0)
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


def grid_array(images, relevance, scheme: str = "lrp", *, ncols: int = 8, zoom: int = 1,
               gap: int = 2) -> np.ndarray:
    """A grid of inputs (top) and their heatmaps (below) as one uint8 RGB image, with numpy alone.

    All heatmaps share one colour scale (``max |R|`` over the whole batch), so their colours can
    be compared: the maps are laid into one mosaic and coloured by :func:`lrp_grad.heatmap.colorize`
    at once. Images are min-max scaled each. More than ``ncols`` samples wrap into further
    (image, heatmap) row pairs; ``zoom`` enlarges every pixel to a ``zoom x zoom`` square.

    Returns
    -------
    numpy.ndarray
        ``(rows * (H + gap) + gap, cols * (W + gap) + gap, 3)`` uint8 (times ``zoom``).
    """
    flats = [to_2d(r) for r in relevance]
    if images is not None and len(images) != len(flats):
        raise ValueError(f"got {len(images)} images but {len(flats)} relevance maps; pass one image per map.")
    for name, value in (("ncols", ncols), ("zoom", zoom)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if isinstance(gap, bool) or not isinstance(gap, numbers.Integral) or gap < 0:
        raise ValueError(f"gap must be a non-negative int, got {gap!r}.")
    n = len(flats)
    if n == 0:
        raise ValueError("relevance is empty; there is nothing to draw.")
    h, w = flats[0].shape
    if any(f.shape != (h, w) for f in flats):
        raise ValueError(f"relevance maps differ in size ({sorted({f.shape for f in flats})}); a grid needs one size.")
    cols = min(int(ncols), n)
    per = 1 if images is None else 2
    rows = math.ceil(n / cols) * per
    height, width = rows * (h + gap) + gap, cols * (w + gap) + gap
    mosaic = np.zeros((height, width))
    cell = np.zeros((height, width), bool)

    def corner(i, row):
        block, col = divmod(i, cols)
        return gap + (block * per + row) * (h + gap), gap + col * (w + gap)

    for i, flat in enumerate(flats):
        y, x = corner(i, per - 1)
        mosaic[y:y + h, x:x + w] = flat
        cell[y:y + h, x:x + w] = True
    rgb = colorize(mosaic, scheme)  # one normalisation for all maps: a shared scale
    if images is not None:
        for i, image in enumerate(images):
            picture = _display(image)
            if picture.shape[:2] != (h, w):
                raise ValueError(f"images[{i}] has shape {np.shape(image)} but its relevance map is {(h, w)}.")
            y, x = corner(i, 0)
            rgb[y:y + h, x:x + w] = picture
            cell[y:y + h, x:x + w] = True
    rgb[~cell] = _GAP_GRAY
    if zoom > 1:
        rgb = np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)
    return np.round(rgb * 255.0).astype(np.uint8)


class Explanation:
    """Images explained by LRP, with what explains them; renders itself in Jupyter.

    Made by :meth:`lrp_grad.Explainer.explain_images`. Attributes (numpy arrays, batch first):

    ``images`` ``(n, ...)``
        The inputs as explained (the model's float dtype).
    ``relevance`` ``(n, ...)``
        Relevance shaped like ``images``.
    ``targets`` ``(n,)``
        The explained class of each image (the predicted one unless a target was given).
    ``logits`` ``(n, classes)``
        The model's logits (a final softmax or sigmoid skipped, as explained).
    ``report``
        The :class:`~lrp_grad.RelevanceReport` of per-layer relevance sums.
    """

    def __init__(self, images, relevance, targets, logits, report, *, model_name: str = "", rule: str = ""):
        self.images = np.asarray(images)
        self.relevance = np.asarray(relevance)
        self.targets = np.asarray(targets)
        self.logits = np.asarray(logits)
        self.report = report
        self.model_name = model_name
        self.rule = rule
        n = len(self.images)
        if not (len(self.relevance) == len(self.targets) == len(self.logits) == n):
            raise ValueError(f"images, relevance, targets and logits must have one row per image; got "
                             f"{n}, {len(self.relevance)}, {len(self.targets)}, {len(self.logits)}.")

    def __len__(self):
        return len(self.images)

    # ------------------------------------------------------------------ per-image numbers

    @property
    def predicted(self) -> np.ndarray:
        """The predicted class of each image (argmax of the logits)."""
        return np.argmax(self.logits, axis=-1)

    @property
    def explained_logits(self) -> np.ndarray:
        """The logit of each image's target class: what the relevance explains."""
        return self.logits[np.arange(len(self)), self.targets]

    @property
    def relevance_sums(self) -> np.ndarray:
        """The relevance summed over each image (float64)."""
        return self.relevance.reshape(len(self), -1).sum(axis=1, dtype=np.float64)

    @property
    def conservation_gaps(self) -> np.ndarray:
        """Per image ``|sum R - R_output| / max(|R_output|, tiny)``, ``R_output`` the initial relevance
        (the explained logit by default): 0 for a conserving rule, the share of the relevance that
        biases and stabilisers absorbed (or added) otherwise."""
        start = np.asarray(self.report.output, np.float64)
        return np.abs(self.relevance_sums - start) / np.maximum(np.abs(start), np.finfo(np.float64).tiny)

    def titles(self) -> list:
        """One short title per image: the target, and the predicted class when it differs."""
        out = []
        for t, p, z in zip(self.targets, self.predicted, self.explained_logits):
            out.append(f"class {int(t)}" + ("" if t == p else f" (pred. {int(p)})") + f"\nlogit {float(z):.3g}")
        return out

    # ------------------------------------------------------------------ pictures

    def grid_array(self, scheme: str = "lrp", *, ncols: int = 8, zoom: int = 1) -> np.ndarray:
        """The images above their heatmaps, one colour scale for all, as a uint8 RGB array (numpy only;
        see :func:`grid_array`)."""
        return grid_array(self.images, self.relevance, scheme, ncols=ncols, zoom=zoom)

    def show(self, scheme: str = "lrp", *, ncols: int | None = None, titles=None):
        """A matplotlib figure: each image above its heatmap, one colour scale for all maps
        (:func:`lrp_grad.heatmap.grid` with ``shared_scale=True``); titles name the target class and
        its logit. Needs matplotlib; close it with ``matplotlib.pyplot.close(fig)``."""
        return grid(self.images, self.relevance, titles=self.titles() if titles is None else titles,
                            scheme=scheme, ncols=ncols if ncols is not None else min(len(self), 8),
                            shared_scale=True)

    def _png(self) -> bytes:
        """The :meth:`show` figure as PNG bytes, drawn once (Jupyter asks for HTML and PNG in turn)."""
        key = tuple(id(a) for a in (self.images, self.relevance, self.targets, self.logits))
        cached = getattr(self, "_png_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        import matplotlib.pyplot as plt

        fig = self.show()
        try:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=100)
        finally:
            plt.close(fig)
        self._png_cache = (key, buffer.getvalue())
        return self._png_cache[1]

    # ------------------------------------------------------------------ reprs

    def _summary_line(self) -> str:
        model = f" of model {self.model_name!r}" if self.model_name else ""
        rule = f", rule {self.rule}" if self.rule else ""
        shape = "x".join(str(d) for d in self.images.shape[1:])
        return f"Explanation{model}: {len(self)} images {shape}{rule}"

    def _rows(self):
        return zip(range(len(self)), self.targets, self.predicted, self.explained_logits, self.relevance_sums,
                   self.conservation_gaps)

    def __str__(self):
        head = f"{'image':>5}  {'target':>6}  {'predicted':>9}  {'explained logit':>15}  {'sum R':>12}  {'gap':>9}"
        rows = [f"{i:>5}  {int(t):>6}  {int(p):>9}  {float(z):>15.6g}  {float(s):>12.6g}  {float(g):>9.3g}"
                for i, t, p, z, s, g in self._rows()]
        return "\n".join([self._summary_line(), head, *rows, "", "per-layer relevance sums:", str(self.report)])

    def __repr__(self):
        return str(self)

    def _repr_png_(self):
        """The heatmap grid as PNG bytes, or ``None`` without matplotlib (Jupyter then shows the text)."""
        if not _matplotlib_available():
            return None
        return self._png()

    def _repr_html_(self):
        """The heatmap grid (embedded base64 PNG), a per-image and a per-layer table; ``None`` without
        matplotlib (Jupyter then shows the text)."""
        if not _matplotlib_available():
            return None
        png = base64.b64encode(self._png()).decode("ascii")
        cells = "".join(
            f"<tr><td>{i}</td><td>{int(t)}</td><td>{int(p)}</td><td>{float(z):.6g}</td><td>{float(s):.6g}</td>"
            f"<td>{float(g):.3g}</td></tr>" for i, t, p, z, s, g in self._rows())
        images = (
            "<table><thead><tr><th>image</th><th>target</th><th>predicted</th><th>explained logit</th>"
            f"<th>sum R</th><th>conservation gap</th></tr></thead><tbody>{cells}</tbody></table>")
        report_html = getattr(self.report, "_repr_html_", None)
        layers = report_html() if report_html is not None else f"<pre>{html.escape(str(self.report))}</pre>"
        return (f'<div class="lrp-grad-explanation"><p><b>{html.escape(self._summary_line())}</b></p>'
                f'<img src="data:image/png;base64,{png}" alt="inputs and LRP heatmaps"/>'
                f"{images}<details><summary>per-layer relevance sums</summary>{layers}</details></div>")


def explain_images(explainer, x, target=None, **kw) -> Explanation:
    """:meth:`lrp_grad.Explainer.explain_images`: one target per image of a single-input classifier.

    ``target``: ``None`` (the predicted class), an int or an int array of shape ``(n,)``; ``kw`` go to
    the Explainer call (``batch_size``, ``initial``).
    """
    explainer.signature.require_classifier("explain_images")
    unknown = sorted(set(kw) - {"batch_size", "initial"})
    if unknown:
        raise TypeError(f"explain_images got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                        "it takes target=, batch_size= and initial=.")
    initial = kw.get("initial", "logit")
    if not (isinstance(initial, str) or callable(initial)):
        raise InvalidTargetError("explain_images takes initial='logit', 'one' or a callable (logits, target) -> "
                                 "relevance; for an initial relevance array call the Explainer itself.")
    if isinstance(target, str) or (target is not None and np.ndim(target) > 1):
        raise InvalidTargetError(
            f"explain_images explains one target per image (None, an int or an int array of shape (n,)); got "
            f"{target!r}. For several targets per image call the Explainer itself (target='all' or (n, k)).")
    if target is not None and np.ndim(target) == 1 and not np.issubdtype(np.asarray(target).dtype, np.integer):
        raise InvalidTargetError(f"explain_images takes class indices; got target with dtype "
                                 f"{np.asarray(target).dtype} (a mask): call the Explainer itself for masks.")
    xs, _ = explainer.signature.inputs(x)
    images = xs[0]
    if target is not None:
        _, target = explainer.signature.target(target, len(images))  # dtype, shape and range, with the usual messages
    # One pass gives the relevance, the logits and (target None) the predicted class chosen in it.
    (relevance,), logits, report = explainer.explain_checked(xs, target, initial, True, kw.get("batch_size"))
    targets = np.argmax(logits, axis=-1).astype(np.int32) if target is None else target
    return Explanation(images, relevance, targets, logits, report, model_name=explainer.model.name,
                       rule=explainer.rule.name)
