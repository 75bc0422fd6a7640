"""The explainer API: :class:`~lrp_grad.Explainer` (a facade over request checks and compiled
passes) and the module-level :func:`~lrp_grad.explain` with its cache."""
