"""Pictures of relevance: heatmaps, overlays and grids, and the notebook-friendly Explanation."""
