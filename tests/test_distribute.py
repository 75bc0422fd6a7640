"""Multi-device (MirroredStrategy on two logical CPUs) and multi-worker (TF_CONFIG sharding with two
real processes on 127.0.0.1): both must equal single-device output.

Logical devices must be configured before TensorFlow starts, so each case runs in a fresh process.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

import lrp_grad
from lrp_grad.stream import load
from kit import assert_close, cnn

HERE = os.path.dirname(__file__)


def _run(code, env=None, timeout=240):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_mirrored_strategy_on_two_logical_devices(tmp_path):
    model = cnn((8, 8, 1), "same")
    model.save(tmp_path / "m.keras")
    # Image-like (non-negative) inputs: on signed inputs alpha-beta through this random net has
    # near-zero z+/z- and its float32 result is dominated by rounding, whatever the device split.
    x = np.random.default_rng(0).uniform(0, 1, (9, 8, 8, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = _run(f"""
        import os, numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import tf_keras as keras, lrp_grad
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        model = keras.models.load_model({str(tmp_path / 'm.keras')!r}, compile=False)
        x = np.load({str(tmp_path / 'x.npy')!r})
        ex = lrp_grad.Explainer(model, rule=lrp_grad.AlphaBeta(2, 1), strategy=strategy)
        R, report = ex(x, target=np.arange(9) % 5, return_layers=True)
        np.save({str(tmp_path / 'R.npy')!r}, R)
        res = ex.explain_dataset(x, target="predicted", batch_size=4, progress=False)
        np.save({str(tmp_path / 'R_stream.npy')!r}, res.relevance)
    """)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    # Replicas see smaller batches, and float32 kernels round differently per batch size.
    ex = lrp_grad.Explainer(model, rule=lrp_grad.AlphaBeta(2, 1))
    assert_close(np.load(tmp_path / "R.npy"), ex(x, target=np.arange(9) % 5), 1e-5, "mirrored")
    assert_close(np.load(tmp_path / "R_stream.npy"), ex(x, batch_size=4), 1e-5, "mirrored stream")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_loopback_workers_merge_to_single_device_output(tmp_path):
    model = cnn((8, 8, 1), "same")
    model.save(tmp_path / "m.keras")
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (21, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 5, 21)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    code = f"""
        import numpy as np, tensorflow as tf, tf_keras as keras, lrp_grad
        model = keras.models.load_model({str(tmp_path / 'm.keras')!r}, compile=False)
        data = tf.data.Dataset.from_tensor_slices((np.load({str(tmp_path / 'x.npy')!r}),
                                                   np.load({str(tmp_path / 'y.npy')!r})))
        ex = lrp_grad.Explainer(model, rule="epsilon_plus_flat")
        res = ex.explain_dataset(data, batch_size=4, out={str(tmp_path / 'out')!r}, worker="auto", progress=False)
        print(len(res))
    """
    procs = [_run(code, {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
             for i in range(2)]
    counts = []
    for proc in procs:  # both run at the same time; each is bounded in time
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        counts.append(int(out.strip().splitlines()[-1]))
    assert sorted(counts) == [9, 12]  # batches 0, 2, 4 (12 images) and 1, 3, 5 (4 + 4 + 1)
    merged = load(tmp_path / "out")
    ex = lrp_grad.Explainer(model, rule="epsilon_plus_flat")
    np.testing.assert_array_equal(merged.relevance, ex(x, target=y, batch_size=4))
    np.testing.assert_array_equal(merged.summaries["target"], y)
