"""Explaining whole datasets: streaming in batches with constant memory, resumable output.

Used through :meth:`lrp_grad.Explainer.explain_dataset`. Output goes to memory, to one ``.npy``
file (a memmap, filled batch by batch) or to a directory of shards; either way a manifest is
rewritten atomically after each batch is safely on disk, so a run that dies can be resumed and a
resume never trusts a half-written batch.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError

__all__ = ["DatasetResult", "explain_dataset", "fingerprint", "load", "load_shards", "worker_from_tf_config"]


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


def fingerprint(explainer) -> dict:
    """What a resumed run must share with the run that wrote the output."""
    digest = hashlib.sha256()
    for w in explainer.model.weights:
        digest.update(np.ascontiguousarray(w.numpy()).tobytes())
    return {"model": explainer.model.name, "weights_sha256": digest.hexdigest(),
            "rule": str(explainer.rule), "input_shape": list(explainer.input_shape),
            "dtype": str(explainer.dtype)}


def _elements(data, input_rank):
    """Yield ``(image_or_batch, label_or_None, batched)`` from a Dataset, array or iterator."""
    if isinstance(data, np.ndarray):
        yield data, None, True
        return
    try:
        import tensorflow as tf

        if isinstance(data, tf.data.Dataset):
            data = data.as_numpy_iterator()
    except ImportError:  # pragma: no cover
        pass
    for element in data:
        label = None
        if isinstance(element, (tuple, list)):
            if len(element) != 2:
                raise InvalidInputError(f"dataset elements must be images or (image, label) pairs, got a "
                                        f"{type(element).__name__} of length {len(element)}.")
            element, label = element
        element = np.asarray(element)
        yield element, label, element.ndim == input_rank + 1


def _batches(data, explainer, batch_size):
    """Regroup the stream into ``(x, labels, first_index)`` batches of ``batch_size``; checks each element."""
    shape = tuple(explainer.input_shape)
    xs, ys, index, start = [], [], 0, 0
    for element, label, batched in _elements(data, len(shape)):
        images = element if batched else element[None]
        labels = (np.full(len(images), -1) if label is None else
                  np.atleast_1d(np.asarray(label)).reshape(-1) if batched else np.asarray([label]).reshape(-1))
        for k in range(len(images)):
            image = images[k]
            if len(image.shape) != len(shape) or not all(d is None or d == s for d, s in zip(shape, image.shape)):
                raise InvalidInputError(f"dataset element {index} has shape {image.shape}; the model takes "
                                        f"{shape}.")
            if image.dtype == bool or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
                raise InvalidInputError(f"dataset element {index} has dtype {image.dtype}; images must hold real numbers.")
            xs.append(image)
            ys.append(labels[k] if len(labels) == len(images) else -1)
            if len(xs) == batch_size:
                yield np.stack(xs), np.asarray(ys), start
                start += len(xs)
                xs, ys = [], []
            index += 1
    if xs:
        yield np.stack(xs), np.asarray(ys), start


def _write_json(path: pathlib.Path, payload):
    """Atomic rewrite: a reader sees the old or the new manifest, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _targets(target, labels, n):
    if isinstance(target, str) and target == "label":
        if np.any(labels < 0):
            raise InvalidInputError("target='label' needs (image, label) elements; this data has no labels. Use "
                                    "target='predicted' or a class index.")
        return labels.astype(np.int32)
    if target is None or (isinstance(target, str) and target == "predicted"):
        return None
    if isinstance(target, (int, np.integer)):
        return np.full(n, int(target), np.int32)
    raise InvalidInputError(f"target must be 'label', 'predicted', None or an int class index, got {target!r}.")


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


def explain_dataset(explainer, data, target="label", batch_size=256, out=None, resume=False, progress=True,
                    length=None, worker=None) -> DatasetResult:
    """See :meth:`lrp_grad.Explainer.explain_dataset`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")
    worker = _check_worker(worker)
    if length is None:
        length = _length(data, len(explainer.input_shape))
    out = None if out is None else pathlib.Path(out)
    fp = fingerprint(explainer)
    batches = []
    if worker is not None and (out is None or out.suffix == ".npy"):
        raise InvalidInputError("with several workers, out= must be a folder: every worker writes its own shards "
                                "and manifest, and lrp_grad.stream.load(folder) merges them in order.")

    # 1. Prepare the output and, when resuming, check that it was written by the same explainer.
    if out is not None:
        npy = out.suffix == ".npy"
        parts_dir = out.with_name(out.name + ".parts") if npy else out
        name = "manifest.json" if worker is None else f"manifest_worker{worker[0]}of{worker[1]}.json"
        manifest_path = parts_dir / name
        if resume and manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            if manifest["fingerprint"] != fp or manifest["batch_size"] != batch_size:
                diff = [k for k in fp if manifest["fingerprint"].get(k) != fp[k]]
                if manifest["batch_size"] != batch_size:
                    diff.append("batch_size")
                raise InvalidInputError(
                    f"cannot resume {out}: it was written by a different model, rule or batch size (differs in "
                    f"{diff}). Use a new output path, or resume=False to start over."
                )
            batches = [tuple(b) for b in manifest["batches"]]
        elif manifest_path.exists():
            manifest_path.unlink()  # starting over: nothing written before may be trusted
        parts_dir.mkdir(parents=True, exist_ok=True)
        if npy:
            if length is None:
                raise InvalidInputError(f"out={str(out)!r} (one .npy file) needs the dataset length; pass length= "
                                        "or write to a directory of shards instead (out='folder/').")
            shape = (length,) + tuple(explainer.input_shape)
            mode = "r+" if (batches and out.exists()) else "w+"
            memmap = np.lib.format.open_memmap(out, mode=mode, dtype=explainer.dtype, shape=shape)
    finished = {start for start, _ in batches}
    parts, summaries = [], []

    # 2. Stream: explain a batch, write it and its summaries, then record it in the manifest.
    bar = _bar(progress, length, sum(n for _, n in batches))
    for x, labels, start in _batches(data, explainer, batch_size):
        mine = worker is None or (start // batch_size) % worker[1] == worker[0]
        if start in finished or not mine:
            continue
        t = _targets(target, labels, len(x))
        R, logits = explainer._explain_with_logits(x, t)
        summary = _summaries(R, logits, t)
        if out is None:
            parts.append(R)
            summaries.append(summary)
        else:
            if npy:
                memmap[start:start + len(x)] = R
                memmap.flush()
            else:
                _save_atomic(parts_dir / f"shard_{start:09d}.npy", R)
            _save_atomic(parts_dir / f"summary_{start:09d}.npz", summary)
            batches.append((start, len(x)))
            _write_json(manifest_path, {"fingerprint": fp, "batch_size": batch_size, "worker": worker,
                                        "done": sum(n for _, n in batches), "batches": batches})
        if bar is not None:
            bar.update(len(x))
    if bar is not None:
        bar.close()

    # 3. Collect the results.
    if out is None:
        relevance = np.concatenate(parts) if parts else np.zeros((0,) + tuple(explainer.input_shape), explainer.dtype)
        merged = _merge_summaries(summaries)
    elif npy:
        memmap.flush()
        del memmap
        merged = _merge_summaries([dict(np.load(parts_dir / f"summary_{s:09d}.npz")) for s, _ in sorted(batches)])
        relevance = np.load(out, mmap_mode="r")[: sum(n for _, n in batches)]
    else:
        merged = _merge_summaries([dict(np.load(parts_dir / f"summary_{s:09d}.npz")) for s, _ in sorted(batches)])
        relevance = None
    return DatasetResult(relevance, merged)


_SUMMARY_KEYS = ("predicted", "target", "target_logit", "relevance_sum", "conservation_error")


def _merge_summaries(summaries):
    return {k: np.concatenate([s[k] for s in summaries]) if summaries else np.zeros(0) for k in _SUMMARY_KEYS}


def _summaries(R, logits, target):
    rows = np.arange(len(R))
    chosen = logits.argmax(1) if target is None else target
    total = R.reshape(len(R), -1).sum(1).astype(np.float64)
    logit = logits[rows, chosen].astype(np.float64)
    return {"predicted": logits.argmax(1), "target": np.asarray(chosen), "target_logit": logit,
            "relevance_sum": total, "conservation_error": (total - logit) / np.maximum(np.abs(logit), 1e-30)}


def _save_atomic(path: pathlib.Path, payload):
    """Write ``path`` completely or not at all (write a temporary file, then rename)."""
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    if path.suffix == ".npz":
        np.savez(tmp, **payload)
    else:
        np.save(tmp, payload)
    os.replace(tmp, path)


def load(folder) -> DatasetResult:
    """Merge, in dataset order, what one or several workers wrote into ``folder``.

    Raises :class:`InvalidInputError` when a batch is missing (a worker has not finished).
    """
    folder = pathlib.Path(folder)
    manifests = sorted(folder.glob("manifest*.json"))
    if not manifests:
        raise InvalidInputError(f"no manifest*.json in {folder}: not an explain_dataset output folder.")
    batches = sorted({tuple(b) for m in manifests for b in json.loads(m.read_text())["batches"]})
    expected = 0
    for start, count in batches:
        if start != expected:
            raise InvalidInputError(f"{folder}: images {expected}..{start - 1} are missing (a worker has not finished "
                                    "or was not started); resume it with resume=True.")
        expected = start + count
    relevance = np.concatenate([np.load(folder / f"shard_{s:09d}.npy") for s, _ in batches]) if batches else None
    summaries = _merge_summaries([dict(np.load(folder / f"summary_{s:09d}.npz")) for s, _ in batches])
    return DatasetResult(relevance, summaries)


def load_shards(folder) -> np.ndarray:
    """The relevance an ``explain_dataset`` run (one or several workers) wrote into ``folder``, in order."""
    return load(folder).relevance


def _length(data, input_rank):
    """Number of images, when it can be known without reading the data."""
    if isinstance(data, np.ndarray):
        return len(data)
    try:
        import tensorflow as tf

        if isinstance(data, tf.data.Dataset):
            spec = data.element_spec
            spec = spec[0] if isinstance(spec, (tuple, list)) else spec
            n = int(data.cardinality())
            if spec.shape.rank != input_rank or n < 0:  # batched elements: cardinality counts batches
                return None
            return n
    except ImportError:  # pragma: no cover
        pass
    return len(data) if hasattr(data, "__len__") else None


def _bar(progress, total, initial):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="explaining", unit="img")
