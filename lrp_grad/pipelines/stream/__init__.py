"""Explaining whole datasets: streaming in batches with constant memory, resumable output.

Used through :meth:`lrp_grad.Explainer.explain_dataset`. Output goes to memory, to one ``.npy``
file (filled batch by batch in place) or to a directory of shards; either way a batch is recorded
in a manifest only once it is written, so a run that dies can be resumed and a resume never trusts
a half-written batch. A finished ``.npy`` run leaves the file and one sidecar ``<out>.json``
(manifest and summaries); an interrupted one also its working folder ``<out>.parts/``, which a
resume needs.

This package only names what its modules hold:

- :mod:`.reading` -- the data into checked batches (elements, dicts, labels, pairs of arrays);
- :mod:`.summaries` -- the per-image summaries and :class:`DatasetResult`;
- :mod:`.ondisk` -- the output's files and their checks (lock, manifests, digests, atomic writes);
- :mod:`.sinks` -- the ``.npy`` and folder sinks and the background writer thread;
- :mod:`.run` -- :func:`explain_dataset` itself, and :func:`load` / :func:`load_shards`.
"""
from __future__ import annotations

from . import reading, sinks
from .ondisk import OutputError, fingerprint
from .run import explain_dataset, load, load_shards, worker_from_tf_config
from .summaries import DatasetResult

#: Keys a dict element may use for its image and its label.
IMAGE_KEYS, LABEL_KEYS = reading.IMAGE_KEYS, reading.LABEL_KEYS
# Private names other modules reach as ``stream.<name>`` (concepts, the explainer's docstrings, benchmarks).
_batches, _check_block, _pair_of_arrays, _targets = \
    reading._batches, reading._check_block, reading._pair_of_arrays, reading._targets
_NpySink, _FolderSink = sinks._NpySink, sinks._FolderSink

__all__ = ["DatasetResult", "OutputError", "explain_dataset", "fingerprint", "load", "load_shards",
           "worker_from_tf_config"]

# The public classes keep the name they had when this package was one module (tracebacks, pickles, docs).
for _cls in (DatasetResult, OutputError):
    _cls.__module__ = __name__
del _cls
