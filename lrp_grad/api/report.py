"""Per-layer relevance sums of one explained batch: :class:`RelevanceReport`."""
from __future__ import annotations

import html
from collections.abc import Mapping

import numpy as np

__all__ = ["RelevanceReport"]


class RelevanceReport(Mapping):
    """Per-layer relevance sums of one explained batch (the seed report's checksum).

    A read-only mapping ``label -> array of shape (n,)``: the relevance summed over each sample
    at the model input (first key) and at the output of every layer call, in forward order. The
    last entry is the initial relevance at the model output. With a conserving rule (``Z`` or
    ``Epsilon`` with tiny epsilon, zero biases) all entries are equal.
    """

    def __init__(self, sums: dict):
        self._sums = dict(sums)

    def __getitem__(self, key):
        return self._sums[key]

    def __iter__(self):
        return iter(self._sums)

    def __len__(self):
        return len(self._sums)

    @property
    def output(self) -> np.ndarray:
        """The initial relevance sum per sample (the explained logit by default)."""
        return self._sums[list(self._sums)[-1]]

    def conservation_gap(self) -> dict:
        """``label -> max_n |sum R_layer - sum R_output| / max(|sum R_output|, tiny)``."""
        ref = self.output
        scale = np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
        return {k: float(np.max(np.abs(v - ref) / scale)) for k, v in self._sums.items()}

    def __str__(self):
        gaps = self.conservation_gap()
        width = max(len(k) for k in self._sums)
        rows = [f"{'layer'.ljust(width)}  {'mean sum R':>14}  {'max rel. gap':>12}"]
        for k, v in self._sums.items():
            rows.append(f"{k.ljust(width)}  {float(np.mean(v)):>14.6g}  {gaps[k]:>12.3g}")
        return "\n".join(rows)

    def __repr__(self):
        return f"RelevanceReport({len(self)} layers, n={len(self.output)})\n{self}"

    def _repr_html_(self):
        """The per-layer table as HTML (Jupyter shows it instead of the text of ``repr``)."""
        gaps = self.conservation_gap()
        rows = "".join(
            f"<tr><td style='text-align:left'>{html.escape(str(k))}</td><td>{float(np.mean(v)):.6g}</td>"
            f"<td>{float(np.min(v)):.6g}</td><td>{float(np.max(v)):.6g}</td><td>{gaps[k]:.3g}</td></tr>"
            for k, v in self._sums.items())
        return (f"<table class='lrp-grad-report'><caption>RelevanceReport: {len(self)} layers, "
                f"n={len(self.output)} (relevance summed per sample; gap = max relative difference to the "
                "output's)</caption><thead><tr><th>layer</th><th>mean sum R</th><th>min</th><th>max</th>"
                f"<th>max rel. gap</th></tr></thead><tbody>{rows}</tbody></table>")
