"""Running ``explain_dataset`` (arguments, lock, the batch loop) and reading its output back (``load``).

:func:`explain_dataset` checks its arguments, takes the output's lock, opens a sink and explains
batch by batch (:func:`_stream`), handing each batch to the writer thread. :func:`load` and
:func:`load_shards` read a finished output back, checked against its manifest(s).
"""
from __future__ import annotations

import json
import os
import pathlib
import warnings

import numpy as np

from ...core.absorption import absorbed_message
from ...errors import InvalidInputError, RelevanceAbsorbedWarning
from .ondisk import (OutputError, _Lock, _matches, _read_manifest, _read_sidecar, _sidecar, _target_mode,
                     _verify_folder, _verify_npy, _write_error, fingerprint)
from .reading import _batches, _length, _pair_of_arrays, _targets
from .sinks import _FolderSink, _NpySink, _Writer
from .summaries import DatasetResult, _columns, _concat_tables, _summaries


def explain_dataset(explainer, data, target="auto", batch_size=256, out=None, resume=False, progress=True,
                    length=None, worker=None) -> DatasetResult:
    """Explain a whole dataset with ``explainer`` in batches, with constant memory when writing to disk.

    Parameters
    ----------
    data : tf.data.Dataset, numpy array, (images, labels) arrays or iterable
        Images, ``(image, label)`` pairs, or dicts with an image key (``'image'``, ``'x'``,
        ...) and optionally a label key (``'label'``, ``'y'``, ...); elements may be single
        images or batches. Labels may be class indices (any integer dtype, or whole floats) or
        one-hot rows; each must be a class of the model (an error names the element otherwise),
        either every element has one or none has, and they are read only for ``target`` 'auto'
        or 'label'. The order is preserved.
    target : 'auto', 'label', 'predicted', None or int
        ``'auto'`` (default): the label of each element when the data has labels, else the
        predicted class. ``'label'``: the labels (an error without them). ``'predicted'``
        (``None`` too) or one class index for all.
    batch_size : int
        Images per compiled call (a last partial batch does not recompile).
    out : path, optional
        ``None``: return the relevance in memory. ``'file.npy'``: write the rows into one
        ``.npy`` batch by batch (needs the length); a finished run leaves it and one sidecar
        ``file.npy.json`` (manifest and per-image summaries; the working folder
        ``file.npy.parts/`` exists only while a run is unfinished). ``'folder'``: one
        ``shard_*.npy`` per batch. Progress is recorded in a manifest after each batch is written. One process writes an output at a
        time (a lock file with its pid and host; a lock left by a dead process is taken over);
        the disk space of a ``.npy`` output is reserved up front.
    resume : bool
        Continue a run that stopped, skipping the images already written. Refuses (naming the
        change) when the output was written by another model, rule, canonizers, output,
        compute_dtype (see :func:`~lrp_grad.pipelines.stream.ondisk.fingerprint`), target choice or
        batch size, when the data differs from what was explained before (each batch's images are
        hashed in the manifest), or when the output files were deleted, truncated or changed
        since (checked against per-batch hashes before anything is trusted).
    progress : bool
        Show a progress bar (tqdm, if installed).
    length : int, optional
        Number of images, when it cannot be read from ``data``.
    worker : 'auto', (index, count) or None
        Share the work among ``count`` processes: this one explains every ``count``-th batch
        and writes its own shards and manifest into the ``out`` folder;
        :func:`lrp_grad.stream.load` merges them in order. ``'auto'`` reads ``TF_CONFIG``.

    Returns
    -------
    lrp_grad.stream.DatasetResult
        ``relevance`` and per-image ``summaries`` (predicted class, target, target logit,
        relevance sum, conservation error).
    """
    explainer.signature.require_classifier("explain_dataset")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")
    batch_size = int(batch_size)  # numpy integers are ints too (np.int64(2))
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1):
        raise InvalidInputError(f"length must be a positive int or None, got {length!r}.")
    length = None if length is None else int(length)
    _targets(target, np.zeros(0, np.int64), 0)  # validates the target choice before any work
    worker = _check_worker(worker)
    data, pair_length = _pair_of_arrays(data, len(explainer.input_shape))
    if length is None:
        length = pair_length or _length(data, len(explainer.input_shape))
    out = None if out is None else pathlib.Path(out)
    if worker is not None and (out is None or out.suffix == ".npy"):
        raise InvalidInputError("with several workers, out= must be a folder: every worker writes its own shards "
                                "and manifest, and lrp_grad.stream.load(folder) merges them in order.")
    if out is None:
        return _stream(explainer, data, target, batch_size, None, progress, length, worker)
    npy = out.suffix == ".npy"
    if npy and length is None:
        raise InvalidInputError(f"out={str(out)!r} (one .npy file) needs the dataset length; pass length= "
                                "or write to a directory of shards instead (out='folder/').")
    if npy and out.exists() and out.is_dir():
        raise OutputError(f"out={str(out)!r} is a folder; give a .npy file path or a folder without the .npy suffix.")
    if not npy and out.exists() and not out.is_dir():
        raise OutputError(f"out={str(out)!r} is a file; give a folder for shards, or a path ending in .npy.")
    parts_dir = out.with_name(out.name + ".parts") if npy else out
    try:
        parts_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(parts_dir, e) from None
    lock_name = "lock" if worker is None else f"lock_worker{worker[0]}of{worker[1]}"
    try:
        with _Lock(parts_dir / lock_name, out):
            return _explain_to(explainer, data, target, batch_size, out, npy, parts_dir, resume, progress, length,
                               worker)
    finally:
        if npy:  # empty once a run finished (an interrupted one keeps its manifest there, to resume)
            try:
                parts_dir.rmdir()
            except OSError:
                pass


def worker_from_tf_config():
    """``(task_index, number_of_workers)`` from the ``TF_CONFIG`` environment variable, or ``None``."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
        workers = len(config["cluster"]["worker"]) + len(config["cluster"].get("chief", []))
        task = config["task"]
        index = int(task["index"]) + (1 if task["type"] == "worker" and config["cluster"].get("chief") else 0)
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"TF_CONFIG is not a valid cluster description ({e}): {raw[:200]}") from None
    return index, workers


def _check_worker(worker):
    if worker == "auto":
        worker = worker_from_tf_config()
    if worker is None:
        return None
    if (not isinstance(worker, (tuple, list)) or len(worker) != 2
            or not all(isinstance(v, (int, np.integer)) for v in worker) or not 0 <= worker[0] < worker[1]):
        raise InvalidInputError(f"worker must be 'auto', None or (index, count) with 0 <= index < count, got {worker!r}.")
    return int(worker[0]), int(worker[1])


def _explain_to(explainer, data, target, batch_size, out, npy, parts_dir, resume, progress, length, worker):
    # When resuming, check that the output was written by the same explainer, target choice and
    # data, and that what it says was written is still there, intact.
    fp = fingerprint(explainer)
    fp["target"] = _target_mode(target)
    dtype = np.dtype(explainer.dtype)
    if npy:
        sink = _NpySink(out, parts_dir, fp, batch_size, (int(length),) + tuple(explainer.input_shape), dtype, resume)
    else:
        sink = _FolderSink(out, fp, batch_size, worker, resume)
    return _stream(explainer, data, target, batch_size, sink, progress, length, worker)


def _stream(explainer, data, target, batch_size, sink, progress, length, worker):
    """Explain batch by batch; with a ``sink``, write each batch and then record it in the manifest."""
    finished = {} if sink is None else {b[0]: b for b in sink.batches}
    limit = None if sink is None else length
    parts, summaries = [], []
    bar = _bar(progress, length, sum(b[1] for b in finished.values()))
    writer = None if sink is None else _Writer(sink)
    warned = False
    try:
        for x, labels, start in _batches(data, explainer, batch_size, target):
            if limit is not None and start + len(x) > limit:
                raise InvalidInputError(f"the dataset has more than length={limit} images (image {start + len(x) - 1} "
                                        "arrived); pass the right length= (or leave it out for a folder output).")
            mine = worker is None or (start // batch_size) % worker[1] == worker[0]
            if not mine:
                continue
            if start in finished:
                if not _matches(x, finished[start][2]):
                    raise InvalidInputError(
                        f"cannot resume {sink.out}: images {start}..{start + len(x) - 1} differ from the ones "
                        "explained before (the data changed or comes in another order). Resume only with the same "
                        "data in the same order, or start over with resume=False."
                    )
                continue
            t = _targets(target, labels, len(x))
            R, logits = explainer._explain_with_logits(x, t)
            summary = _summaries(R, logits, t)
            if not warned:  # the stabiliser absorbed a tiny logit: once per run, from the summaries
                warned = _warn_if_absorbed(summary, start)
            if sink is None:
                parts.append(R)
                summaries.append(summary)
            else:
                writer.put(start, x, R, summary)
            if bar is not None:
                bar.update(len(x))
    except BaseException:
        if writer is not None:
            try:
                writer.close()  # every batch handed over is written and recorded
            finally:
                sink.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    if sink is None:
        relevance = np.concatenate(parts) if parts else np.zeros((0,) + tuple(explainer.input_shape), explainer.dtype)
        return DatasetResult(relevance, _columns(_concat_tables(summaries)))
    try:
        writer.close()  # raises a write error of the last batch
    except BaseException:
        sink.close()
        raise
    return sink.finish()


def _warn_if_absorbed(summary, start) -> bool:
    """:mod:`lrp_grad.core.absorption`'s warning for one batch's summaries; whether it warned."""
    message = absorbed_message(summary["relevance_sum"], summary["target_logit"], summary["target_logit"])
    if message is not None:
        warnings.warn(f"{message} (First seen in images {start}..{start + len(summary) - 1}; warned once per run.)",
                      RelevanceAbsorbedWarning, stacklevel=5)  # explain_dataset's caller (in memory)
    return message is not None


def _bar(progress, total, initial):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="explaining", unit="img")


def load(path) -> DatasetResult:
    """What ``explain_dataset`` wrote to ``path``, checked against its manifest.

    A folder: merges, in dataset order, what one or several workers wrote (raises
    :class:`InvalidInputError` when a batch is missing: a worker has not finished). A ``.npy``
    file (or its ``<out>.json`` sidecar): the relevance as a read-only memmap and the summaries of a
    finished run. Either way a changed, truncated or missing file is an :class:`OutputError`.
    """
    path = pathlib.Path(path)
    if path.name.endswith(".npy.json"):
        path = path.with_name(path.name[:-5])
    if path.suffix == ".npy" and not path.is_dir():
        return _load_npy(path)
    folder = path
    manifests = sorted(folder.glob("manifest*.json"))
    if not manifests:
        raise InvalidInputError(f"no manifest*.json in {folder}: not an explain_dataset output folder.")
    batches = sorted({tuple(b) for m in manifests for b in _read_manifest(m, folder)["batches"]})
    expected = 0
    for start, count, *_ in batches:
        if start != expected:
            raise InvalidInputError(f"{folder}: images {expected}..{start - 1} are missing (a worker has not finished "
                                    "or was not started); resume it with resume=True.")
        expected = start + count
    summaries = _verify_folder(folder, folder, batches, verb="load")
    relevance = np.concatenate([np.load(folder / f"shard_{s:09d}.npy") for s, *_ in batches]) if batches else None
    return DatasetResult(relevance, _columns(_concat_tables([summaries[s] for s, *_ in batches])))


def _load_npy(out: pathlib.Path) -> DatasetResult:
    side = _sidecar(out)
    if not side.exists():
        parts = out.with_name(out.name + ".parts")
        if parts.exists():
            raise InvalidInputError(f"{out} is not finished (its working folder {parts} is still there): resume the "
                                    "run with resume=True.")
        raise InvalidInputError(f"no {side.name} next to {out}: not an explain_dataset output.")
    manifest, summaries = _read_sidecar(side, out, verb="load")
    batches = manifest["batches"]
    _verify_npy(out, batches, summaries, None, None, verb="load")
    done = sum(b[1] for b in batches)
    table = _concat_tables([summaries[b[0]] for b in batches])
    return DatasetResult(np.load(out, mmap_mode="r")[:done], _columns(table))


def load_shards(folder) -> np.ndarray:
    """The relevance an ``explain_dataset`` run (one or several workers) wrote into ``folder``, in order."""
    return load(folder).relevance
