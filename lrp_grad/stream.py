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
import shutil
import socket
import time
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError, LRPError


class OutputError(LRPError, RuntimeError):
    """An ``explain_dataset`` output cannot be trusted or written (damaged, locked, no space)."""

__all__ = ["DatasetResult", "OutputError", "explain_dataset", "fingerprint", "load", "load_shards",
           "worker_from_tf_config"]

#: Keys a dict element may use for its image and its label (``tf.data`` pipelines of dicts).
IMAGE_KEYS = ("image", "images", "x", "input", "inputs", "pixels")
LABEL_KEYS = ("label", "labels", "y", "target", "class")


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
        if isinstance(element, dict):
            element, label = _from_dict(element)
        elif isinstance(element, (tuple, list)):
            if len(element) != 2:
                raise InvalidInputError(f"dataset elements must be images or (image, label) pairs, got a "
                                        f"{type(element).__name__} of length {len(element)}.")
            element, label = element
        element = np.asarray(element)
        yield element, label, element.ndim == input_rank + 1


def _from_dict(element):
    """``(image, label or None)`` of a dict element, by the usual key names."""
    image_key = next((k for k in IMAGE_KEYS if k in element), None)
    if image_key is None:
        raise InvalidInputError(f"dataset element is a dict with keys {sorted(element)}; lrp_grad reads the image "
                                f"from one of {list(IMAGE_KEYS)} (and the label from one of {list(LABEL_KEYS)}). "
                                "Map the dataset to (image, label) pairs, e.g. ds.map(lambda d: (d['img'], d['lbl'])).")
    label_key = next((k for k in LABEL_KEYS if k in element), None)
    return element[image_key], None if label_key is None else element[label_key]


def _class_labels(label, count, index):
    """Class indices from a label entry: ints, or one-hot rows (argmax), for ``count`` images."""
    a = np.asarray(label)
    if a.ndim >= 1 and a.shape[-1] > 1 and a.size == count * a.shape[-1]:  # one-hot (or soft) rows
        rows = a.reshape(count, -1)
        if not np.all((rows == 0) | (rows == 1)) or not np.all(rows.sum(1) == 1):
            raise InvalidInputError(f"dataset element {index}: label of shape {a.shape} is neither class indices "
                                    "nor one-hot rows (exactly one 1 per row); pass integer class labels.")
        return rows.argmax(1)
    a = a.reshape(-1)
    if a.size != count:
        raise InvalidInputError(f"dataset element {index}: {a.size} label(s) for {count} image(s).")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or
                               (np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a)))):
        raise InvalidInputError(f"dataset element {index}: labels must be integer class indices, got {a[:4]} "
                                f"(dtype {a.dtype}).")
    return a.astype(np.int64)


def _check_block(images, shape, index):
    """Validate a block of images (dataset indices from ``index``) in one vectorised pass."""
    if images.ndim != len(shape) + 1 or not all(d is None or d == s for d, s in zip(shape, images.shape[1:])):
        raise InvalidInputError(f"dataset element {index} has shape {images.shape[1:]}; the model takes {shape}.")
    if images.dtype == bool or not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise InvalidInputError(f"dataset element {index} has dtype {images.dtype}; images must hold real numbers.")
    if np.issubdtype(images.dtype, np.floating):
        finite = np.isfinite(images)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            raise InvalidInputError(f"dataset element {index + int(bad[0])} contains NaN or Inf (first at "
                                    f"{tuple(int(i) for i in bad[1:])}); relevance of non-finite inputs is undefined. "
                                    "Clean the data first.")


def _batches(data, explainer, batch_size):
    """Regroup the stream into ``(x, labels, first_index)`` batches of ``batch_size``; checks every element.

    Batched elements (and whole arrays) are checked and sliced as blocks, single images are
    collected: no per-image Python work for array or batched input.
    """
    shape = tuple(explainer.input_shape)
    xs, ys, held, index, start = [], [], 0, 0, 0
    for element, label, batched in _elements(data, len(shape)):
        images = element if batched else element[None]
        labels = np.full(len(images), -1) if label is None else _class_labels(label, len(images), index)
        _check_block(images, shape, index)
        index += len(images)
        while len(images):
            take = min(batch_size - held, len(images))
            xs.append(images[:take])
            ys.append(labels[:take])
            held += take
            images, labels = images[take:], labels[take:]
            if held == batch_size:
                yield (xs[0] if len(xs) == 1 else np.concatenate(xs)), np.concatenate(ys), start
                start += held
                xs, ys, held = [], [], 0
    if held:
        yield (xs[0] if len(xs) == 1 else np.concatenate(xs)), np.concatenate(ys), start


def _write_json(path: pathlib.Path, payload):
    """Atomic rewrite: a reader sees the old or the new manifest, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _targets(target, labels, n):
    if isinstance(target, str) and target == "auto":
        return None if np.any(labels < 0) else labels.astype(np.int32)
    if isinstance(target, str) and target == "label":
        if np.any(labels < 0):
            raise InvalidInputError("target='label' needs (image, label) elements; this data has no labels. Use "
                                    "target='predicted' or a class index.")
        return labels.astype(np.int32)
    if target is None or (isinstance(target, str) and target == "predicted"):
        return None
    if isinstance(target, (int, np.integer)):
        return np.full(n, int(target), np.int32)
    raise InvalidInputError(f"target must be 'auto', 'label', 'predicted', None or an int class index, got {target!r}.")


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


def _digest(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:32]


def _target_mode(target) -> str:
    return repr(int(target)) if isinstance(target, (int, np.integer)) else repr(target)


class _Lock:
    """``out``'s lock file: one writer at a time; a lock whose process is gone is taken over."""

    def __init__(self, path: pathlib.Path, out):
        self.path, self.out, self.held = path, out, False

    def __enter__(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and not self._stale(owner):
                    raise OutputError(
                        f"{self.out} is being written by another process (pid {owner.get('pid')} on host "
                        f"{owner.get('host')}, since {owner.get('since')}); two writers would destroy each other's "
                        f"result. Wait for it to finish, or delete {self.path} if that process is gone."
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner died
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise OutputError(f"could not take the lock {self.path}; delete it if no other process writes {self.out}.")

    def _owner(self):
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # half-written or unreadable: treat as stale

    @staticmethod
    def _stale(owner) -> bool:
        if owner.get("host") != socket.gethostname():
            return False  # another machine's process: cannot tell, so respect it
        try:
            os.kill(int(owner.get("pid")), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, TypeError, ValueError):
            return False
        return False

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)


def _read_manifest(path: pathlib.Path, out):
    """The manifest as a dict, or one clear error when it is not readable."""
    try:
        manifest = json.loads(path.read_text())
        batches = [(int(b[0]), int(b[1]), str(b[2]), str(b[3])) for b in manifest["batches"]]
        manifest["fingerprint"], manifest["batch_size"]  # noqa: B018 - must exist
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise OutputError(
            f"cannot resume {out}: its manifest {path} is damaged or from an older lrp_grad ({type(e).__name__}: "
            f"{e}), so the output is not trustworthy. Start over with resume=False (or delete {out})."
        ) from None
    manifest["batches"] = batches
    return manifest


def _verify_output(out, npy, parts_dir, batches, shape, dtype):
    """Check what the manifest says was written against the files; raise OutputError if damaged."""
    def damaged(what):
        return OutputError(f"cannot resume {out}: {what}, so the output written so far is not trustworthy. Start "
                           f"over with resume=False (or delete {out}).")

    if npy:
        if not out.exists():
            raise damaged(f"{out} is missing although the manifest records {sum(b[1] for b in batches)} images")
        try:
            existing = np.load(out, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise damaged(f"{out} cannot be read ({e})") from None
        if existing.shape != shape or existing.dtype != dtype:
            raise damaged(f"{out} has shape {existing.shape} and dtype {existing.dtype}, expected {shape} {dtype}")
        for start, count, _, out_hash in batches:
            if _digest(existing[start:start + count]) != out_hash:
                raise damaged(f"the relevance of images {start}..{start + count - 1} in {out} differs from what was "
                              "written (the file was truncated or changed)")
        del existing
    for start, count, _, out_hash in batches:
        files = [parts_dir / f"summary_{start:09d}.npz"] + ([] if npy else [parts_dir / f"shard_{start:09d}.npy"])
        for f in files:
            if not f.exists():
                raise damaged(f"{f} is missing")
        if not npy:
            try:
                shard = np.load(files[1])
            except (OSError, ValueError) as e:
                raise damaged(f"{files[1]} cannot be read ({e})") from None
            if _digest(shard) != out_hash:
                raise damaged(f"{files[1]} differs from what was written (truncated or changed)")


def _reserve(path: pathlib.Path, nbytes: int):
    """Refuse up front when the disk cannot hold ``nbytes`` more (a memmap on a full disk dies by SIGBUS)."""
    folder = path if path.is_dir() else path.parent
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise OutputError(f"not enough disk space for {path}: it needs {nbytes:,} bytes, {free:,} are free on "
                          f"{folder}. Free some space or write elsewhere (out=...).")


def _write_error(path, e):
    return OutputError(f"cannot write {path}: {type(e).__name__}: {e}. Check the disk space and permissions; "
                       "the run can be resumed with resume=True once fixed.")


def explain_dataset(explainer, data, target="auto", batch_size=256, out=None, resume=False, progress=True,
                    length=None, worker=None) -> DatasetResult:
    """See :meth:`lrp_grad.Explainer.explain_dataset`."""
    explainer._require_classifier("explain_dataset")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1):
        raise InvalidInputError(f"length must be a positive int or None, got {length!r}.")
    _targets(target, np.zeros(0, np.int64), 0)  # validates the target choice before any work
    worker = _check_worker(worker)
    if length is None:
        length = _length(data, len(explainer.input_shape))
    out = None if out is None else pathlib.Path(out)
    if worker is not None and (out is None or out.suffix == ".npy"):
        raise InvalidInputError("with several workers, out= must be a folder: every worker writes its own shards "
                                "and manifest, and lrp_grad.stream.load(folder) merges them in order.")
    if out is None:
        return _stream(explainer, data, target, batch_size, None, [], progress, length, worker, None)
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
    with _Lock(parts_dir / lock_name, out):
        return _explain_to(explainer, data, target, batch_size, out, npy, parts_dir, resume, progress, length, worker)


def _explain_to(explainer, data, target, batch_size, out, npy, parts_dir, resume, progress, length, worker):
    # 1. When resuming, check that the output was written by the same explainer, target choice and
    #    data, and that what it says was written is still there, intact.
    fp = fingerprint(explainer)
    fp["target"] = _target_mode(target)
    name = "manifest.json" if worker is None else f"manifest_worker{worker[0]}of{worker[1]}.json"
    manifest_path = parts_dir / name
    batches = []
    shape = None if length is None else (int(length),) + tuple(explainer.input_shape)
    if resume and manifest_path.exists():
        manifest = _read_manifest(manifest_path, out)
        if manifest["fingerprint"] != fp or manifest["batch_size"] != batch_size:
            diff = [k for k in fp if manifest["fingerprint"].get(k) != fp[k]]
            if manifest["batch_size"] != batch_size:
                diff.append("batch_size")
            raise InvalidInputError(
                f"cannot resume {out}: it was written by a different model, rule, target choice or batch size "
                f"(differs in {diff}). Use a new output path, or resume=False to start over."
            )
        batches = manifest["batches"]
        _verify_output(out, npy, parts_dir, batches, shape, np.dtype(explainer.dtype))
    elif manifest_path.exists():
        manifest_path.unlink()  # starting over: nothing written before may be trusted
    memmap = None
    if npy:
        try:
            if batches:
                memmap = np.lib.format.open_memmap(out, mode="r+")
            else:
                _reserve(out, int(np.prod(shape)) * np.dtype(explainer.dtype).itemsize + 4096)
                memmap = np.lib.format.open_memmap(out, mode="w+", dtype=explainer.dtype, shape=shape)
                with open(out, "r+b") as f:  # back every page now: a full disk fails here, not by SIGBUS later
                    os.posix_fallocate(f.fileno(), 0, os.path.getsize(out))
        except OSError as e:
            raise _write_error(out, e) from None
    return _stream(explainer, data, target, batch_size, (out, npy, parts_dir, manifest_path, memmap, fp), batches,
                   progress, length, worker, shape)


def _stream(explainer, data, target, batch_size, sink, batches, progress, length, worker, shape):
    """Explain batch by batch; with a ``sink``, write each batch and then record it in the manifest."""
    finished = {b[0]: b for b in batches}
    parts, summaries = [], []
    bar = _bar(progress, length, sum(b[1] for b in batches))
    writer = None if sink is None else _Writer(sink, batches, batch_size, worker)
    try:
        for x, labels, start in _batches(data, explainer, batch_size):
            if shape is not None and start + len(x) > shape[0]:
                raise InvalidInputError(f"the dataset has more than length={shape[0]} images (image {start + len(x) - 1} "
                                        "arrived); pass the right length= (or leave it out for a folder output).")
            mine = worker is None or (start // batch_size) % worker[1] == worker[0]
            if not mine:
                continue
            if start in finished:
                if sink is not None and _digest(x) != finished[start][2]:
                    raise InvalidInputError(
                        f"cannot resume {sink[0]}: images {start}..{start + len(x) - 1} differ from the ones explained "
                        "before (the data changed or comes in another order). Resume only with the same data in the "
                        "same order, or start over with resume=False."
                    )
                continue
            t = _targets(target, labels, len(x))
            R, logits = explainer._explain_with_logits(x, t)
            summary = _summaries(R, logits, t)
            if sink is None:
                parts.append(R)
                summaries.append(summary)
            else:
                writer.put(start, x, R, summary)
            if bar is not None:
                bar.update(len(x))
    finally:
        if writer is not None:
            writer.close()  # every batch handed over is written and recorded (or its error raised)
        if bar is not None:
            bar.close()

    # Collect the results.
    if sink is None:
        relevance = np.concatenate(parts) if parts else np.zeros((0,) + tuple(explainer.input_shape), explainer.dtype)
        return DatasetResult(relevance, _merge_summaries(summaries))
    out, npy, parts_dir, manifest_path, memmap, fp = sink
    merged = _merge_summaries([dict(np.load(parts_dir / f"summary_{b[0]:09d}.npz")) for b in sorted(batches)])
    if npy:
        memmap.flush()
        del memmap
        return DatasetResult(np.load(out, mmap_mode="r")[: sum(b[1] for b in batches)], merged)
    return DatasetResult(None, merged)


class _Writer:
    """Writes batches (and records them in the manifest) in a background thread, so that hashing
    and writing a batch overlap the explanation of the next one (TensorFlow releases the GIL).
    One batch at a time is in flight; a write error is raised at the next ``put`` or at ``close``."""

    def __init__(self, sink, batches, batch_size, worker):
        import queue
        import threading

        self.args = (sink, batches, batch_size, worker)
        self.queue = queue.Queue(maxsize=2)
        self.error = None
        self.thread = threading.Thread(target=self._run, name="lrp_grad-writer", daemon=True)
        self.thread.start()

    def _run(self):
        sink, batches, batch_size, worker = self.args
        while True:
            item = self.queue.get()
            if item is None:
                self.queue.task_done()
                return
            if self.error is None:
                try:
                    _write_batch(sink, *item, batches, batch_size, worker)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self.error = e
            self.queue.task_done()

    def put(self, start, x, R, summary):
        # The previous batch was written while this one was explained; wait for it, so that at
        # most one batch is ever in flight (a kill loses at most the last batch handed over).
        self.queue.join()
        if self.error is not None:
            self._raise()
        self.queue.put((start, x, R, summary))

    def close(self):
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            self._raise()

    def _raise(self):
        error, self.error = self.error, None
        raise error


def _write_batch(sink, start, x, R, summary, batches, batch_size, worker):
    out, npy, parts_dir, manifest_path, memmap, fp = sink
    target = out if npy else parts_dir / f"shard_{start:09d}.npy"
    try:
        if npy:
            # No flush per batch (an msync of the whole file each time made streaming ~1.5x slower):
            # a killed process loses nothing the kernel already has, and a resume checks every
            # recorded batch against its hash, so rows lost in a crash are detected, not trusted.
            memmap[start:start + len(x)] = R
        else:
            _save_atomic(target, R)
        _save_atomic(parts_dir / f"summary_{start:09d}.npz", summary)
        batches.append((start, len(x), _digest(x), _digest(R)))
        _write_json(manifest_path, {"fingerprint": fp, "batch_size": batch_size, "worker": worker,
                                    "done": sum(b[1] for b in batches), "batches": batches})
    except OSError as e:
        raise _write_error(target, e) from None


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
    batches = sorted({tuple(b) for m in manifests for b in _read_manifest(m, folder)["batches"]})
    expected = 0
    for start, count, _, _ in batches:
        if start != expected:
            raise InvalidInputError(f"{folder}: images {expected}..{start - 1} are missing (a worker has not finished "
                                    "or was not started); resume it with resume=True.")
        expected = start + count
    try:
        _verify_output(folder, False, folder, batches, None, None)
    except OutputError as e:
        raise OutputError(str(e).replace("cannot resume", "cannot load")) from None
    relevance = np.concatenate([np.load(folder / f"shard_{s:09d}.npy") for s, *_ in batches]) if batches else None
    summaries = _merge_summaries([dict(np.load(folder / f"summary_{s:09d}.npz")) for s, *_ in batches])
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
