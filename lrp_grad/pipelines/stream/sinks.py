"""Writing explained batches to disk: the ``.npy`` sink, the folder-of-shards sink and the background writer.

A sink writes a batch and only then records it in its manifest, so a run that dies leaves no
batch recorded that was not completely written. On a resume a sink reads and checks what the
earlier run recorded (see :mod:`.ondisk`) before anything is written.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .ondisk import (_JOURNAL, _SUMMARIES_BIN, _check_same_length, _check_same_run, _damaged, _digest, _pwrite,
                     _read_journal, _read_manifest, _read_sidecar, _reserve, _save_atomic, _sidecar, _verify_folder,
                     _verify_folder_summaries, _verify_npy, _write_all, _write_error, _write_json)
from .summaries import _SUMMARY_DTYPE, _SUMMARY_KEYS, DatasetResult, _columns, _concat_tables


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
            _check_same_length(out, state, shape[0])
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
