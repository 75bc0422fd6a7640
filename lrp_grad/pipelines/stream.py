"""Explaining whole datasets: streaming in batches with constant memory, resumable output.

Used through :meth:`lrp_grad.Explainer.explain_dataset`. Output goes to memory, to one ``.npy``
file (filled batch by batch in place) or to a directory of shards; either way a batch is recorded
in a manifest only once it is written, so a run that dies can be resumed and a resume never trusts
a half-written batch. A finished ``.npy`` run leaves the file and one sidecar ``<out>.json``
(manifest and summaries); an interrupted one also its working folder ``<out>.parts/``, which a
resume needs.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import socket
import time
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError, LRPError


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

    Batched elements (and whole arrays) are checked and sliced as blocks; single images are
    collected as they come and checked, stacked and labelled once per batch (vectorised): no
    per-image numpy work, only the unpacking of each element.
    """
    shape = tuple(explainer.input_shape)
    xs, ys, held, start = [], [], 0, 0
    for images, labels in _blocks(data, shape, batch_size):
        while len(images):
            take = min(batch_size - held, len(images))
            xs.append(images[:take])
            ys.append(labels[:take])
            held += take
            images, labels = images[take:], labels[take:]
            if held == batch_size:
                yield _joined(xs), _joined(ys), start
                start += held
                xs, ys, held = [], [], 0
    if held:
        yield _joined(xs), _joined(ys), start


def _joined(parts):
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _blocks(data, shape, batch_size):
    """Checked ``(images, class_labels)`` blocks in stream order: one per batched element, and runs of
    up to ``batch_size`` consecutive single images stacked into one."""
    rank, index = len(shape), 0
    if isinstance(data, np.ndarray):
        _check_block(data, shape, 0)
        yield data, np.full(len(data), -1)
        return
    try:
        import tensorflow as tf

        if isinstance(data, tf.data.Dataset):
            data = data.as_numpy_iterator()
    except ImportError:  # pragma: no cover
        pass
    images, labels = [], []
    for element in data:
        if type(element) is tuple and len(element) == 2:  # the common case first: (image, label)
            image, label = element
        elif isinstance(element, dict):
            image, label = _from_dict(element)
        elif isinstance(element, (tuple, list)):
            if len(element) != 2:
                raise InvalidInputError(f"dataset elements must be images or (image, label) pairs, got a "
                                        f"{type(element).__name__} of length {len(element)}.")
            image, label = element
        else:
            image, label = element, None
        if type(image) is not np.ndarray:
            image = np.asarray(image)
        if image.ndim == rank:  # a single image: collected, checked with its run
            images.append(image)
            labels.append(label)
            if len(images) == batch_size:
                yield _single_block(images, labels, shape, index)
                index += len(images)
                images, labels = [], []
            continue
        if images:
            yield _single_block(images, labels, shape, index)
            index += len(images)
            images, labels = [], []
        block = image if image.ndim == rank + 1 else image[None]  # a wrong rank is named by the check
        y = np.full(len(block), -1) if label is None else _class_labels(label, len(block), index)
        _check_block(block, shape, index)
        yield block, y
        index += len(block)
    if images:
        yield _single_block(images, labels, shape, index)


def _single_block(images, labels, shape, index):
    """Stack and check a run of single images (dataset indices from ``index``) with their labels, in
    one vectorised pass; when that fails, check them one by one so the error names the element."""
    n = len(images)
    try:
        block = np.stack(images)
        same_dtype = all(im.dtype == block.dtype for im in images)
    except ValueError:  # different shapes: found and named below
        block, same_dtype = None, False
    if same_dtype:
        _check_block(block, shape, index)
    else:
        for i, im in enumerate(images):
            _check_block(im[None], shape, index + i)
        block = np.stack(images)
    if all(label is None for label in labels):
        return block, np.full(n, -1)
    if not any(label is None for label in labels):
        try:
            return block, _class_labels(np.asarray(labels), n, index)
        except (InvalidInputError, ValueError):
            pass  # named below, element by element
    ys = [np.full(1, -1) if label is None else _class_labels(label, 1, index + i) for i, label in enumerate(labels)]
    return block, np.concatenate(ys)


def _write_json(path: pathlib.Path, payload, indent=1):
    """Atomic rewrite: a reader sees the old or the new manifest, never half of one.

    ``indent="keys"``: one top-level key a line, each value compact (json's fast C encoder; an
    indented list of thousands of summaries takes its pure-Python one, 7x slower)."""
    tmp = path.with_name(path.name + ".tmp")
    if indent == "keys":
        text = "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in payload.items()) + "\n}\n"
    else:
        text = json.dumps(payload, indent=indent)
    tmp.write_text(text)
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
    """CRC-32 of an array's bytes (8 hex digits): what the manifest records per batch, for its images,
    relevance and summaries. It detects accidental damage (truncation, changed or zeroed rows, other
    data or order) and is 2x cheaper than SHA-256 here; it is not a defence against deliberate forgery."""
    return f"{zlib.crc32(_raw(a)):08x}"


def _raw(a):
    """The bytes of an array, without a copy when it is C-contiguous (anything with a buffer is fine)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _matches(a, recorded: str) -> bool:
    """Whether ``a`` has the recorded digest (CRC-32; 32 hex digits: SHA-256, from outputs of earlier versions)."""
    if len(recorded) == 32:
        return hashlib.sha256(_raw(a)).hexdigest()[:32] == recorded
    return _digest(a) == recorded


def _target_mode(target) -> str:
    return repr(int(target)) if isinstance(target, (int, np.integer)) else repr(target)


class _Lock:
    """``out``'s lock file: one writer at a time; a lock whose process is gone is taken over."""

    def __init__(self, path: pathlib.Path, out):
        self.path, self.out, self.held = path, out, False

    def __enter__(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileNotFoundError:  # a finishing run removed its empty .npy working folder just now
                self.path.parent.mkdir(parents=True, exist_ok=True)
                continue
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
    """A folder's ``manifest*.json`` (or a legacy ``.npy.parts/manifest.json``) as a dict, or one clear error."""
    try:
        manifest = json.loads(path.read_text())
        batches = [_record(b) for b in manifest["batches"]]
        manifest["fingerprint"], manifest["batch_size"]  # noqa: B018 - must exist
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise _damaged_manifest(path, out, e) from None
    manifest["batches"] = batches
    return manifest


def _record(b):
    """A batch record ``(start, count, images digest, relevance digest, summaries digest or '')``."""
    if not isinstance(b, list) or len(b) not in (4, 5):
        raise ValueError(f"batch record {b!r} is not [start, count, digests...]")
    return (int(b[0]), int(b[1]), str(b[2]), str(b[3]), str(b[4]) if len(b) == 5 else "")


def _damaged_manifest(path, out, e):
    return OutputError(
        f"cannot resume {out}: its manifest {path} is damaged or from an older lrp_grad ({type(e).__name__}: "
        f"{e}), so the output is not trustworthy. Start over with resume=False (or delete {out})."
    )


def _read_journal(path: pathlib.Path, out):
    """The working manifest of a ``.npy`` run: a header line, then one line per batch written, appended
    (no rewrite per batch). A last line without its newline is a write cut by a kill: that batch is
    not recorded (and will be explained again); any other unreadable line is damage."""
    try:
        text = path.read_text()
        lines = text.split("\n")
        lines = lines[:-1]  # after the last newline: empty, or a torn line
        header = json.loads(lines[0])
        header["fingerprint"], header["batch_size"]  # noqa: B018 - must exist
        header["batches"] = [_record(json.loads(line)) for line in lines[1:]]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise _damaged_manifest(path, out, e) from None
    return header


def _read_sidecar(path: pathlib.Path, out, verb="resume"):
    """``<out>.json`` of a finished ``.npy`` run: its manifest and, per batch, the summaries (checked)."""
    try:
        side = json.loads(path.read_text())
        side["fingerprint"], side["batch_size"]  # noqa: B018 - must exist
        batches = sorted(_record(b) for b in side["batches"])
        columns = side["summaries"]
        table = np.zeros(sum(b[1] for b in batches), _SUMMARY_DTYPE)
        for k in _SUMMARY_KEYS:
            table[k] = columns[k]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise OutputError(str(_damaged_manifest(path, out, e)).replace("cannot resume", f"cannot {verb}")) from None
    summaries, at = {}, 0
    for b in batches:
        summaries[b[0]] = table[at:at + b[1]]
        at += b[1]
    side["batches"] = batches
    return side, summaries


def _sidecar(out: pathlib.Path) -> pathlib.Path:
    return out.with_name(out.name + ".json")


def _damaged(out, what, verb="resume"):
    return OutputError(f"cannot {verb} {out}: {what}, so the output written so far is not trustworthy. Start "
                       f"over with resume=False (or delete {out}).")


def _verify_npy(out, batches, summaries, shape, dtype, verb="resume"):
    """Check a ``.npy`` output (rows and summaries) against its manifest; raise OutputError if damaged."""
    if not out.exists():
        raise _damaged(out, f"{out} is missing although the manifest records {sum(b[1] for b in batches)} images", verb)
    try:
        existing = np.load(out, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise _damaged(out, f"{out} cannot be read ({e})", verb) from None
    if (shape is not None and existing.shape != shape) or (dtype is not None and existing.dtype != dtype):
        raise _damaged(out, f"{out} has shape {existing.shape} and dtype {existing.dtype}, expected {shape} {dtype}",
                       verb)
    for start, count, _, out_hash, summary_hash in batches:
        if not _matches(existing[start:start + count], out_hash):
            raise _damaged(out, f"the relevance of images {start}..{start + count - 1} in {out} differs from what was "
                                "written (the file was truncated or changed)", verb)
        if summary_hash and not _matches(summaries[start], summary_hash):
            raise _damaged(out, f"the summaries of images {start}..{start + count - 1} differ from what was written",
                           verb)
    del existing


def _summary_file(folder, start):
    """A batch's summaries in a folder: ``.npy`` (structured), or ``.npz`` as earlier versions wrote them."""
    f = folder / f"summary_{start:09d}.npy"
    return f if f.exists() else folder / f"summary_{start:09d}.npz"


def _read_summary(f):
    data = np.load(f)
    if f.suffix == ".npz":
        return _table(dict(data))
    return data


def _read_checked(out, f, read, verb="resume"):
    """``read(f)``, with a missing or unreadable file reported as a damaged output."""
    if not f.exists():
        raise _damaged(out, f"{f} is missing", verb)
    try:
        return read(f)
    except (OSError, ValueError, KeyError) as e:
        raise _damaged(out, f"{f} cannot be read ({e})", verb) from None


def _verify_folder(out, folder, batches, verb="resume"):
    """Check shards and summaries of a folder output against its manifest(s); return the summaries."""
    summaries = {}
    for start, count, _, out_hash, summary_hash in batches:
        shard, summary = folder / f"shard_{start:09d}.npy", _summary_file(folder, start)
        for f in (summary, shard):
            if not f.exists():
                raise _damaged(out, f"{f} is missing", verb)
        R = _read_checked(out, shard, np.load, verb)
        summaries[start] = _read_checked(out, summary, _read_summary, verb)
        if not _matches(R, out_hash):
            raise _damaged(out, f"{shard} differs from what was written (truncated or changed)", verb)
        if summary_hash and not _matches(summaries[start], summary_hash):
            raise _damaged(out, f"{summary} differs from what was written (truncated or changed)", verb)
    return summaries


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
    """Explain a whole dataset with ``explainer`` in batches, with constant memory when writing to disk.

    Parameters
    ----------
    data : tf.data.Dataset, numpy array, (images, labels) arrays or iterable
        Images, ``(image, label)`` pairs, or dicts with an image key (``'image'``, ``'x'``,
        ...) and optionally a label key (``'label'``, ``'y'``, ...); elements may be single
        images or batches. Labels may be class indices (any integer dtype) or one-hot rows.
        The order is preserved.
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
        Continue a run that stopped, skipping the images already written. Refuses (with the
        reason) when the output was written by another model, rule, target choice or batch
        size, when the data differs from what was explained before (each batch's images are
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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1):
        raise InvalidInputError(f"length must be a positive int or None, got {length!r}.")
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


_JOURNAL, _SUMMARIES_BIN = "manifest.jsonl", "summaries.bin"


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


def _check_same_run(out, manifest, fp, batch_size):
    if manifest["fingerprint"] != fp or manifest["batch_size"] != batch_size:
        diff = [k for k in fp if manifest["fingerprint"].get(k) != fp[k]]
        if manifest["batch_size"] != batch_size:
            diff.append("batch_size")
        raise InvalidInputError(
            f"cannot resume {out}: it was written by a different model, rule, target choice or batch size "
            f"(differs in {diff}). Use a new output path, or resume=False to start over."
        )


class _NpySink:
    """One ``.npy`` file written in place (``os.pwrite`` of each batch's rows: no memmap page faults, no
    flush of the whole map). While running, ``<out>.parts/`` holds the lock, an append-only manifest
    (``manifest.jsonl``) and the summaries (``summaries.bin``, fixed-size rows); when the run ends,
    both go into one sidecar ``<out>.json`` and the folder is removed. A resume reads whichever of
    them exists (or an earlier version's ``.parts/manifest.json``) and checks it against the file."""

    def __init__(self, out, parts_dir, fp, batch_size, shape, dtype, resume):
        self.out, self.parts_dir, self.fp, self.batch_size, self.shape, self.dtype = \
            out, parts_dir, fp, batch_size, shape, dtype
        self.journal, self.side = parts_dir / _JOURNAL, _sidecar(out)
        self.summaries_path, legacy = parts_dir / _SUMMARIES_BIN, parts_dir / "manifest.json"
        self.batches, self.summaries, self.fd = [], {}, None
        state = None
        if resume and self.journal.exists():
            state = _read_journal(self.journal, out)
            _check_same_run(out, state, fp, batch_size)
            self._read_summaries_bin(state["batches"])
        elif resume and self.side.exists():
            state, self.summaries = _read_sidecar(self.side, out)
            _check_same_run(out, state, fp, batch_size)
        elif resume and legacy.exists():
            state = _read_manifest(legacy, out)
            _check_same_run(out, state, fp, batch_size)
            self.summaries = _verify_folder_summaries(out, parts_dir, state["batches"])
        older = [self.side, legacy, *parts_dir.glob("summary_*.npz")]
        if state is not None:
            self.batches = list(state["batches"])
            _verify_npy(out, self.batches, self.summaries, shape, dtype)
        else:  # starting over: nothing written before may be trusted (removed before the file is touched)
            for p in older + [self.journal]:
                p.unlink(missing_ok=True)
        try:
            self._open(fresh=state is None)
        except OSError as e:
            raise _write_error(out, e) from None
        for p in older:
            p.unlink(missing_ok=True)  # resumed: the journal now holds everything that was checked

    def _read_summaries_bin(self, batches):
        try:
            table = np.fromfile(self.summaries_path, _SUMMARY_DTYPE)
        except (OSError, ValueError) as e:
            raise _damaged(self.out, f"{self.summaries_path} cannot be read ({e})") from None
        for start, count, *_ in batches:
            if start + count > len(table):
                raise _damaged(self.out, f"{self.summaries_path} is truncated (no summaries of images {start}.."
                                         f"{start + count - 1})")
            self.summaries[start] = table[start:start + count].copy()

    def _open(self, fresh):
        if fresh:
            _reserve(self.out, int(np.prod(self.shape)) * self.dtype.itemsize + 4096)
            m = np.lib.format.open_memmap(self.out, mode="w+", dtype=self.dtype, shape=self.shape)
            del m  # only its header: the rows are written with pwrite
            with open(self.out, "r+b") as f:  # back every page now: a full disk fails here, not later
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(self.out))
        self.offset = np.load(self.out, mmap_mode="r").offset
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self.fd = os.open(self.out, os.O_RDWR)
        self.summaries_fd = os.open(self.summaries_path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0))
        # The journal is written afresh (header, then the batches that passed the checks above).
        tmp = self.journal.with_name(self.journal.name + ".tmp")
        lines = [json.dumps({"format": "lrp_grad.explain_dataset", "version": 2, "fingerprint": self.fp,
                             "batch_size": self.batch_size, "length": self.shape[0]})]
        lines += [json.dumps(list(b)) for b in self.batches]
        for b in self.batches:
            _pwrite(self.summaries_fd, self.summaries[b[0]], b[0] * _SUMMARY_DTYPE.itemsize)
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.journal)
        self.journal_fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND)

    def write(self, start, x, R, summary):
        R = np.ascontiguousarray(R, self.dtype)
        try:
            _pwrite(self.fd, R, self.offset + start * self.row_bytes)
            _pwrite(self.summaries_fd, summary, start * _SUMMARY_DTYPE.itemsize)
            record = (start, len(x), _digest(x), _digest(R), _digest(summary))
            _write_all(self.journal_fd, (json.dumps(list(record)) + "\n").encode())  # recorded once written
        except OSError as e:
            raise _write_error(self.out, e) from None
        self.batches.append(record)
        self.summaries[start] = summary

    def close(self):
        for fd in (self.fd, getattr(self, "summaries_fd", None), getattr(self, "journal_fd", None)):
            if fd is not None:
                os.close(fd)
        self.fd = self.summaries_fd = self.journal_fd = None

    def finish(self):
        """All batches written: manifest and summaries into ``<out>.json``, the working files removed."""
        self.close()
        batches = sorted(self.batches)
        table = _concat_tables([self.summaries[b[0]] for b in batches])
        payload = {"format": "lrp_grad.explain_dataset", "version": 2, "relevance": self.out.name,
                   "fingerprint": self.fp, "batch_size": self.batch_size, "length": self.shape[0],
                   "done": sum(b[1] for b in batches), "batches": [list(b) for b in batches],
                   "summaries": {k: table[k].tolist() for k in _SUMMARY_KEYS}}
        try:
            _write_json(self.side, payload, indent="keys")
        except OSError as e:
            raise _write_error(self.side, e) from None
        for p in (self.journal, self.summaries_path):
            p.unlink(missing_ok=True)
        done = payload["done"]
        return DatasetResult(np.load(self.out, mmap_mode="r")[:done], _columns(table))


def _verify_folder_summaries(out, folder, batches):
    """Summaries of a legacy ``.npy.parts`` folder (one ``summary_*.npz`` per batch)."""
    return {start: _read_checked(out, _summary_file(folder, start), _read_summary) for start, *_ in batches}


class _FolderSink:
    """A folder of shards: per batch ``shard_*.npy`` and ``summary_*.npy`` (each written to a temporary
    name and renamed), then the worker's ``manifest*.json`` rewritten atomically."""

    def __init__(self, out, fp, batch_size, worker, resume):
        self.out, self.fp, self.batch_size, self.worker = out, fp, batch_size, worker
        name = "manifest.json" if worker is None else f"manifest_worker{worker[0]}of{worker[1]}.json"
        self.manifest_path = out / name
        self.batches, self.summaries = [], {}
        if resume and self.manifest_path.exists():
            manifest = _read_manifest(self.manifest_path, out)
            _check_same_run(out, manifest, fp, batch_size)
            self.batches = list(manifest["batches"])
            self.summaries = _verify_folder(out, out, self.batches)
        elif self.manifest_path.exists():
            self.manifest_path.unlink()  # starting over: nothing written before may be trusted

    def write(self, start, x, R, summary):
        target = self.out / f"shard_{start:09d}.npy"
        try:
            _save_atomic(target, R)
            _save_atomic(self.out / f"summary_{start:09d}.npy", summary)
            self.out.joinpath(f"summary_{start:09d}.npz").unlink(missing_ok=True)  # an older run's
            record = (start, len(x), _digest(x), _digest(R), _digest(summary))
            batches = self.batches + [record]
            _write_json(self.manifest_path, {"fingerprint": self.fp, "batch_size": self.batch_size,
                                             "worker": self.worker, "done": sum(b[1] for b in batches),
                                             "batches": batches}, indent=None)
        except OSError as e:
            raise _write_error(target, e) from None
        self.batches.append(record)
        self.summaries[start] = summary

    def close(self):
        pass

    def finish(self):
        table = _concat_tables([self.summaries[b[0]] for b in sorted(self.batches)])
        return DatasetResult(None, _columns(table))


def _write_all(fd, data: bytes):
    view = memoryview(data)
    while len(view):
        view = view[os.write(fd, view):]


def _pwrite(fd, a, offset):
    view = memoryview(_raw(a))
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _stream(explainer, data, target, batch_size, sink, progress, length, worker):
    """Explain batch by batch; with a ``sink``, write each batch and then record it in the manifest."""
    finished = {} if sink is None else {b[0]: b for b in sink.batches}
    limit = None if sink is None else length
    parts, summaries = [], []
    bar = _bar(progress, length, sum(b[1] for b in finished.values()))
    writer = None if sink is None else _Writer(sink)
    try:
        for x, labels, start in _batches(data, explainer, batch_size):
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


class _Writer:
    """Writes batches (and records them in the manifest) in a background thread, so that hashing
    and writing a batch overlap the explanation of the next one (TensorFlow releases the GIL).
    One batch at a time is in flight; a write error is raised at the next ``put`` or at ``close``."""

    def __init__(self, sink):
        import queue
        import threading

        self.sink = sink
        self.queue = queue.Queue(maxsize=2)
        self.error = None
        self.thread = threading.Thread(target=self._run, name="lrp_grad-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.queue.get()
            if item is None:
                self.queue.task_done()
                return
            if self.error is None:
                try:
                    self.sink.write(*item)
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
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            self._raise()

    def _raise(self):
        error, self.error = self.error, None
        raise error


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


def _save_atomic(path: pathlib.Path, payload):
    """Write ``path`` completely or not at all (write a temporary file, then rename)."""
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    np.save(tmp, payload)
    os.replace(tmp, path)


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


def _pair_of_arrays(data, input_rank):
    """``(images, labels)`` given as a tuple of two arrays is one batched element, not two elements:
    ``([(images, labels)], n)``; anything else is returned as it is, with ``None``."""
    if (isinstance(data, tuple) and len(data) == 2 and all(isinstance(v, np.ndarray) for v in data)
            and data[0].ndim == input_rank + 1 and data[1].ndim in (1, 2) and len(data[0]) == len(data[1])):
        return [data], len(data[0])
    return data, None


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
