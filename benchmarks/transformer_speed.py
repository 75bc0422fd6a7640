"""A vision transformer's LRP pass against a plain input-gradient pass, interleaved in one process.

Run:  python benchmarks/transformer_speed.py [--batch-sizes 1 16] [--repeats 15] [--out DIR]
Model: a ViT from stock Keras 3 layers (random weights): 32x32x3 images, 4x4 patches (64 tokens), width
192, 3 heads, 6 pre-norm blocks (LayerNormalization, MultiHeadAttention, GELU MLP of width 768), final
LayerNorm, mean over tokens, 10 classes; and the same built with tf-keras. Methods, interleaved
round-robin (lrp_grad.bench.time_interleaved), XLA off:
  gradient   d logit[target] / dx in a tf.function (the baseline, ratio 1.0);
  attnlrp    Explainer(model, rule=AttnLRP())(x, target)   (epsilon on the linear layers);
  cplrp      Explainer(model, rule=CPLRP())(x, target);
  epsilon    Explainer(model, rule=Epsilon(1e-6))(x, target)  (AttnLRP in the attention cores).
Reports median ms and the ratio to the gradient; writes results/transformer_speed.{json,md}.
"""
import argparse
import json
import os
import pathlib
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import lrp_grad  # noqa: E402
from lrp_grad.bench import Method, machine_info, time_interleaved  # noqa: E402


def vit(K, width=192, heads=3, depth=6, mlp=768, patch=4, size=32, classes=10):
    L = K.layers
    inp = K.Input((size, size, 3))
    h = L.Conv2D(width, patch, strides=patch, name="patch_embed")(inp)
    x = L.Reshape(((size // patch) ** 2, width))(h)
    for i in range(depth):
        a = L.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln1")(x)
        a = L.MultiHeadAttention(heads, width // heads, name=f"block{i}_attn")(a, a)
        x = L.Add(name=f"block{i}_res1")([x, a])
        m = L.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln2")(x)
        m = L.Dense(mlp, activation="gelu", name=f"block{i}_fc1")(m)
        m = L.Dense(width, name=f"block{i}_fc2")(m)
        x = L.Add(name=f"block{i}_res2")([x, m])
    x = L.LayerNormalization(epsilon=1e-6, name="norm")(x)
    x = L.GlobalAveragePooling1D()(x)
    return K.Model(inp, L.Dense(classes, name="head")(x), name="vit_tiny_32")


RULES = (("attnlrp", lrp_grad.AttnLRP()), ("cplrp", lrp_grad.CPLRP()), ("epsilon", lrp_grad.Epsilon(1e-6)))


def _methods(model, x, target):
    xt, tt = tf.constant(x), tf.constant(target)

    @tf.function
    def gradient(v, t):
        with tf.GradientTape() as tape:
            tape.watch(v)
            logits = model(v, training=False)
        return tape.gradient(logits, v, output_gradients=tf.one_hot(t, logits.shape[-1]))

    methods = [Method("gradient", False, lambda: gradient(xt, tt).numpy())]
    for name, rule in RULES:
        ex = lrp_grad.Explainer(model, rule=rule, jit_compile=False)
        methods.append(Method(name, False, lambda ex=ex: ex(x, target=target)))
    return methods


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--packages", nargs="+", default=["keras", "tf_keras"])
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    import importlib

    rows = []
    for package in args.packages:
        K = importlib.import_module(package)
        model = vit(K)
        for batch in args.batch_sizes:
            x = np.random.default_rng(0).uniform(0, 1, (batch, 32, 32, 3)).astype(np.float32)
            target = np.asarray(model(x)).argmax(-1).astype(np.int32)
            times, first, _ = time_interleaved(_methods(model, x, target), args.repeats, args.warmup)
            base = statistics.median(times["gradient/xla-off"])
            for key, ts in times.items():
                med = statistics.median(ts)
                rows.append({"package": package, "batch": batch, "method": key.split("/")[0],
                             "median_ms": 1e3 * med, "ratio": med / base, "first_call_s": first[key],
                             "iqr_over_median": (np.subtract(*np.percentile(ts, [75, 25])) / med)})
                print(f"{package:9s} batch {batch:3d} {key:22s} {1e3 * med:9.2f} ms  ratio {med / base:5.2f}",
                      flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transformer_speed.json").write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=1))
    lines = ["| package | batch | method | median ms | ratio to gradient | IQR / median |", "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r['package']} | {r['batch']} | {r['method']} | {r['median_ms']:.2f} | {r['ratio']:.2f} | "
              f"{r['iqr_over_median']:.2f} |" for r in rows]
    (out / "transformer_speed.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
