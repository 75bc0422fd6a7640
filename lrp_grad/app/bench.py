"""Benchmark harness: the LRP pass against the plain input gradient, interleaved in one process.

For each model and batch size every method (the forward pass, the plain input gradient of the
target logit, and ``Explainer.__call__`` with each benchmarked rule, with XLA off and on) is
called once per round, round-robin, so that drift of the machine (frequency, other processes)
hits all methods alike. The reported time is the median over rounds; the ratio is against the
plain gradient with the same XLA setting, i.e. what one ordinary backward pass costs
(``benchmarks/README.md`` counts each rule's floor in those units).

Peak memory is read from TensorFlow's own allocator (``tf.config.experimental.get_memory_info``,
which works on CPU in TensorFlow 2.21): its high-water mark during a timed call minus what it
held just before the call (weights, the input batch). It counts the tensors the call allocates,
but not scratch memory that oneDNN or Eigen take outside TensorFlow, nor small XLA temporaries
kept outside the allocator. ``None`` where the allocator keeps no statistics.

>>> results = lrp_grad.bench.run(["mnist_cnn"], batch_sizes=[64], repeats=5)   # doctest: +SKIP
>>> print(lrp_grad.bench.to_markdown(results))                                 # doctest: +SKIP
$ python -m lrp_grad.bench --models vgg16 --xla off --out /tmp/bench
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tensorflow as tf

from ..frontends.keras3 import keras as keras3
from ..frontends.tf_keras import keras
from . import bench_args
from .datasets import cifar10_model
from ..api.explainer import Explainer
from ..core.rules import AlphaBeta, Epsilon, ZPlus

__all__ = ["ModelSpec", "Method", "MODELS", "RULES", "run", "time_interleaved", "machine_info", "to_markdown",
           "write", "main"]

#: The rules timed through ``Explainer.__call__``: (column name, rule or preset name).
RULES = (
    ("epsilon", Epsilon(1e-6)),
    ("zplus", ZPlus()),
    ("alpha_beta", AlphaBeta(2, 1)),
    ("epsilon_plus_flat", "epsilon_plus_flat"),
)

#: Order of the methods in tables.
METHOD_NAMES = ("forward", "gradient") + tuple(name for name, _ in RULES)

MEMORY_METHOD = (
    "TensorFlow allocator peak during a timed call minus the allocator's level just before it, largest "
    "over the timed calls (tf.config.experimental.get_memory_info); excludes oneDNN/Eigen scratch "
    "outside TensorFlow"
)

QUICK = bench_args.QUICK


# ---------------------------------------------------------------------------------------------
# Models

def mnist_cnn(K=keras):
    """The seed report's MNIST CNN with random weights (the weights do not change the timing),
    built with Keras package ``K`` (tf-keras by default)."""
    layers = K.layers
    return K.Sequential([
        K.Input((28, 28, 1)),
        layers.Conv2D(32, 3, activation="relu"),
        layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, activation="relu"),
        layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dense(10),
    ], name="mnist_cnn")


def _application(name: str, K=keras):
    # classifier_activation=None: the baseline differentiates the target logit, the quantity LRP
    # explains (the explainer would skip a final softmax anyway).
    return lambda: getattr(K.applications, name)(weights=None, classifier_activation=None)


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and how to feed it.

    Attributes
    ----------
    build : callable
        ``build() -> keras.Model`` (Keras 3 or tf-keras).
    input_shape : tuple of int
        One sample's shape.
    high : float
        Inputs are drawn uniformly from ``[0, high)`` (non-negative, as images).
    batch_sizes : tuple of int
        Default batch sizes.
    repeats, warmup : int
        Default numbers of timed and untimed rounds (fewer for the slow models, whose second call
        is already steady).
    """

    build: Callable
    input_shape: tuple
    high: float
    batch_sizes: tuple
    repeats: int
    warmup: int


MODELS = {
    "mnist_cnn": ModelSpec(mnist_cnn, (28, 28, 1), 1.0, (1, 64, 256), 15, 2),
    "cifar10": ModelSpec(cifar10_model, (32, 32, 3), 255.0, (64,), 15, 2),  # trained; raw 0-255 pixels
    "vgg16": ModelSpec(_application("VGG16"), (224, 224, 3), 255.0, (8,), 7, 1),
    "resnet50": ModelSpec(_application("ResNet50"), (224, 224, 3), 255.0, (8,), 7, 1),
    # the same models built with Keras 3: the same ratios are expected (one core, two front ends)
    "mnist_cnn_keras3": ModelSpec(lambda: mnist_cnn(keras3), (28, 28, 1), 1.0, (64,), 15, 2),
    "vgg16_keras3": ModelSpec(_application("VGG16", keras3), (224, 224, 3), 255.0, (8,), 7, 1),
    "resnet50_keras3": ModelSpec(_application("ResNet50", keras3), (224, 224, 3), 255.0, (8,), 7, 1),
}


# ---------------------------------------------------------------------------------------------
# Methods and measurements

@dataclass(frozen=True)
class Method:
    """One timed computation: ``call()`` runs it once to completion (its result as numpy)."""

    name: str
    xla: bool
    call: Callable[[], np.ndarray]

    @property
    def key(self) -> str:
        return f"{self.name}/xla-{'on' if self.xla else 'off'}"


def _baselines(model, x: tf.Tensor, target: tf.Tensor, xla: bool):
    """The forward pass and the plain input gradient of the target logit, compiled as asked."""
    forward = tf.function(lambda v: model(v, training=False), jit_compile=xla)

    @tf.function(jit_compile=xla)
    def gradient(v, t):
        with tf.GradientTape() as tape:
            tape.watch(v)
            logits = model(v, training=False)
        # A one-hot output gradient: d(sum_n logit[n, t_n]) / dx, one backward pass.
        return tape.gradient(logits, v, output_gradients=tf.one_hot(t, logits.shape[-1], dtype=logits.dtype))

    return (Method("forward", xla, lambda: forward(x).numpy()),
            Method("gradient", xla, lambda: gradient(x, target).numpy()))


def _methods(model, x: np.ndarray, target: np.ndarray, xla_settings) -> list:
    x_t, target_t = tf.constant(x), tf.constant(target)
    methods = []
    for xla in xla_settings:
        methods.extend(_baselines(model, x_t, target_t, xla))
        for name, rule in RULES:
            ex = Explainer(model, rule=rule, jit_compile=xla)
            methods.append(Method(name, xla, lambda ex=ex: ex(x, target=target)))
    return methods


def _memory_device() -> str:
    return "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"


def _reset_peak(device: str) -> int | None:
    """Reset the allocator's peak to its current level and return that level (``None``: no statistics)."""
    try:
        tf.config.experimental.reset_memory_stats(device)
        return tf.config.experimental.get_memory_info(device)["current"]
    except (ValueError, RuntimeError):
        return None


def time_interleaved(methods, repeats: int, warmup: int) -> tuple:
    """Wall times of ``repeats`` round-robin rounds over ``methods``, after ``warmup`` rounds.

    Each round calls every method once; round ``r`` starts at method ``r mod k`` so that no method
    always runs right after the same neighbour. The first warm-up call of each method (tracing and
    compilation) is timed separately. Around each timed call, outside the timed interval, the
    allocator's peak is reset and read back.

    Returns
    -------
    times : dict
        ``method.key -> list of seconds``, one per repeat.
    first_call : dict
        ``method.key -> seconds`` of the first call.
    peak_bytes : dict
        ``method.key -> list of bytes`` the allocator held at its peak during each timed call above
        its level before the call (empty lists where the allocator keeps no statistics).
    """
    if warmup < 1 or repeats < 1:
        raise ValueError(f"warmup and repeats must be >= 1, got warmup={warmup}, repeats={repeats}.")
    first_call = {}
    for m in methods:
        start = time.perf_counter()
        m.call()
        first_call[m.key] = time.perf_counter() - start
    for _ in range(warmup - 1):
        for m in methods:
            m.call()
    device = _memory_device()
    times = {m.key: [] for m in methods}
    peak_bytes = {m.key: [] for m in methods}
    k = len(methods)
    for r in range(repeats):
        for i in range(k):
            m = methods[(r + i) % k]
            before = _reset_peak(device)
            start = time.perf_counter()
            m.call()
            times[m.key].append(time.perf_counter() - start)
            if before is not None:
                peak_bytes[m.key].append(int(tf.config.experimental.get_memory_info(device)["peak"] - before))
    return times, first_call, peak_bytes


def _summary(times: list, batch_size: int) -> dict:
    median = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (median, median, median)
    return {"median_ms": 1e3 * median, "min_ms": 1e3 * min(times), "images_per_s": batch_size / median,
            "spread": (q3 - q1) / median}


def _bench_one(name: str, spec: ModelSpec, batch_size: int, repeats: int, warmup: int, xla_settings, log) -> list:
    """Rows of results for one model at one batch size (all methods, all XLA settings)."""
    # 1. Model (global seeds: reproducible random weights), fixed-seed non-negative inputs,
    #    target = the predicted class.
    keras.utils.set_random_seed(0)
    model = spec.build()
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, spec.high, (batch_size,) + spec.input_shape).astype(np.float32)
    target = np.argmax(model(x, training=False).numpy(), axis=-1).astype(np.int32)
    # 2. Build every method, then time them interleaved (warm-up compiles; the batch size is fixed
    #    so XLA never recompiles inside the timed rounds).
    methods = _methods(model, x, target, xla_settings)
    log(f"{name} batch {batch_size}: {len(methods)} methods, {warmup} warm-up + {repeats} timed rounds")
    load_before, start = _loadavg(), time.perf_counter()
    times, first_call, peaks = time_interleaved(methods, repeats, warmup)
    load = [load_before, _loadavg()]
    log(f"{name} batch {batch_size}: done in {time.perf_counter() - start:.0f} s")
    # 3. Summaries; ratios against the gradient of the same XLA setting.
    rows = []
    for m in methods:
        base = statistics.median(times[f"gradient/xla-{'on' if m.xla else 'off'}"])
        rows.append({
            "model": name, "batch_size": batch_size, "method": m.name, "xla": m.xla,
            "repeats": repeats, "warmup": warmup, **_summary(times[m.key], batch_size),
            "ratio_to_gradient": statistics.median(times[m.key]) / base,
            "peak_mb": max(peaks[m.key]) / 2**20 if peaks[m.key] else None,
            "first_call_s": first_call[m.key], "loadavg_1min": load, "times_s": times[m.key],
        })
    del methods, model
    gc.collect()
    return rows


def run(models=None, batch_sizes=None, repeats: int | None = None, warmup: int | None = None,
        xla: str = "both", log: Callable = lambda msg: None) -> dict:
    """Benchmark the given models; return a JSON-ready dict.

    Parameters
    ----------
    models : list of str, optional
        Keys of :data:`MODELS`; default all.
    batch_sizes : list of int, optional
        Used for every model; default each model's own (:attr:`ModelSpec.batch_sizes`).
    repeats, warmup : int, optional
        Timed rounds, and untimed rounds before them (the first traces and compiles); default
        each model's own.
    xla : {'off', 'on', 'both'}
        ``jit_compile`` of the baselines and the explainers.
    log : callable
        Receives one progress line per model and batch size.

    The global random seeds (Python, NumPy, TensorFlow) are set to 0 before each model is built,
    so that its random weights are the same in every run.

    Returns
    -------
    dict
        ``machine`` (:func:`machine_info`), ``settings`` and ``results``: one row per model, batch
        size, method and XLA setting with ``median_ms``, ``min_ms``, ``images_per_s``, ``ratio_to_gradient``,
        ``spread`` (interquartile range / median), ``peak_mb`` (largest over the timed calls),
        ``first_call_s``, ``loadavg_1min`` (before and after the rounds) and the raw ``times_s``.
    """
    models = list(MODELS) if models is None else list(models)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {list(MODELS)}.")
    if xla not in ("off", "on", "both"):
        raise ValueError(f"xla must be 'off', 'on' or 'both', got {xla!r}.")
    xla_settings = {"off": (False,), "on": (True,), "both": (False, True)}[xla]
    rows = []
    for name in models:
        spec = MODELS[name]
        for batch_size in batch_sizes or spec.batch_sizes:
            rows += _bench_one(name, spec, int(batch_size), repeats or spec.repeats, warmup or spec.warmup,
                               xla_settings, log)
    settings = {"models": models, "batch_sizes": batch_sizes, "repeats": repeats, "warmup": warmup, "xla": xla,
                "rules": {name: str(rule) for name, rule in RULES}, "memory": MEMORY_METHOD,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return {"machine": machine_info(), "settings": settings, "results": rows}


def _loadavg() -> float | None:
    """The 1-minute load average: other processes competing for the cores show up here."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _source() -> dict:
    """The git commit of the lrp_grad checkout and its changed files under lrp_grad/, if any."""
    import subprocess

    folder = pathlib.Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout

    try:
        return {"commit": git("rev-parse", "HEAD").strip(),
                "changed": git("status", "--porcelain", "--", ".").splitlines()}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "changed": []}


def machine_info() -> dict:
    """CPU model, core counts and library versions of this machine."""
    from .. import __version__

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": usable,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "tensorflow": tf.__version__, "tf_keras": keras.__version__, "keras": keras3.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "lrp_grad": __version__,
        "lrp_grad_source": _source(), "loadavg_1min": _loadavg(),
    }


# ---------------------------------------------------------------------------------------------
# Presentation

def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def to_markdown(results: dict) -> str:
    """Two tables: ratios to the gradient per model and XLA setting, then every measurement."""
    mach, rows = results["machine"], results["results"]
    source = mach["lrp_grad_source"]
    commit = f"commit {source['commit'][:10]}" if source["commit"] else "not a git checkout"
    if source["changed"]:
        commit += f" with {len(source['changed'])} changed file(s) under lrp_grad/"
    loads = [v for r in rows for v in r["loadavg_1min"] if v is not None]
    load = f"; 1-min load average {min(loads):.1f}-{max(loads):.1f} during the rounds" if loads else ""
    lines = [
        "# lrp_grad benchmark", "",
        f"Machine: {mach['cpu']}, {mach['usable_cores']} usable cores, TensorFlow {mach['tensorflow']}, "
        f"tf-keras {mach['tf_keras']}, Python {mach['python']}; lrp_grad {mach['lrp_grad']} ({commit}); "
        f"{results['settings']['created']}{load}.", "",
        "Median wall time over interleaved rounds after warm-up, result forced to numpy; ratio = "
        "median / median of the plain input gradient with the same XLA setting. "
        f"Peak memory: {results['settings']['memory']}.", "",
        "## Time relative to the plain input gradient", "",
        "| model | batch | XLA | gradient ms | gradient min ms | "
        + " | ".join(m for m in METHOD_NAMES if m != "gradient") + " |",
        "|---|---:|---|---:|---:|" + "---:|" * (len(METHOD_NAMES) - 1),
    ]
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch_size"], r["xla"]), {})[r["method"]] = r
    for (model, batch, xla), by_method in groups.items():
        cells = [f"{by_method[m]['ratio_to_gradient']:.2f}" if m in by_method else ""
                 for m in METHOD_NAMES if m != "gradient"]
        gradient = by_method["gradient"]
        lines.append(f"| {model} | {batch} | {'on' if xla else 'off'} | {gradient['median_ms']:.4g} | "
                     f"{gradient['min_ms']:.4g} | " + " | ".join(cells) + " |")
    lines += [
        "", "## All measurements", "",
        "| model | batch | XLA | method | ms / batch | min ms | images / s | x gradient | spread | peak MB "
        "| first call s |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {'on' if r['xla'] else 'off'} | {r['method']} | "
            f"{r['median_ms']:.4g} | {r['min_ms']:.4g} | {r['images_per_s']:.4g} | {r['ratio_to_gradient']:.3g} | "
            f"{100 * r['spread']:.0f}% | {_fmt(r['peak_mb'])} | {r['first_call_s']:.2g} |"
        )
    lines += ["", "ms / batch: median; min ms: the fastest round (other processes only ever add time, so on a "
              "shared machine it is the uncontended time if any round ran alone). spread: interquartile range "
              "of the rounds / median. first call: tracing and compilation included.", ""]
    return "\n".join(lines)


def write(results: dict, out_dir, stem: str = "bench") -> tuple:
    """Write ``<stem>.json`` (everything, raw timings included) and ``<stem>.md``; return both paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(to_markdown(results))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# Command line

def _parser() -> argparse.ArgumentParser:
    return bench_args.parser()


def main(argv=None) -> int:
    """Run the benchmark from command-line arguments; write JSON and markdown to ``--out``."""
    args = bench_args.check(argv)
    results = run(args.models, args.batch_sizes, args.repeats, args.warmup, args.xla,
                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
    json_path, md_path = write(results, args.out, "quick" if args.quick else "bench")
    print(to_markdown(results))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
