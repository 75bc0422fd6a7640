"""The exported SavedModel runs in a fresh process without lrp_grad and gives the same relevance
(models of either Keras package: Keras 3 and tf-keras)."""
import json
import subprocess
import sys
import textwrap

import numpy as np

import lrp_grad
from lrp_grad.frontends import package_of
from kit import cnn


def test_export_runs_without_lrp_grad(tmp_path, K):
    model = cnn((8, 8, 2), "same", strides=2, K=K)
    assert package_of(model) == K.__name__
    ex = lrp_grad.Explainer(model, rule="epsilon_plus_flat")
    x = np.random.default_rng(0).uniform(-1, 1, (5, 8, 8, 2)).astype(np.float32)
    target = np.array([0, 1, 2, 3, 4], np.int32)
    ex.export(tmp_path / "saved")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", target)
    script = textwrap.dedent(f"""
        import sys, json, numpy as np
        sys.modules["lrp_grad"] = None  # lrp_grad must not be importable here
        try:
            import lrp_grad
            raise SystemExit("lrp_grad was importable")
        except ImportError:
            pass
        import tensorflow as tf
        loaded = tf.saved_model.load({str(tmp_path / 'saved')!r})
        x, t = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 't.npy')!r})
        out = loaded.signatures["explain"](images=tf.constant(x), target=tf.constant(t))
        np.save({str(tmp_path / 'R.npy')!r}, out["relevance"].numpy())
        serve = loaded.signatures["serving_default"](images=tf.constant(x))
        np.save({str(tmp_path / 'R_pred.npy')!r}, serve["relevance"].numpy())
        print(json.dumps(sorted(loaded.signatures.keys())))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["explain", "serving_default"]
    np.testing.assert_allclose(np.load(tmp_path / "R.npy"), ex(x, target=target), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.load(tmp_path / "R_pred.npy"), ex(x), rtol=1e-5, atol=1e-7)
