"""Several target classes of the same images: one call against one call per class.

The seed report's all-classes figure explains every class of one image. ``Explainer(x,
target="all")`` (or an ``(n, k)`` target array) explains them in one batched call; this script
times that against ``k`` separate calls, interleaved in one process, on the seed's MNIST CNN for
a few numbers of images, and writes ``results/targets.{json,md}``.

    python benchmarks/targets.py              # ~1 min
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the lrp_grad next to this folder

from lrp_grad import AlphaBeta, Epsilon, Explainer, bench  # noqa: E402
from lrp_grad.frontends.tf_keras import keras  # noqa: E402

RULES = (("alpha_beta", AlphaBeta(2, 1)), ("epsilon", Epsilon(1e-6)))


def measure(images=(1, 4, 16, 64), repeats: int = 15, warmup: int = 2) -> dict:
    keras.utils.set_random_seed(0)
    model = bench.mnist_cnn()
    classes = model.output_shape[-1]
    rows = []
    for name, rule in RULES:
        ex = Explainer(model, rule=rule)
        for n in images:
            x = np.random.default_rng(0).uniform(0, 1, (n, 28, 28, 1)).astype(np.float32)
            methods = [
                bench.Method("one_call", False, lambda: ex(x, target="all")),
                bench.Method("per_class", False, lambda: [ex(x, target=c) for c in range(classes)]),
            ]
            times, _, _ = bench.time_interleaved(methods, repeats, warmup)
            one = statistics.median(times["one_call/xla-off"])
            per = statistics.median(times["per_class/xla-off"])
            rows.append({"rule": name, "images": n, "classes": classes, "one_call_ms": 1e3 * one,
                         "per_class_calls_ms": 1e3 * per, "speedup": per / one})
            print(f"{name} {n} images: {rows[-1]['speedup']:.2f}x", file=sys.stderr, flush=True)
    return {"machine": bench.machine_info(), "repeats": repeats, "warmup": warmup, "results": rows}


def to_markdown(results: dict) -> str:
    lines = ["| rule | images | one call, all 10 classes (ms) | 10 calls, one class each (ms) | speed-up |",
             "|---|---:|---:|---:|---:|"]
    for r in results["results"]:
        lines.append(f"| {r['rule']} | {r['images']} | {r['one_call_ms']:.3g} | {r['per_class_calls_ms']:.3g} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    results = measure(args.images, args.repeats)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "targets.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "targets.md").write_text(to_markdown(results))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
