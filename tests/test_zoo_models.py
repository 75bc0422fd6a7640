"""Models from the public Keras model zoos, built with random weights (nothing is downloaded):
keras-hub (Keras 3) and keras-cv-attention-models (kecam, tf-keras), the real clients of the
look-inside, batch-size tracing and attention mechanisms.

The default run explains a few lean ones: a ViT, a Swin and a DeiT of keras-hub (the explained
forward equals the model's, the relevance is finite and not all zero, an image explained alone
equals the same image in a batch, the model is untouched) and a ConvNeXtV2 and an MLP-Mixer of kecam
(through the coverage benchmark, in their own processes). The
whole sweep (every model of ``benchmarks/zoo_coverage.py``, at least 90% explained and no raw
error) is ``python -m pytest -m slow tests/test_zoo_models.py``.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import kit
import lrp_grad

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import zoo_coverage  # noqa: E402  (the benchmark's model builders: one definition of every zoo model)


def _check(model, size):
    weights = [w.copy() for w in model.get_weights()]
    x = np.random.default_rng(0).uniform(size=(3, size, size, 3)).astype("float32")
    explainer = lrp_grad.Explainer(model, rule=lrp_grad.AttnLRP())
    predicted = np.asarray(model(x))
    np.testing.assert_allclose(explainer.forward(x), predicted, rtol=1e-5, atol=1e-5 * np.abs(predicted).max())
    R = explainer(x, target=1)
    assert R.shape == x.shape and np.isfinite(R).all() and np.abs(R).max() > 0
    kit.assert_close(explainer(x[1:2], target=1), R[1:2], 1e-4, f"{model.name}: one image vs in a batch")
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights())), "the model's weights changed"
    return R


HUB = {"ViT": 32, "SwinTransformer": 32, "DeiT": 32}


@pytest.mark.parametrize("name", sorted(HUB))
def test_keras_hub_transformers(name):
    pytest.importorskip("keras_hub")
    model, _ = zoo_coverage._hub_model(name, HUB[name])
    _check(model, HUB[name])


def _harness(tmp_path, zoo, *models):
    """Run ``benchmarks/zoo_coverage.py`` on these models (each in its own process: kecam needs
    ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported) and return its records."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "zoo_coverage.py"), "--zoo", zoo, "--model", *models,
                    "--jobs", "1", "--timeout", "600", "--out", str(tmp_path)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return json.loads((tmp_path / "zoo_coverage.json").read_text())["models"]


def test_kecam_models(tmp_path):
    """A ConvNeXtV2 and an MLP-Mixer of kecam (tf-keras) are explained with AttnLRP and the default
    rule: finite relevance, not all zero."""
    pytest.importorskip("keras_cv_attention_models")
    records = _harness(tmp_path, "kecam", "ConvNeXtV2Atto", "MLPMixerS32")
    assert sorted(r["model"] for r in records) == ["convnext.ConvNeXtV2Atto", "mlp_family.MLPMixerS32"]
    for r in records:
        for rule in ("attnlrp", "default"):
            assert r[rule]["status"] == "explained", (r["model"], rule, r[rule])
            assert r[rule]["finite"] and r[rule]["nonzero"], (r["model"], rule, r[rule])


@pytest.mark.slow
def test_every_zoo_model_is_explained_or_refused_by_name(tmp_path):
    """The whole sweep, each model in its own process: at least 90% of the models that build are
    explained, the rest refused by name (no raw exception)."""
    pytest.importorskip("keras_hub")
    pytest.importorskip("keras_cv_attention_models")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "zoo_coverage.py"), "--zoo", "keras-hub", "kecam",
                    "--jobs", "2", "--timeout", "600", "--out", str(tmp_path)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    models = json.loads((tmp_path / "zoo_coverage.json").read_text())["models"]
    built = [m for m in models if m.get("built")]
    raw = [m["model"] for m in built if m["attnlrp"]["status"] == "raw_error"]
    explained = [m for m in built if m["attnlrp"]["status"] == "explained"]
    assert not raw, f"raw exceptions: {raw}"
    assert len(explained) >= 0.9 * len(built), f"{len(explained)} of {len(built)} explained"
