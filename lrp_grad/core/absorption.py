"""The check that the rules' stabiliser did not swallow the relevance of a tiny explained output.

A rule divides by ``z + epsilon * sign(z)`` (``epsilon`` = :data:`~lrp_grad.core.rules.STABILIZER`
= 1e-6 in the non-epsilon rules): when the explained output itself is far below that, e.g. the
logits 1e-9..1e-19 of a Keras 3 MobileNet with random weights, almost all of its relevance goes
to the stabiliser and the map comes back all zero, which looks like a map and is not one. This
module decides, from per-sample sums the explanation computes anyway, when to say so.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import RelevanceAbsorbedWarning
from .rules import STABILIZER

__all__ = ["TINY_OUTPUT", "NEAR_ZERO", "absorbed_message", "warn_if_absorbed"]

#: An explained output below this (10x the stabiliser) is at the stabiliser's scale.
TINY_OUTPUT = 10 * STABILIZER
#: The input relevance is "near zero" below this share of the initial relevance (a logit 10x below
#: the stabiliser keeps about 1/11 of its relevance at the top layer alone).
NEAR_ZERO = 0.1


def absorbed_message(input_sums, explained, initial, of_what="the explained logit"):
    """The warning text when, for some sample, ``|explained| < TINY_OUTPUT`` and the input relevance
    ``input_sums`` is below ``NEAR_ZERO`` of the ``initial`` relevance (each one number per sample),
    else ``None``. ``of_what`` names the initial relevance ('the explained logit', ...)."""
    input_sums, explained, initial = (np.asarray(v, np.float64).reshape(-1) for v in (input_sums, explained, initial))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = input_sums / initial
    hit = (np.abs(explained) < TINY_OUTPUT) & (initial != 0) & (np.abs(share) < NEAR_ZERO)
    if not hit.any():
        return None
    i = int(np.flatnonzero(hit)[0])
    largest = float(np.max(np.abs(explained[hit])))
    return (
        f"relevance at the input sums to {100 * share[i]:.1f}% of {of_what} ({hit.sum()} of {len(hit)} "
        f"samples; explained output values of magnitude up to {largest:.2g}): the explained output is below the "
        f"rules' stabiliser (epsilon {STABILIZER:g}), which absorbed the rest: the map is that much too small, "
        "or all zero. Outputs this small come from untrained or badly scaled models (e.g. Keras 3 applications with "
        "random weights). Use rule=lrp_grad.Z() (no stabiliser) or a smaller epsilon, e.g. "
        "rule=lrp_grad.Epsilon(1e-12).")


def warn_if_absorbed(input_sums, explained, initial, of_what="the explained logit", stacklevel=2) -> bool:
    """Warn (:class:`~lrp_grad.errors.RelevanceAbsorbedWarning`, a ``UserWarning``) when
    :func:`absorbed_message` finds absorbed relevance; returns whether it warned. ``stacklevel`` as
    for :func:`warnings.warn`, counted from the caller of this function."""
    message = absorbed_message(input_sums, explained, initial, of_what)
    if message is not None:
        warnings.warn(message, RelevanceAbsorbedWarning, stacklevel=stacklevel + 1)
    return message is not None
