"""Explanations as data: whole datasets streamed to disk with safe resume, and servable SavedModels."""
