"""Concepts: which learned features (channels of a layer) carry a decision.

Concept Relevance Propagation (Achtibat et al., Nature Machine Intelligence 2023) on top of the
ordinary LRP pass:

- :func:`concept_relevance` -- ``(n, channels)``: the relevance arriving at each channel of a layer
  (summed over its positions), from the ordinary pass; optionally given a condition above it
  (sub-concepts: which lower features make up a channel).
- :func:`conditional` -- ``(n, k, *input_shape)``: the input relevance that flows through chosen
  channels of a layer (or through a channel of one layer and then one of a lower layer). One
  compiled call computes all ``k`` conditions: the forward pass and the backward pass above the
  highest conditioned layer run once; only the part below it runs per condition, vectorised over
  the conditions (``pfor``), so the layers' LRP-only intermediate terms that depend on the forward
  values alone (e.g. alpha-beta's ``z+``) are computed once as well.
- :func:`reference_samples` -- relevance (or activation) maximisation over a dataset, streamed with
  constant memory: per channel, the samples where it is most relevant (or active), with the
  receptive field of the position that made it so, and crops of it.
- :func:`receptive_field` -- the input box a position of a layer can see (from the layers'
  geometry; a superset where a layer's geometry is unknown).
- :func:`concept_atlas` -- the figure of one decision: its most relevant channels with their
  conditional heatmaps and reference samples (also ``lrp_grad.heatmap.concept_atlas``).

The :class:`~lrp_grad.Explainer` methods ``concept_relevance``, ``conditional`` and
``subconcepts`` call these functions.

The conditional heatmaps of a layer's channels sum to the relevance that flows through that layer:
the backward pass of every rule is linear in the relevance arriving at a layer. When every path
from the input to the explained output passes through the layer (any layer of a plain CNN, a
residual block's output), that is the ordinary heatmap; a layer inside a residual branch
conditions only the relevance passing through it, not the skip connection's.

Modules: :mod:`.resolve` (layers, channels and conditions of a query, :class:`ConceptError`),
:mod:`.relevance` (the compiled conditional pass; ``concept_relevance``, ``conditional``,
``subconcepts``), :mod:`.fields` (receptive fields), :mod:`.references` (reference samples) and
:mod:`.atlas` (the figure). This package re-exports their public names.
"""

from .atlas import concept_atlas
from .fields import receptive_field
from .references import ReferenceSamples, reference_samples
from .relevance import concept_relevance, conditional, subconcepts
from .resolve import ConceptError, layer_channels

__all__ = [
    "ConceptError", "concept_relevance", "conditional", "subconcepts", "reference_samples", "ReferenceSamples",
    "receptive_field", "layer_channels", "concept_atlas",
]
