"""Faithfulness metrics on an analytic model whose exact relevance ordering is known."""
import numpy as np
import pytest

import lrp_grad
from lrp_grad import evaluate
from lrp_grad.frontends import package_of
from kit import PACKAGES, package

IDS = {"keras": "keras3", "tf_keras": "tf_keras"}


@pytest.fixture(scope="module", params=PACKAGES, ids=IDS.get)
def linear(request):
    """Two classes: logit_1 = w . x, logit_0 = 0, so p(1) = sigmoid(w . x) and x * w is exact relevance.

    Built with each Keras package (Keras 3 and tf-keras)."""
    keras = package(request.param)
    inp = keras.Input((4, 4, 1), dtype="float64")
    flat = keras.layers.Flatten(dtype="float64")(inp)
    out = keras.layers.Dense(2, use_bias=False, dtype="float64")(flat)
    model = keras.Model(inp, out)
    w = np.random.default_rng(0).normal(size=16)
    model.layers[-1].set_weights([np.stack([np.zeros(16), w], 1)])
    assert package_of(model) == request.param
    x = np.random.default_rng(1).uniform(-1, 1, (6, 4, 4, 1))
    return model, w, x


def sigmoid(t):
    return 1 / (1 + np.exp(-t))


def test_relevance_of_the_linear_model_is_x_times_w(linear):
    model, w, x = linear
    R = lrp_grad.explain(model, x, target=1, rule=lrp_grad.Z())
    np.testing.assert_allclose(R.reshape(6, -1), x.reshape(6, -1) * w, rtol=1e-12)


@pytest.mark.parametrize("which", ["lowest", "highest"])
def test_seed_flip_exact_on_linear_model(linear, which):
    model, w, x = linear
    y = np.ones(6, int)
    contributions = x.reshape(6, -1) * w
    result = evaluate.seed_flip(model, x, y, contributions.reshape(x.shape), k=3, which=which)
    order = np.argsort(contributions, 1)
    picked = order[:, :3] if which == "lowest" else order[:, ::-1][:, :3]
    flipped_logit = contributions.sum(1) - 2 * np.take_along_axis(contributions, picked, 1).sum(1)
    expected = sigmoid(flipped_logit) - sigmoid(contributions.sum(1))
    np.testing.assert_allclose(result.changes, expected, rtol=1e-10)
    if which == "lowest":  # removing the most negative evidence can only help
        assert result.improved == 1.0 and result.worse == 0.0 and result.mean > 0
    else:
        assert result.worse == 1.0 and result.max < 0
    summary = result.summary()
    assert summary["flipped"] == f"3 {which}" and summary["n"] == 6


def test_perturbation_curve_and_aopc_exact(linear):
    model, w, x = linear
    y = np.ones(6, int)
    contributions = x.reshape(6, -1) * w
    curve = evaluate.perturbation_curve(model, x, y, contributions.reshape(x.shape), steps=4, pixels_per_step=2)
    assert curve.shape == (6, 5)
    order = np.argsort(-contributions, 1)
    for s in range(5):
        removed = np.take_along_axis(contributions, order[:, :2 * s], 1).sum(1)
        np.testing.assert_allclose(curve[:, s], sigmoid(contributions.sum(1) - removed), rtol=1e-10)
    # The exact ordering beats a random one on every image.
    random_curve = evaluate.perturbation_curve(model, x, y, np.random.default_rng(3).normal(size=x.shape), steps=4,
                                               pixels_per_step=2)
    assert np.all(evaluate.aopc(curve) >= evaluate.aopc(random_curve) - 1e-12)
    np.testing.assert_allclose(evaluate.aopc(np.array([[1.0, 0.5, 0.0]])), [0.75])


def test_rgb_pixels_are_ranked_by_channel_sum_and_perturbed_together():
    x = np.ones((1, 2, 2, 3))
    relevance = np.zeros((1, 2, 2, 3))
    relevance[0, 1, 0] = [1.0, 1.0, -0.5]  # pixel (1, 0) has the largest channel sum
    flat = evaluate._perturb(x, np.array([[2]]), "zero", None)
    assert np.all(flat[0, 1, 0] == 0) and flat.sum() == 9
    assert evaluate.pixel_relevance(relevance).argmax() == 2


def test_attribution_methods(linear):
    model, w, x = linear
    y = np.ones(6, int)
    grad, seconds = evaluate.attribution(model, x, y, "gradient")
    np.testing.assert_allclose(grad.reshape(6, -1), np.broadcast_to(w, (6, 16)), rtol=1e-6)
    gxi, _ = evaluate.attribution(model, x, y, "gradient_x_input")
    lrp, _ = evaluate.attribution(model, x, y, lrp_grad.Z())
    np.testing.assert_allclose(lrp, gxi, rtol=1e-5, atol=1e-7)
    assert seconds >= 0


def test_bad_arguments(linear):
    model, w, x = linear
    with pytest.raises(ValueError, match="which must be 'lowest' or 'highest', got 'top'"):
        evaluate.seed_flip(model, x, np.ones(6, int), x, which="top")
    with pytest.raises(ValueError, match=r"relevance shape \(6, 4, 3, 1\) does not match x shape \(6, 4, 4, 1\)"):
        evaluate.seed_flip(model, x, np.ones(6, int), x[:, :, :3])
    with pytest.raises(ValueError, match="perturbation must be 'flip', 'zero' or 'uniform', got 'blur'"):
        evaluate.perturbation_curve(model, x, np.ones(6, int), x, perturbation="blur")


@pytest.mark.parametrize("ending", ["logits", "softmax activation", "Softmax layer"])
def test_probabilities_apply_softmax_once(K, ending):
    """A model ending in softmax (activation or layer) gives its output as is; logits get a softmax."""
    inp = K.Input((5,), dtype="float64")
    dense = K.layers.Dense(3, activation="softmax" if ending == "softmax activation" else None, dtype="float64")
    out = dense(inp)
    if ending == "Softmax layer":
        out = K.layers.Softmax(dtype="float64")(out)
    model = K.Model(inp, out)
    dense.set_weights([np.random.default_rng(0).normal(size=(5, 3)), np.array([0.5, -0.5, 0.0])])
    x = np.random.default_rng(1).normal(size=(4, 5))
    p = evaluate.probabilities(model, x, batch_size=3)
    out = np.asarray(model(x), np.float64)
    expected = out if ending != "logits" else np.exp(out) / np.exp(out).sum(1, keepdims=True)
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-12)
