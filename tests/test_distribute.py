"""Multi-device (MirroredStrategy on two logical CPUs) and multi-worker (TF_CONFIG sharding with two
real processes on 127.0.0.1): both must equal single-device output, for models of both Keras
packages (Keras 3 and tf-keras).

Logical devices must be configured before TensorFlow starts, so each case runs in fresh processes.
Starting TensorFlow dominates their cost, so one run of each case (a module fixture) explains the
models of both packages; each package's errors are caught there and reported by its own test.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kit
import lrp_grad
from lrp_grad.frontends import package_of
from lrp_grad.stream import load
from kit import assert_close, cnn

HERE = os.path.dirname(__file__)

#: Runs inside each subprocess: ``each(fn)`` calls ``fn(package, model)`` for every package and
#: writes what went wrong to ``error_<package>.txt`` instead of stopping the other package.
PRELUDE = """
    import importlib, json, pathlib, traceback

    def each(folder, fn):
        for package in {packages!r}:
            try:
                K = importlib.import_module(package)
                fn(package, K.models.load_model(str(pathlib.Path(folder) / f"m_{{package}}.keras"), compile=False))
            except Exception:
                (pathlib.Path(folder) / f"error_{{package}}.txt").write_text(traceback.format_exc())
"""


def _run(code, env=None):
    prelude = textwrap.dedent(PRELUDE.format(packages=kit.PACKAGES))
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _save_models(folder):
    """The same small CNN in each package, saved as ``m_<package>.keras``; returns them by package."""
    models = {}
    for package in kit.PACKAGES:
        model = cnn((8, 8, 1), "same", K=kit.package(package))
        assert package_of(model) == package
        model.save(folder / f"m_{package}.keras")
        models[package] = model
    return models


def _check_run(folder, package):
    """Fail with the subprocess traceback if explaining ``package``'s model failed there."""
    error = folder / f"error_{package}.txt"
    assert not error.exists(), f"{package} in the subprocess:\n{error.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """One process with two logical CPUs explaining each package's model under MirroredStrategy."""
    tmp = tmp_path_factory.mktemp("mirrored")
    models = _save_models(tmp)
    # Image-like (non-negative) inputs: on signed inputs alpha-beta through this random net has
    # near-zero z+/z- and its float32 result is dominated by rounding, whatever the device split.
    x = np.random.default_rng(0).uniform(0, 1, (9, 8, 8, 1)).astype(np.float32)
    np.save(tmp / "x.npy", x)
    proc = _run(f"""
        import os, numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import lrp_grad
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        x = np.load({str(tmp / 'x.npy')!r})

        def explain(package, model):
            assert lrp_grad.frontends.package_of(model) == package, type(model)
            ex = lrp_grad.Explainer(model, rule=lrp_grad.AlphaBeta(2, 1), strategy=strategy)
            R, report = ex(x, target=np.arange(9) % 5, return_layers=True)
            np.save({str(tmp)!r} + f"/R_{{package}}.npy", R)
            res = ex.explain_dataset(x, target="predicted", batch_size=4, progress=False)
            np.save({str(tmp)!r} + f"/R_stream_{{package}}.npy", res.relevance)

        each({str(tmp)!r}, explain)
    """)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return tmp, models, x


def test_mirrored_strategy_on_two_logical_devices(K, mirrored):
    tmp, models, x = mirrored
    _check_run(tmp, K.__name__)
    model = models[K.__name__]
    # Replicas see smaller batches, and float32 kernels round differently per batch size.
    ex = lrp_grad.Explainer(model, rule=lrp_grad.AlphaBeta(2, 1))
    assert_close(np.load(tmp / f"R_{K.__name__}.npy"), ex(x, target=np.arange(9) % 5), 1e-5, "mirrored")
    assert_close(np.load(tmp / f"R_stream_{K.__name__}.npy"), ex(x, batch_size=4), 1e-5, "mirrored stream")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Two worker processes at the same time, each explaining its shard with each package's model."""
    tmp = tmp_path_factory.mktemp("workers")
    models = _save_models(tmp)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (21, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 5, 21)
    np.save(tmp / "x.npy", x)
    np.save(tmp / "y.npy", y)
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    code = f"""
        import numpy as np, tensorflow as tf, lrp_grad
        data = tf.data.Dataset.from_tensor_slices((np.load({str(tmp / 'x.npy')!r}),
                                                   np.load({str(tmp / 'y.npy')!r})))
        counts = {{}}

        def explain(package, model):
            assert lrp_grad.frontends.package_of(model) == package, type(model)
            ex = lrp_grad.Explainer(model, rule="epsilon_plus_flat")
            res = ex.explain_dataset(data, batch_size=4, out={str(tmp)!r} + f"/out_{{package}}", worker="auto",
                                     progress=False)
            counts[package] = len(res)

        each({str(tmp)!r}, explain)
        print(json.dumps(counts))
    """
    procs = [_run(code, {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
             for i in range(2)]
    counts = []
    for proc in procs:  # both run at the same time; each is bounded in time
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        counts.append(json.loads(out.strip().splitlines()[-1]))
    return tmp, models, x, y, counts


def test_two_loopback_workers_merge_to_single_device_output(K, workers):
    tmp, models, x, y, counts = workers
    _check_run(tmp, K.__name__)
    # batches 0, 2, 4 (12 images) and 1, 3, 5 (4 + 4 + 1)
    assert sorted(c[K.__name__] for c in counts) == [9, 12]
    merged = load(tmp / f"out_{K.__name__}")
    ex = lrp_grad.Explainer(models[K.__name__], rule="epsilon_plus_flat")
    np.testing.assert_array_equal(merged.relevance, ex(x, target=y, batch_size=4))
    np.testing.assert_array_equal(merged.summaries["target"], y)
