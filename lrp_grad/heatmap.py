"""The public heatmap namespace: heatmaps, overlays, figure grids and PNG files of relevance maps, concept atlases.

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
module never imports TensorFlow, so rendering saved relevance maps does not pay its start-up cost;
only :func:`concept_atlas`, which needs an Explainer, loads the concept code (and TensorFlow) on
first use.

The code lives in :mod:`lrp_grad.visual.colors` (numbers to colours), :mod:`lrp_grad.visual.figures`
(matplotlib figures and PNG files) and :mod:`lrp_grad.concepts.atlas` (the concept atlas).

>>> from lrp_grad import heatmap                                  # doctest: +SKIP
>>> heatmap.save_png(R[0], "digit.png")                           # doctest: +SKIP
>>> fig = heatmap.grid(x[:4], R[:4], titles=["0", "1", "2", "3"])  # doctest: +SKIP
"""
from typing import TYPE_CHECKING

from .visual.colors import SCHEMES, colorize, normalize, overlay, to_2d
from .visual.figures import grid, plot, save_png

if TYPE_CHECKING:  # for readers and tools; at run time it is loaded on first use (__getattr__ below)
    from .concepts.atlas import concept_atlas

__all__ = ["SCHEMES", "to_2d", "normalize", "colorize", "overlay", "plot", "grid", "save_png", "concept_atlas"]


def __getattr__(name):
    # concept_atlas computes with lrp_grad.concepts, which imports TensorFlow: load it on first use only.
    if name == "concept_atlas":
        from .concepts.atlas import concept_atlas

        globals()[name] = concept_atlas
        return concept_atlas
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"concept_atlas"})
