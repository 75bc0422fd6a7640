"""The on-disk format of an ``explain_dataset`` output and its checks: lock, manifests, digests, atomic writes.

A folder output holds per batch ``shard_*.npy`` and ``summary_*.npy`` and per worker one
``manifest*.json``. A ``.npy`` output is one file; while its run is unfinished its working folder
``<out>.parts/`` holds the lock, an append-only journal (``manifest.jsonl``) and the summaries
(``summaries.bin``), and a finished run leaves one sidecar ``<out>.json`` instead. Every manifest
records each batch as ``(start, count, images digest, relevance digest, summaries digest)``, and
nothing is trusted before it was checked against these digests (the files of earlier versions,
``summary_*.npz`` and ``<out>.parts/manifest.json``, are still read). The readers here turn any
damage into one :class:`OutputError` that says what is wrong and what to do.
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

import numpy as np

from ...errors import InvalidInputError, LRPError
from .summaries import _SUMMARY_DTYPE, _SUMMARY_KEYS, _table


class OutputError(LRPError, RuntimeError):
    """An ``explain_dataset`` output cannot be trusted or written (damaged, locked, no space)."""


def fingerprint(explainer) -> dict:
    """What a resumed run must share with the run that wrote the output: everything that changes the
    numbers. The model (name, weights) and input, the rule (or composite), the canonizers (``None``
    is the default, recorded as what it is), the explained output (resolved to its name, so
    ``output=None`` and the same name given explicitly agree) and ``compute_dtype`` (bfloat16 or
    float16 change the relevance by 1e-2..1e-1 relative, benchmarks/README.md).

    Not recorded, on purpose: ``jit_compile`` and ``strategy``. XLA and a split across replicas run
    the same operations fused or grouped differently, so they change the relevance only by float32
    rounding, not in kind (measured: XLA vs none 4e-7 relative L2 on a small CNN for AlphaBeta,
    Epsilon and epsilon_plus_flat; two replicas vs one 1e-5, README), like the CPU kernels of
    another batch size (rare max-pooling near-ties aside, see README "Max pooling"). And their
    default depends on the machine (XLA on a GPU), so recording them would refuse to resume a run
    on another machine for no difference in meaning.
    """
    from ...core.canonizers import DEFAULT_CANONIZERS  # noqa: PLC0415 - TensorFlow, only with an explainer

    digest = hashlib.sha256()
    for w in explainer.model.weights:
        digest.update(np.ascontiguousarray(w.numpy()).tobytes())
    return {"model": explainer.model.name, "weights_sha256": digest.hexdigest(),
            "rule": str(explainer.rule), "input_shape": list(explainer.input_shape),
            "dtype": str(explainer.dtype),
            "canonizers": [_describe_canonizer(c) for c in (DEFAULT_CANONIZERS if explainer.canonizers is None
                                                            else explainer.canonizers)],
            "output": explainer.output_name, "compute_dtype": explainer.compute_dtype}


def _describe_canonizer(c) -> str:
    """A canonizer as text that is the same in every process: its repr (dataclasses print their
    fields), or, when that is ``object``'s (with a memory address), its class and attributes."""
    if type(c).__repr__ is not object.__repr__:
        return repr(c)
    fields = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(c).items()))
    return f"{type(c).__module__}.{type(c).__qualname__}({fields})"


def _target_mode(target) -> str:
    return repr(int(target)) if isinstance(target, (int, np.integer)) else repr(target)


def _shown(value, limit=150) -> str:
    """A recorded value for a message: on one line (a composite prints one line per entry), shortened."""
    if isinstance(value, str):
        text = " ".join(value.split())
        return repr(text if len(text) <= limit else text[:limit - 3] + "...")
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_same_run(out, manifest, fp, batch_size):
    before = manifest["fingerprint"]
    diff = [k for k in fp if before.get(k, _MISSING) != fp[k]]
    if manifest["batch_size"] != batch_size:
        diff.append("batch_size")
    if not diff:
        return
    changes = []
    for k in diff:
        if k == "batch_size":
            changes.append(f"batch_size was {manifest['batch_size']}, now {batch_size}")
        elif k not in before:
            changes.append(f"{k} was not recorded (an output of an earlier lrp_grad)")
        elif k == "weights_sha256":
            changes.append("the model's weights changed")
        elif k == "target":  # recorded as a repr already
            changes.append(f"target was {before[k]}, now {fp[k]}")
        elif k == "rule" and before[k].splitlines()[:1] != fp[k].splitlines()[:1]:  # composites: their names
            changes.append(f"rule was {before[k].splitlines()[0].rstrip(':')}, now {fp[k].splitlines()[0].rstrip(':')}")
        else:
            changes.append(f"{k} was {_shown(before[k])}, now {_shown(fp[k])}")
    raise InvalidInputError(
        f"cannot resume {out}: it was written with other settings (differs in {diff}: {'; '.join(changes)}), and "
        "resuming would mix two kinds of relevance in one output. Resume with the model, Explainer options, target "
        "and batch size it was written with, use a new output path, or start over with resume=False."
    )


def _check_same_length(out, state, length):
    """A resume of a dataset with another number of images (one removed or added since the run
    started) would pair the rows already written with other images: say so, before anything else
    (the file's shape would otherwise be reported as damage)."""
    before = state.get("length")
    if before is None or length is None or int(before) == int(length):
        return
    raise InvalidInputError(
        f"cannot resume {out}: it was written for a dataset of {int(before)} images, this one has {int(length)}: the "
        "image list changed since the run started (an image removed or added), so the rows written so far may belong "
        "to other images. Resume with the images it was written for, or start over with resume=False (or another "
        "output path).")


_MISSING = object()


#: The working files of an unfinished ``.npy`` run, in ``<out>.parts/``.
_JOURNAL, _SUMMARIES_BIN = "manifest.jsonl", "summaries.bin"


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


def _verify_folder_summaries(out, folder, batches):
    """Summaries of a legacy ``.npy.parts`` folder (one ``summary_*.npz`` per batch)."""
    return {start: _read_checked(out, _summary_file(folder, start), _read_summary) for start, *_ in batches}


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


def _save_atomic(path: pathlib.Path, payload):
    """Write ``path`` completely or not at all (write a temporary file, then rename)."""
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    np.save(tmp, payload)
    os.replace(tmp, path)


def _write_all(fd, data: bytes):
    view = memoryview(data)
    while len(view):
        view = view[os.write(fd, view):]


def _pwrite(fd, a, offset):
    view = memoryview(_raw(a))
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
