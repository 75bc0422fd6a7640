"""The ``lrp-grad bench`` arguments, without TensorFlow: ``--help`` and argument errors are immediate
(the benchmark itself, :mod:`lrp_grad.app.bench`, imports TensorFlow and builds the models)."""
from __future__ import annotations

import argparse

__all__ = ["MODEL_NAMES", "QUICK", "parser", "check"]

#: The benchmark's models (the keys of ``bench.MODELS``; a test keeps the two equal).
MODEL_NAMES = ("mnist_cnn", "cifar10", "vgg16", "resnet50", "mnist_cnn_keras3", "vgg16_keras3", "resnet50_keras3")

QUICK = {"models": ["mnist_cnn"], "batch_sizes": [4], "repeats": 3, "warmup": 1, "xla": "off"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lrp-grad bench",
        description="Time LRP (Explainer.__call__) against the forward pass and the plain input gradient, "
                    "interleaved in one process, with XLA off and on.",
    )
    p.add_argument("--models", nargs="+", choices=list(MODEL_NAMES), help="default: all")
    p.add_argument("--batch-sizes", nargs="+", type=int, help="for every model; default: per model")
    p.add_argument("--repeats", type=int, help="timed rounds; default 15 (small models), 7 (vgg16, resnet50)")
    p.add_argument("--warmup", type=int, help="untimed rounds first; default 2 (small models), 1 (vgg16, resnet50)")
    p.add_argument("--xla", choices=("off", "on", "both"), help="default: both")
    p.add_argument("--out", default="benchmarks/results", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="tiny run for tests: mnist_cnn, batch 4, 3 repeats, 1 warm-up, XLA off "
                        "(explicit options still win); writes quick.json / quick.md")
    return p


def check(argv) -> argparse.Namespace:
    """Parse and check ``argv`` (exits with status 2 and a message on a bad argument, 0 after
    ``--help``); the defaults of ``--quick`` are filled in."""
    p = parser()
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else {"xla": "both"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("repeats", "warmup"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.batch_sizes and min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    return args
