"""Per-image summaries of explained batches: computed per batch, kept as one table, returned in a DatasetResult.

A summary row holds the ``predicted`` class, the ``target``, the ``target_logit``, the
``relevance_sum`` and the ``conservation_error`` of one image. On disk the rows have the fixed
structured dtype ``_SUMMARY_DTYPE`` (``summaries.bin``, ``summary_*.npy``; a sidecar holds the
columns as JSON); to the caller they are columns (a dict of arrays) in a :class:`DatasetResult`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DatasetResult:
    """Relevance of a dataset and per-image summaries.

    Attributes
    ----------
    relevance : numpy.ndarray or None
        ``(n, ...)`` relevance (a read-only memmap for ``.npy`` output, ``None`` for a directory
        of shards: read it with :func:`load_shards`).
    summaries : dict of numpy.ndarray
        Per image: ``predicted`` class, ``target``, ``target_logit``, ``relevance_sum`` and
        ``conservation_error`` = ``(relevance_sum - target_logit) / |target_logit|``.
    """

    relevance: object
    summaries: dict

    def __len__(self):
        return len(self.summaries["target"])


_SUMMARY_KEYS = ("predicted", "target", "target_logit", "relevance_sum", "conservation_error")
#: One image's summaries, as stored on disk (``summaries.bin``, ``summary_*.npy``).
_SUMMARY_DTYPE = np.dtype([(k, "<i8" if k in ("predicted", "target") else "<f8") for k in _SUMMARY_KEYS])


def _table(columns) -> np.ndarray:
    table = np.zeros(len(columns["target"]), _SUMMARY_DTYPE)
    for k in _SUMMARY_KEYS:
        table[k] = columns[k]
    return table


def _concat_tables(tables):
    return np.concatenate(tables) if tables else np.zeros(0, _SUMMARY_DTYPE)


def _columns(table) -> dict:
    return {k: np.ascontiguousarray(table[k]) for k in _SUMMARY_KEYS}


def _summaries(R, logits, target) -> np.ndarray:
    """The batch's per-image summaries as one structured array (``_SUMMARY_DTYPE``)."""
    table = np.empty(len(R), _SUMMARY_DTYPE)
    chosen = logits.argmax(1) if target is None else target
    total = R.reshape(len(R), -1).sum(1).astype(np.float64)
    logit = logits[np.arange(len(R)), chosen].astype(np.float64)
    table["predicted"] = logits.argmax(1)
    table["target"] = chosen
    table["target_logit"] = logit
    table["relevance_sum"] = total
    table["conservation_error"] = (total - logit) / np.maximum(np.abs(logit), 1e-30)
    return table
