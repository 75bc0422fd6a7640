"""What a region-perturbation evaluation costs next to the forward passes it needs, in one process.

Run:  python benchmarks/evaluation_cost.py [--models seed_cnn resnet_k3 vit_k3 softmax_cnn]
                                           [--batch-sizes 64 256] [--repeats 5] [--stem evaluation_cost]

``srg(model, x, r, baseline="mean")`` with patch 4 and all regions of 28x28 images (7 x 7 = 49
steps per order) needs 2 * 49 + 1 = 99 forward passes of the batch: the unperturbed images, then
one per step and order. Methods, interleaved round-robin (the starting method rotating by round,
lrp_grad.bench.time_interleaved), x = one batch of uniform [0, 1) images, r = normal noise (the
ranking does not change the cost):
  srg         lrp_grad.evaluate.srg(model, x, r, baseline="mean"): the whole evaluation, including
              its checks, ranks, baselines and perturbed batches (x is one batch: the default
              batch_size 256 >= n; at n <= 128 srg runs both orders' step k in one pass of 2n images);
  separate    (only where that applies) the same with batch_size=n: one order after the other,
              99 passes of n images, what srg needs without the shared passes;
  function    99 calls of tf.function(lambda v: model(v, training=False)) on the numpy batch, each
              result read back with .numpy(): the fastest plain way to run the model (the floor);
  eager       99 calls of np.asarray(model(x, training=False)), for reference;
  predict     99 calls of model.predict_on_batch(x), for reference.
Reports the median seconds of each, ratio = srg / function (medians), the median of the per-round
ratios (srg against function in the same round: robust to other processes changing the load between
rounds) and srg's first call (which traces the compiled forward pass, once per model); writes
results/<stem>.{json,md} with the load average before and after.

Models (random weights; they do not change the timing):
  seed_cnn     the seed report's CNN (lrp_grad.app.demo.seed_cnn, tf-keras; 2.6 MMAC per image);
  resnet_k3    a small Keras 3 ResNet: conv 16, two residual blocks of 16 channels (conv-BN-ReLU x2,
               add), a stride-2 conv to 32 and two blocks of 32, global average pooling, dense 10
               (15 MMAC per image);
  vit_k3       the small Keras 3 ViT of examples/vit_digits.py (small_vit(): 4x4 patch embedding of
               width 48, two blocks of LayerNormalization, 3-head attention, GELU MLP);
  softmax_cnn  the seed CNN ending in Dense(10, activation="softmax") (tf-keras): srg explains its
               logits (output="logit"), which it reads through lrp_grad's rewritten model; its
               forward methods run the model itself (probabilities).
"""
import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

import lrp_grad  # noqa: E402

lrp_grad.quiet_tensorflow()

import tensorflow as tf  # noqa: E402

from lrp_grad import evaluate  # noqa: E402
from lrp_grad.bench import Method, machine_info, time_interleaved  # noqa: E402

MODELS = ("seed_cnn", "resnet_k3", "vit_k3", "softmax_cnn")
PATCH, SIDE = 4, 28
STEPS = (SIDE // PATCH) ** 2
CALLS = 2 * STEPS + 1


def seed_cnn():
    from lrp_grad.app.demo import seed_cnn as build

    return build()


def softmax_cnn():
    import tf_keras as K

    L = K.layers
    return K.Sequential([
        K.Input((SIDE, SIDE, 1)),
        L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(2),
        L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(2),
        L.Flatten(), L.Dense(128, activation="relu"), L.Dense(10, activation="softmax"),
    ], name="softmax_cnn")


def resnet_k3():
    import keras as K

    L = K.layers

    def block(h, width, name):
        a = L.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv1")(h)
        a = L.ReLU(name=f"{name}_relu1")(L.BatchNormalization(name=f"{name}_bn1")(a))
        a = L.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv2")(a)
        a = L.BatchNormalization(name=f"{name}_bn2")(a)
        return L.ReLU(name=f"{name}_relu2")(L.Add(name=f"{name}_add")([h, a]))

    inp = K.Input((SIDE, SIDE, 1))
    h = L.Conv2D(16, 3, padding="same", activation="relu", name="stem")(inp)
    h = block(block(h, 16, "b1"), 16, "b2")
    h = L.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="down")(h)
    h = block(block(h, 32, "b3"), 32, "b4")
    h = L.GlobalAveragePooling2D(name="gap")(h)
    return K.Model(inp, L.Dense(10, name="logits")(h), name="resnet_k3")


def vit_k3():
    path = HERE.parent / "examples" / "vit_digits.py"
    spec = importlib.util.spec_from_file_location("vit_digits_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.small_vit()


BUILDERS = {"seed_cnn": seed_cnn, "resnet_k3": resnet_k3, "vit_k3": vit_k3, "softmax_cnn": softmax_cnn}


def _methods(model, x, r):
    function = tf.function(lambda v: model(v, training=False))

    def srg():
        return evaluate.srg(model, x, r, patch=PATCH, baseline="mean")

    def separate():
        return evaluate.srg(model, x, r, patch=PATCH, baseline="mean", batch_size=len(x))

    def fn():
        for _ in range(CALLS):
            out = function(x).numpy()
        return out

    def eager():
        for _ in range(CALLS):
            out = np.asarray(model(x, training=False))
        return out

    def predict():
        for _ in range(CALLS):
            out = model.predict_on_batch(x)
        return out

    shared = 2 * len(x) <= 256  # srg's default batch_size
    return ([Method("srg", False, srg)] + ([Method("separate", False, separate)] if shared else [])
            + [Method("function", False, fn), Method("eager", False, eager), Method("predict", False, predict)])


def bench_one(name, batch, repeats, warmup):
    model = BUILDERS[name]()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch, SIDE, SIDE, 1)).astype(np.float32)
    r = rng.normal(size=x.shape)
    methods = _methods(model, x, r)
    load_before = os.getloadavg()
    times, first, _ = time_interleaved(methods, repeats, warmup)
    load_after = os.getloadavg()
    times = {k.split("/")[0]: v for k, v in times.items()}
    first = {k.split("/")[0]: v for k, v in first.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    per_round = [s / f for s, f in zip(times["srg"], times["function"])]
    return {"model": name, "batch": batch, "forward_calls": CALLS, "median_s": med, "first_call_s": first,
            "ratio": med["srg"] / med["function"], "median_per_round_ratio": statistics.median(per_round),
            "separate_ratio": med["separate"] / med["function"] if "separate" in med else None,
            "eager_ratio": med["eager"] / med["function"], "predict_ratio": med["predict"] / med["function"],
            "forward_ms": 1e3 * med["function"] / CALLS, "raw_s": times,
            "loadavg_before": load_before, "loadavg_after": load_after}


def to_markdown(rows, repeats):
    lines = ["| model | batch | srg s | function s (99 calls) | ratio srg / function | median per-round ratio "
             "| orders separate / function | eager / function | predict / function | ms per forward "
             "| srg first call s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["median_s"]
        sep = "" if r.get("separate_ratio") is None else f"{r['separate_ratio']:.2f}"
        lines.append(f"| {r['model']} | {r['batch']} | {m['srg']:.3f} | {m['function']:.3f} | {r['ratio']:.2f} "
                     f"| {r['median_per_round_ratio']:.2f} | {sep} | {r['eager_ratio']:.2f} "
                     f"| {r['predict_ratio']:.2f} | {r['forward_ms']:.2f} | {r['first_call_s']['srg']:.2f} |")
    loads = [v for r in rows for v in (r["loadavg_before"][0], r["loadavg_after"][0])]
    lines += ["", f"srg with patch {PATCH} on {SIDE}x{SIDE} images: {STEPS} steps per order, {CALLS} forward passes; "
              f"medians of {repeats} interleaved rounds; 1-min load average {min(loads):.2f}-{max(loads):.2f} "
              f"on {os.cpu_count()} cores."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--stem", default="evaluation_cost", help="output file names: <stem>.json and <stem>.md")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        for batch in args.batch_sizes:
            row = bench_one(name, batch, args.repeats, args.warmup)
            rows.append(row)
            print(f"{name} batch {batch}: srg {row['median_s']['srg']:.3f} s, function "
                  f"{row['median_s']['function']:.3f} s, ratio {row['ratio']:.2f} "
                  f"(per round {row['median_per_round_ratio']:.2f})", flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps({"rows": rows, "repeats": args.repeats, "warmup": args.warmup,
                                                        "machine": machine_info()}, indent=1))
    md = to_markdown(rows, args.repeats)
    (out / f"{args.stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
