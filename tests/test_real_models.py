"""End to end on real architectures: keras.applications (random weights) and a trained CIFAR-10 CNN,
with each Keras package (Keras 3 and tf-keras)."""
import importlib.util
import pathlib
import warnings

import numpy as np
import pytest

import lrp_grad
from lrp_grad.frontends import package_of
from kit import PACKAGES, package, rel_err, to_float64

APPLICATIONS = ["VGG16", "ResNet50", "MobileNetV2", "DenseNet121", "EfficientNetB0"]
IDS = {"keras": "keras3", "tf_keras": "tf_keras"}
#: Keras 3 applications in the default run (each costs ~20-30 s, mostly tracing); the rest are slow.
KERAS3_DEFAULT = {"ResNet50", "MobileNetV2"}
#: Input size per package: tf-keras at the ImageNet default, Keras 3 at a small size the
#: constructors accept with weights=None (same layers, a quarter of the compute).
SIZES = {"tf_keras": 224, "keras": 64}
CASES = [pytest.param("tf_keras", name, id=f"tf_keras-{name}") for name in APPLICATIONS] + [
    pytest.param("keras", name, id=f"keras3-{name}", marks=() if name in KERAS3_DEFAULT else pytest.mark.slow)
    for name in APPLICATIONS
]


def softmax(logits):
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("pkg, name", CASES)
def test_keras_applications_end_to_end(pkg, name):
    keras = package(pkg)
    size = SIZES[pkg]
    shape = None if size == 224 else (size, size, 3)
    model = getattr(keras.applications, name)(weights=None, input_shape=shape)  # random weights: no download
    assert package_of(model) == pkg
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    probabilities = model(x).numpy()
    for rule in ("epsilon_plus_flat", "seed_ab"):
        ex = lrp_grad.Explainer(model, rule=rule)
        R, report = ex(x, return_layers=True)
        assert R.shape == x.shape and np.all(np.isfinite(R)), f"{name} {rule}"
        assert len(report) > 10 and all(np.all(np.isfinite(v)) for v in report.values())
        assert np.isfinite(list(report.conservation_gap().values())).all()
        np.testing.assert_allclose(softmax(ex.forward(x)), probabilities, atol=1e-5)
    # Every BatchNorm that follows a Dense/Conv directly is folded into it.
    folded = [s for s in ex.passes.plan(True).steps if s.node.params is not None]
    has_bn = any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert bool(folded) == has_bn


@pytest.fixture(scope="module", params=PACKAGES, ids=IDS.get)
def cifar(request):
    """The trained CIFAR-10 CNN (a tf-keras .h5 file) as a model of each package: lrp_grad's loader
    reads it with tf-keras, Keras 3 reads the same file with its legacy-h5 loader."""
    pytest.importorskip("PIL")
    try:
        x, y = lrp_grad.datasets.cifar10_samples()
        model = lrp_grad.datasets.cifar10_model()
    except ImportError as e:
        pytest.skip(str(e))
    if request.param == "keras":
        spec = importlib.util.find_spec("cifar_10_model")
        path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "trained_models" / "cnn_model.h5"
        with warnings.catch_warnings():  # the file's Conv2D(input_shape=...): Keras 3's advice to its author
            warnings.filterwarnings("ignore", message="Do not pass an `input_shape`", category=UserWarning)
            model = package("keras").saving.load_model(path, compile=False)
    assert package_of(model) == request.param
    return model, x.astype(np.float32), y


def test_cifar10_real_model_canonized_logits_and_relevance(cifar):
    model, x, y = cifar
    logits = model(x).numpy()
    assert (logits.argmax(1) == y).mean() >= 0.9  # the real trained model on real test images
    ex = lrp_grad.Explainer(model, rule="epsilon_plus_flat")
    assert len([s for s in ex.passes.plan(False).steps if s.node.params is not None]) == 6  # all BatchNorms folded
    assert rel_err(ex.forward(x), logits) <= 1e-5
    for rule in ("epsilon_plus_flat", "seed_ab", lrp_grad.AlphaBeta(2, 1), lrp_grad.Epsilon(1e-6)):
        R = lrp_grad.explain(model, x, target=y, rule=rule)
        assert np.all(np.isfinite(R)) and np.abs(R).sum() > 0, rule


@pytest.mark.parametrize("cifar", ["tf_keras"], indirect=True)  # the core's numerics: one package suffices
@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float16"])
def test_cifar10_reduced_precision_alpha_beta(cifar, compute_dtype):
    """z- on its own in reduced precision: as z - z+ its rounding flipped the sign of small z-,
    and the clamp then divided by 1e-6 (relative error 8e3 in bfloat16 on this model; now 2e-2)."""
    model, x, y = cifar
    full = lrp_grad.explain(model, x, target=y, rule=lrp_grad.AlphaBeta(2, 1))
    low = lrp_grad.explain(model, x, target=y, rule=lrp_grad.AlphaBeta(2, 1), compute_dtype=compute_dtype)
    assert rel_err(low, full) <= 0.1


def test_cifar10_conservation_with_epsilon_and_bias_excluded(cifar):
    """Bias left out of every denominator and epsilon -> 0: each layer conserves the target logit.

    Done in float64: this trained model has units whose bias-free pre-activation is ~1e-7 of its
    terms, so in float32 the rounding of z, amplified by 1/z, breaks conservation (measured: a gap
    of 30x), and a larger epsilon absorbs the relevance of exactly those units.
    """
    model, x, y = cifar
    model64 = to_float64(model)
    R, report = lrp_grad.explain(model64, x, target=y, rule=lrp_grad.Epsilon(1e-12, bias=False), return_layers=True)
    logits = model64(x.astype(np.float64)).numpy()[np.arange(len(y)), y]
    np.testing.assert_allclose(report.output, logits, rtol=1e-12)
    gaps = report.conservation_gap()
    assert max(gaps.values()) <= 1e-3, gaps
    np.testing.assert_allclose(R.reshape(len(y), -1).sum(1), logits, rtol=1e-3)
